"""The whole report of a sweep: heatmaps, curves, the adaptive attacker's and the budget study's figures (when the
sweep ran them), summary.md and report.html, written to a folder and logged as artifacts (under ``report/``) of
the sweep's parent run; optionally the results document (RESULTS.md).

    python -m analysis.report --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient

from analysis.budget import benign_section, budget_section, load_grid, make_budget_figures
from analysis.curves import make_curves
from analysis.heatmaps import make_all_heatmaps
from analysis.html import EXTRA_FIGURES, write_html_report
from analysis.results import merge_results, results_document
from analysis.cli import parse_source_args, source_parser
from analysis.runs import (find_sweep, load_curves, load_num_classes, load_pretrain_run, load_protect_runs, load_runs,
                           load_spec_dict)
from analysis.search import load_searches, make_search_figures, search_overview, search_section
from analysis.summary import make_summary, overview, write_summary
from analysis.tables import cells
from sophon_ray import names
from sophon_ray.core.metrics import chance
from sophon_ray.errors import cli_exit

log = logging.getLogger(__name__)


def run_report(tracking_uri: str, experiment: str, out_dir: str | Path, sweep_id: str | None = None,
               log_to_parent: bool = True, num_classes: int | None = None, results: Path | None = None,
               command: str | None = None) -> dict:
    """Write heatmaps, curves, summary.md and report.html (all of it in one self-contained page) for one sweep
    (default: the newest) into ``out_dir``, and with ``results`` the results document there (its hand-written
    part kept; ``command`` is quoted in it).

    With ``log_to_parent`` the files are also logged to the sweep's parent run under ``report/``.
    ``num_classes=None`` reads model.num_classes from the sweep's logged spec (``load_num_classes``;
    accuracies are not floored at chance when it is not there). Returns {"sweep_id", "parent_run_id",
    "heatmaps", "curves", "search", "budget", "summary", "html", "results", "artifacts", "overview"} (paths; search
    and budget: the figures of ``analysis.search`` / ``analysis.budget``, [] when the sweep has no such runs;
    artifacts = the artifact
    paths logged; overview = the short plain-text table of ``analysis.summary.overview``).
    Raises RunsNotFoundError when the experiment, sweep or its runs are missing.
    """
    # Resolve the sweep once, so every table below reads the same sweep even if a new one starts meanwhile.
    sweep = find_sweep(tracking_uri, experiment, sweep_id)
    runs = load_runs(tracking_uri, experiment, sweep.sweep_id)
    cell_table = cells(runs)
    curves = load_curves(tracking_uri, runs["run_id"], sweep.metric.restricted)
    title = f"{experiment} (sweep {sweep.sweep_id})"
    metric = sweep.metric
    heatmaps = make_all_heatmaps(cell_table, out_dir, title, metric)
    curve_paths = make_curves(runs, curves, out_dir, title, metric)
    protect = load_protect_runs(tracking_uri, experiment, sweep.sweep_id)
    pretrain = load_pretrain_run(tracking_uri, experiment, sweep.sweep_id)
    classes = num_classes or load_num_classes(sweep)
    chance_level = chance(classes) if classes else 0.0
    searches, budget, benign = load_searches(sweep), load_grid(sweep, names.BUDGET), load_grid(sweep, names.BENIGN)
    search_paths = make_search_figures(searches, out_dir, title, chance_level, metric)
    budget_paths = make_budget_figures(budget, out_dir, title, chance_level, metric)
    extra = [search_section(searches, chance_level, metric=metric), budget_section(budget, metric=metric),
             benign_section(benign, metric=metric)]
    text = make_summary(cell_table, curves, protect, pretrain, classes, title, [part for part in extra if part], metric)
    summary = write_summary(text, out_dir)
    figures = list(zip((title for title, _ in EXTRA_FIGURES), (search_paths, budget_paths)))
    page = write_html_report(text, heatmaps, curve_paths, out_dir, figures)
    if results is not None:
        spec = load_spec_dict(sweep) or {}
        if classes:  # the chance level summary.md used, so both documents floor at the same value
            spec = {**spec, "model": {**spec.get("model", {}), "num_classes": classes}}
        parent = MlflowClient(tracking_uri=tracking_uri).get_run(sweep.parent_run_id).data.metrics
        seconds = sum(v for k, v in parent.items() if k.startswith("seconds_")) or None
        extra = [search_section(searches, chance_level, per_seed=True, metric=metric),
                 budget_section(budget, per_seed=True, metric=metric),
                 benign_section(benign, per_seed=True, metric=metric)]
        document = results_document(sweep, runs, curves, protect, pretrain.original_test_acc, spec,
                                    command or f"sophon-ray report SPEC --results {results}", seconds,
                                    [part for part in extra if part])
        existing = results.read_text(encoding="utf-8") if results.is_file() else ""
        results.write_text(merge_results(existing, experiment, document), encoding="utf-8")
        log.info("wrote %s", results)
    artifacts = []
    if log_to_parent:
        client = MlflowClient(tracking_uri=tracking_uri)
        for path in [*heatmaps, *curve_paths, *search_paths, *budget_paths, summary, page,
                     *([results] if results else [])]:
            client.log_artifact(sweep.parent_run_id, str(path), artifact_path=names.REPORT_ARTIFACTS)
            artifacts.append(f"{names.REPORT_ARTIFACTS}/{Path(path).name}")
        log.info("logged %d report files to parent run %s", len(artifacts), sweep.parent_run_id)
    return {"sweep_id": sweep.sweep_id, "parent_run_id": sweep.parent_run_id, "heatmaps": heatmaps,
            "curves": curve_paths, "search": search_paths, "budget": budget_paths, "summary": summary, "html": page,
            "results": results, "artifacts": artifacts,
            "overview": "\n".join(part for part in (overview(cell_table, protect, pretrain, classes, metric),
                                                     search_overview(searches, chance_level, metric)) if part)}


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
        for path in [*result["heatmaps"], *result["curves"], *result["search"], *result["budget"], result["summary"],
                     result["html"]]:
            print(path)
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
