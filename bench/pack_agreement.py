"""How far packed trials' curves are from the same trials run alone, read from two finished runs' MLflow stores.

Compares every run name the two SQLite stores share (the sweep's grid trials; the parent's stage timers are left
out): per trial, the first epoch at which its ``restricted_loss`` curve leaves ``--tolerance`` (1e-4, the packing
tests' bound) and the absolute difference of its last ``restricted_acc``; per optimizer and lr (read from the
trial's name), how many trials leave the band. Trials that ran alone in both runs (``adapt``, ``warm_start``) show
whether the unpacked path itself is deterministic.

Usage: ``.venv/bin/python bench/pack_agreement.py UNPACKED/mlflow.db PACKED/mlflow.db`` (the two stores
``bench/packed_stage.py`` keeps in its working directory); prints one JSON line. See bench/float_paths.py for how
far the same trial moves on another float path without packing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.runs import load_curves  # noqa: E402

OPTIMIZER_LR = re.compile(r"/(?P<optimizer>sgd|momentum|nesterov|adamw|adam|rmsprop|adagrad)/lr(?P<lr>[^/]+)/")
ALONE = ("adapt=", "warm_start=")


def curves(store: Path) -> dict[str, dict[str, list[float]]]:
    """run name -> metric -> its values by epoch (``analysis.runs.load_curves``: a retried step keeps its latest
    value), for every run of the store that logged a loss curve."""
    import mlflow  # noqa: PLC0415

    uri = f"sqlite:///{store}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    names = dict(zip(runs["run_id"], runs["tags.mlflow.runName"]))
    metrics = {key: load_curves(uri, names, key) for key in ("restricted_loss", "restricted_acc")}
    return {name: {key: metrics[key][run_id] for key in metrics}
            for run_id, name in names.items() if metrics["restricted_loss"][run_id]}


def first_departure(a: list[float], b: list[float], tolerance: float) -> int | None:
    """The first epoch at which the two curves differ by more than ``tolerance`` (None: never)."""
    return next((epoch for epoch, (u, v) in enumerate(zip(a, b)) if abs(u - v) > tolerance), None)


def agreement(unpacked: Path, packed: Path, tolerance: float = 1e-4) -> dict:
    """The figures above, for the trials both stores hold."""
    a, b = curves(unpacked), curves(packed)
    names = sorted(set(a) & set(b))
    departures = {n: first_departure(a[n]["restricted_loss"], b[n]["restricted_loss"], tolerance) for n in names}
    finals = {n: abs(a[n]["restricted_acc"][-1] - b[n]["restricted_acc"][-1])
              for n in names if a[n]["restricted_acc"] and b[n]["restricted_acc"]}
    left = [n for n, d in departures.items() if d is not None]
    by_recipe, total = Counter(), Counter()
    for n in names:
        m = OPTIMIZER_LR.search(n)
        recipe = f"{m['optimizer']} {m['lr']}" if m else "other"
        total[recipe] += 1
        by_recipe[recipe] += n in left
    alone = [n for n in names if any(t in n for t in ALONE)]
    values = sorted(finals.values())
    return {"tolerance": tolerance, "trials": len(names), "curve_leaves_tolerance": len(left),
            "first_departure_epochs": dict(sorted(Counter(departures[n] for n in left).items())),
            "final_acc_abs_diff": {"median": statistics.median(values), "p90": values[int(0.9 * len(values))],
                                   "p99": values[int(0.99 * len(values))], "max": values[-1],
                                   "over_1_point": sum(v > 1 for v in values)} if values else {},
            "alone_in_both": len(alone), "alone_leaving_tolerance": sum(n in left for n in alone),
            "leaving_by_optimizer_lr": {k: f"{by_recipe[k]}/{total[k]}" for k in sorted(total)}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("unpacked", type=Path, help="the attack.pack 1 run's mlflow.db")
    parser.add_argument("packed", type=Path, help="the packed run's mlflow.db")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    for store in (args.unpacked, args.packed):
        if not store.is_file() or store.stat().st_size == 0:
            parser.error(f"{store}: no MLflow store there; give a finished run's mlflow.db (bench/packed_stage.py "
                         "keeps each run's in its working directory)")
    payload = agreement(args.unpacked, args.packed, args.tolerance)
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
