"""The whole report of a sweep: heatmaps, curves and summary.md, written to a folder and logged as
artifacts (under ``report/``) of the sweep's parent run.

    python -m analysis.report --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient

from analysis.curves import make_curves
from analysis.heatmaps import make_heatmaps
from analysis.runs import (RunsNotFoundError, cells, find_sweep, load_curves, load_num_classes, load_pretrain_run,
                           load_protect_runs, load_runs, parse_source_args, source_parser)
from analysis.summary import make_summary, write_summary

log = logging.getLogger(__name__)

ARTIFACT_PATH = "report"


def run_report(tracking_uri: str, experiment: str, out_dir: str | Path, sweep_id: str | None = None,
               log_to_parent: bool = True, num_classes: int | None = None) -> dict:
    """Write heatmaps, curves and summary.md for one sweep (default: the newest) into ``out_dir``.

    With ``log_to_parent`` the files are also logged to the sweep's parent run under ``report/``.
    ``num_classes=None`` reads model.num_classes from the sweep's logged spec (``load_num_classes``;
    below-chance counts are left out when it is not there). Returns {"sweep_id", "parent_run_id", "heatmaps", "curves",
    "summary", "artifacts"} (paths; artifacts = the artifact paths logged, [] when not logged).
    Raises RunsNotFoundError when the experiment, sweep or its runs are missing.
    """
    # Resolve the sweep once, so every table below reads the same sweep even if a new one starts meanwhile.
    sweep = find_sweep(tracking_uri, experiment, sweep_id)
    runs = load_runs(tracking_uri, experiment, sweep.sweep_id)
    cell_table = cells(runs)
    curves = load_curves(tracking_uri, runs["run_id"])
    title = f"{experiment} (sweep {sweep.sweep_id})"
    heatmaps = make_heatmaps(cell_table, out_dir, title)
    curve_paths = make_curves(runs, curves, out_dir, title)
    text = make_summary(cell_table, curves, load_protect_runs(tracking_uri, experiment, sweep.sweep_id),
                        load_pretrain_run(tracking_uri, experiment, sweep.sweep_id),
                        num_classes or load_num_classes(sweep), title)
    summary = write_summary(text, out_dir)
    artifacts = []
    if log_to_parent:
        client = MlflowClient(tracking_uri=tracking_uri)
        for path in [*heatmaps, *curve_paths, summary]:
            client.log_artifact(sweep.parent_run_id, str(path), artifact_path=ARTIFACT_PATH)
            artifacts.append(f"{ARTIFACT_PATH}/{path.name}")
        log.info("logged %d report files to parent run %s", len(artifacts), sweep.parent_run_id)
    return {"sweep_id": sweep.sweep_id, "parent_run_id": sweep.parent_run_id, "heatmaps": heatmaps,
            "curves": curve_paths, "summary": summary, "artifacts": artifacts}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the report into --out and log it to the parent run; returns the exit status."""
    parser = source_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count for below-chance counts (default: model.num_classes of the "
                             "sweep's logged spec)")
    parser.add_argument("--no-log", action="store_true", help="only write files; do not log them to MLflow")
    args = parse_source_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_report(args.tracking_uri, args.experiment, args.out, args.sweep_id,
                            log_to_parent=not args.no_log, num_classes=args.num_classes)
    except (RunsNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in [*result["heatmaps"], *result["curves"], result["summary"]]:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
