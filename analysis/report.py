"""The whole report of a sweep: its figures and tables (``analysis.contents.FIGURES`` and ``TABLES``: heatmaps,
curves, the adaptive attacker's and the budget study's figures when the sweep ran them; every table as CSV under
``tables/``), summary.md and report.html, written to a folder and logged as artifacts (under ``report/``) of the
sweep's parent run; optionally the results document (RESULTS.md).

    python -m analysis.report --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow import MlflowClient

from analysis import contents
from analysis.budget import benign_section, budget_section
from analysis.cli import parse_source_args, source_parser
from analysis.contents import TABLES_DIR, SweepData, load_sweep_data, make_figures, write_tables
from analysis.html import write_html_report
from analysis.defend import defend_overview, defend_section
from analysis.families import family_rows
from analysis.results import merge_results, results_document
from analysis.runs import load_chosen_settings, load_spec_dict
from analysis.search import search_overview, search_section
from analysis.summary import make_summary, overview, write_summary
from analysis.timesteps import timestep_rows, timestep_section
from sophon_ray import names
from sophon_ray.errors import cli_exit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    """What ``run_report`` wrote: the sweep it read, the figures (``heatmaps``, ``curves``, ``search``, ``budget``:
    PNG paths, [] when the sweep has none; ``figures``: every ``analysis.contents.FIGURES`` entry's by name),
    ``summary`` (summary.md), ``html`` (report.html), ``results`` (the results document, None when not asked for),
    ``tables`` (``analysis.contents.TABLES`` name -> its CSV), ``artifacts`` (the artifact paths logged to the parent
    run, [] when not logged) and ``overview`` (the console's short plain-text table)."""

    sweep_id: str
    parent_run_id: str
    heatmaps: list[Path]
    curves: list[Path]
    search: list[Path]
    budget: list[Path]
    summary: Path
    html: Path
    results: Path | None
    artifacts: list[str]
    overview: str
    tables: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """Every file written, figures first (in FIGURES order), then summary.md, report.html, the results
        document and the tables."""
        return [*(p for f in contents.FIGURES for p in self.figures.get(f.name, [])), self.summary, self.html,
                *([self.results] if self.results else []), *self.tables.values()]


def write_results(data: SweepData, results: Path, command: str | None) -> None:
    """Write (or update in place) the results document of the sweep at ``results``."""
    spec = load_spec_dict(data.sweep) or {}
    if data.num_classes:  # the chance level summary.md used, so both documents floor at the same value
        spec = {**spec, "model": {**spec.get("model", {}), "num_classes": data.num_classes}}
    chosen = load_chosen_settings(data.sweep)   # a defended variant is reported as the setting its search chose
    spec = {**spec, "protect": [{**chosen[label], "defended": True} if (label := v.get("name") or v.get("loss")) in chosen
                                else v for v in spec.get("protect", [])]}
    parent = MlflowClient(tracking_uri=data.sweep.tracking_uri).get_run(data.sweep.parent_run_id).data.metrics
    seconds = sum(v for k, v in parent.items() if k.startswith("seconds_")) or None
    metric, chance_level = data.metric, data.chance_level
    extra = [defend_section(data.defends), search_section(data.searches, chance_level, per_seed=True, metric=metric),
             budget_section(data.budget, per_seed=True, metric=metric),
             benign_section(data.benign, per_seed=True, metric=metric),
             timestep_section(timestep_rows(data.runs, metric), metric)]
    document = results_document(data.sweep, data.runs, data.curves, data.protect, data.pretrain.original_test, spec,
                                command or f"sophon-ray report SPEC --results {results}", seconds,
                                [part for part in extra if part])
    existing = results.read_text(encoding="utf-8") if results.is_file() else ""
    results.write_text(merge_results(existing, data.sweep.experiment, document), encoding="utf-8")
    log.info("wrote %s", results)


def artifact_folder(out_dir: Path, path: Path) -> str:
    """Where a report file goes in the parent run's artifacts: ``report/``, a table under ``report/tables/``."""
    if Path(path).parent == Path(out_dir) / TABLES_DIR:
        return f"{names.REPORT_ARTIFACTS}/{TABLES_DIR}"
    return names.REPORT_ARTIFACTS


def upload(data: SweepData, out_dir: Path, paths: list[Path]) -> list[str]:
    """Log ``paths`` to the sweep's parent run under ``report/`` (files under ``out_dir/tables`` under
    ``report/tables/``); returns the artifact paths."""
    client = MlflowClient(tracking_uri=data.sweep.tracking_uri)
    artifacts = []
    for path in paths:
        folder = artifact_folder(out_dir, path)
        client.log_artifact(data.sweep.parent_run_id, str(path), artifact_path=folder)
        artifacts.append(f"{folder}/{Path(path).name}")
    log.info("logged %d report files to parent run %s", len(artifacts), data.sweep.parent_run_id)
    return artifacts


def run_report(tracking_uri: str, experiment: str, out_dir: str | Path, sweep_id: str | None = None,
               log_to_parent: bool = True, num_classes: int | None = None, results: Path | None = None,
               command: str | None = None) -> ReportResult:
    """Write every ``analysis.contents.FIGURES`` entry, summary.md, report.html (all of it in one self-contained
    page) and every ``analysis.contents.TABLES`` entry as ``tables/<name>.csv`` for one sweep (default: the newest)
    into ``out_dir``, and with ``results`` the results document there (its hand-written part kept; ``command`` is
    quoted in it).

    With ``log_to_parent`` the files are also logged to the sweep's parent run under ``report/`` (the CSVs under
    ``report/tables/``). ``num_classes=None`` reads model.num_classes from the sweep's logged spec
    (``load_num_classes``; accuracies are not floored at chance when it is not there). Returns a ReportResult.
    Raises RunsNotFoundError when the experiment, sweep or its runs are missing.
    """
    # Read the sweep once, so every part below shows the same sweep even if a new one starts meanwhile.
    data = load_sweep_data(tracking_uri, experiment, sweep_id, num_classes)
    out = Path(out_dir)
    metric, chance_level = data.metric, data.chance_level
    figures = make_figures(data, out)
    extra = [defend_section(data.defends), search_section(data.searches, chance_level, metric=metric),
             budget_section(data.budget, metric=metric), benign_section(data.benign, metric=metric),
             timestep_section(timestep_rows(data.runs, metric), metric)]
    text = make_summary(data.cells, data.curves, data.protect, data.pretrain, data.num_classes, data.title,
                        [part for part in extra if part], metric, family_rows(data.runs, chance_level))
    summary = write_summary(text, out)
    page = write_html_report(text, out, figures)
    tables = write_tables(data, out)
    if results is not None:
        write_results(data, results, command)
    brief = "\n".join(part for part in (overview(data.cells, data.protect, data.pretrain, data.num_classes, metric),
                                        defend_overview(data.defends),
                                        search_overview(data.searches, chance_level, metric)) if part)
    result = ReportResult(data.sweep.sweep_id, data.sweep.parent_run_id, figures["heatmaps"], figures["curves"],
                          figures["search"], figures["budget"], summary, page, results, [], brief, tables, figures)
    if log_to_parent:
        result = replace(result, artifacts=upload(data, out, result.paths))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the report into --out and log it to the parent run; returns the exit status."""
    parser = source_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count for the chance floor (default: model.num_classes of the sweep's logged "
                             "spec)")
    parser.add_argument("--no-log", action="store_true", help="only write files; do not log them to MLflow")
    parser.add_argument("--results", default=None, help="also write the results document to this file")
    args = parse_source_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def command() -> int:
        result = run_report(args.tracking_uri, args.experiment, args.out, args.sweep_id,
                            log_to_parent=not args.no_log, num_classes=args.num_classes,
                            results=Path(args.results) if args.results else None)
        for path in result.paths:
            print(path)
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
