"""The MLflow screenshots in docs/ui.md, taken in headless Chromium from a running ``sophon-ray ui``.

    sophon-ray ui sweeps/quickstart.yaml --port 5000 &          # after `sophon-ray run sweeps/quickstart.yaml`
    python -m docs.screenshots --ui http://127.0.0.1:5000 --experiment quickstart --out docs/

Writes mlflow-experiment.png (the runs table, oldest first: the sweep's parent run expanded into pretrain, protect
and the attack trials, with their subject, strategy, optimizer, lr and final restricted accuracy), mlflow-trial-chart.png (one
evaluation attack on the protected model: its restricted_acc per epoch) and mlflow-report-artifacts.png (the
parent run's report/ artifacts, a heatmap shown). Needs a Chromium binary (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient

from sophon_ray import names
from tests.browser import Chromium, find_chromium, show_artifact, show_metric, show_runs

COLUMNS = ("Dataset", "Source", "Models",   # off: empty for these runs
           names.FINAL, names.SUBJECT, "strategy", "optimizer", "lr")


def pick_runs(ui: str, experiment: str) -> tuple[str, str, str]:
    """(experiment id, the newest sweep's parent run id, one protected evaluation trial's run id) via the UI's API.

    Raises LookupError naming what is missing."""
    client = MlflowClient(tracking_uri=ui)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no experiment {experiment!r} at {ui}")
    sweeps = client.search_runs([found.experiment_id], f"tags.`{names.ROLE}` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        raise LookupError(f"experiment {experiment!r} has no sweep run")
    parent = sweeps[0].info.run_id
    trials = client.search_runs(
        [found.experiment_id], f"tags.`{names.PARENT}` = '{parent}' and params.subject = 'protected' and "
        f"params.grid = '{names.EVALUATION}'", order_by=[f"metrics.{names.FINAL} DESC"], max_results=50)
    if not trials:
        raise LookupError(f"sweep run {parent} has no protected evaluation trial")
    # the protected model's best-resisted attack is dull; show the one that got furthest (its curve moves)
    return found.experiment_id, parent, trials[0].info.run_id


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the three screenshots; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m docs.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--ui", default="http://127.0.0.1:5000", help="a running `sophon-ray ui`")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--report-image", default="report/heatmap-direct-all.png",
                        help="the parent run's artifact to show")
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        print("error: no chromium binary. Fix: apt-get install chromium", file=sys.stderr)
        return 2
    experiment_id, parent, trial = pick_runs(args.ui, args.experiment)
    out = Path(args.out)
    with Chromium(binary, width=1600, height=1000) as browser:
        show_runs(browser, args.ui, experiment_id, COLUMNS, oldest_first=True)  # pretrain, protect, trials
        print(browser.screenshot(out / "mlflow-experiment.png"))
        show_metric(browser, args.ui, experiment_id, trial, names.RESTRICTED_ACC)
        print(browser.screenshot(out / "mlflow-trial-chart.png"))
        show_artifact(browser, args.ui, experiment_id, parent, args.report_image)
        print(browser.screenshot(out / "mlflow-report-artifacts.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
