"""A small finished sweep in a real MLflow SQLite store, logged through ``Tracker`` in the orchestrator's layout
(parent run, pretrain, protect and attack children with per-epoch curves) with its report on the parent run:
what ``sophon-ray ui`` and the browser test look at, built in seconds without Ray or torch."""

from __future__ import annotations

from pathlib import Path

import yaml

from analysis.report import run_report
from sophon_ray import names
from sophon_ray.run.tracking import Tracker

SWEEP_ID = "0123456789ab"
OPTIMIZERS = ("sgd", "adam")
LRS = (0.001, 0.01)
BASE = {"protected": [10.0, 11.0, 12.0, 12.0, 13.0], "normal": [10.0, 60.0, 75.0, 82.0, 85.0],
        "scratch": [10.0, 30.0, 45.0, 55.0, 60.0]}


def small_sweep(root: Path, experiment: str = "ui-test") -> dict:
    """Log the sweep into ``sqlite:///<root>/mlflow.db`` and its report into ``<root>/report``.

    Returns {"uri", "experiment", "experiment_id", "parent", "attacks" (run ids), "report" (run_report's ReportResult),
    "root", "spec" (``<root>/sweep.yaml``: the experiment's name and this store, for ``sophon-ray ui SPEC``)}."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri, experiment)
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"name": experiment, "model": {"arch": "convnet", "num_classes": 10}}))
    parent = tracker.sweep_run(SWEEP_ID, f"sweep-{SWEEP_ID}", spec_file)
    pretrain = tracker.child_run(parent, SWEEP_ID, "pretrain", "pretrain", "pretrain")
    tracker.log_metrics(pretrain, {"original_val_acc": 96.0, "original_test_acc": 95.0})
    tracker.finish(pretrain)
    protect = tracker.child_run(parent, SWEEP_ID, "protect", "protect-0", "protect/ice-sampled/s0",
                                {names.VARIANT: "ice-sampled", "loss": "ice", names.PROTECT_SEED: 0})
    tracker.log_rows(protect, [(i, {"fts_loss": 2.3 - 0.1 * i, "ntr_loss": 0.5 - 0.05 * i}) for i in range(5)])
    tracker.log_metrics(protect, {"original_val_acc": 94.0, "original_test_acc": 93.5, "intactness_drop": 1.5,
                                  "probe_acc": 11.0, "selected_iteration": 4, "rollbacks": 0})
    tracker.finish(protect)
    attacks = []
    for subject, curve in BASE.items():
        for i, optimizer in enumerate(OPTIMIZERS):
            for j, lr in enumerate(LRS):
                values = [v + 2 * i + j for v in curve]
                params = {names.SUBJECT: subject, names.VARIANT: "ice-sampled" if subject == "protected" else "-",
                          names.PROTECT_SEED: 0 if subject == "protected" else -1, names.GRID: names.EVALUATION,
                          names.DOMAIN: "shapes_m", names.DATA_POOL: "disjoint", "strategy": "direct-all",
                          "optimizer": optimizer, "lr": lr, "batch_size": 64, "data_fraction": 0.1,
                          "schedule": "constant", "epochs": len(values) - 1, "weight_decay": 0.0, "seed": 0}
                name = f"eva/shapes_m/{subject}/direct-all/{optimizer}/lr{lr:g}/s0"
                run = tracker.child_run(parent, SWEEP_ID, "attack", name, name, params)
                tracker.log_rows(run, [(epoch, {names.RESTRICTED_ACC: v, names.RESTRICTED_LOSS: 3.0 - v / 50})
                                       for epoch, v in enumerate(values)])
                tracker.log_metrics(run, {names.FINAL: values[-1], names.BEST: max(values), names.ORIGINAL_ACC: 90.0})
                tracker.finish(run)
                attacks.append(run)
    report = run_report(uri, experiment, root / "report", sweep_id=SWEEP_ID)
    tracker.finish(parent)
    spec = root / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": experiment, "tracking": {"uri": uri}}))
    return {"uri": uri, "experiment": experiment, "experiment_id": tracker.experiment_id, "parent": parent,
            "attacks": attacks, "report": report, "root": root, "spec": spec}
