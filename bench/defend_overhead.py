"""Defender trial overhead: a candidate of a finished defender search (Tune trial -> Ray Train job -> protection ->
development attacks, as ``sophon-ray run`` ran it; Tune's own ``time_total_s`` of the trial) against the same
protection and the same development attacks run directly in one process with the same threads (no Ray), from the
same normal model. Also the search's candidates per hour and how many candidates ASHA stopped early.

Run the search first (``sophon-ray run sweeps/defend_quickstart.yaml``), then, in the same working directory:
``.venv/bin/python bench/defend_overhead.py sweeps/defend_quickstart.yaml [--candidate N] [--set K=V ...]`` (N: the
candidate's place in the search, default the first feasible one that ran to the end; ``--set``: the overrides the
run was given).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from analysis.defend import load_defends
from analysis.runs import find_sweep
from sophon_ray import names
from sophon_ray.core.data import make_splits
from sophon_ray.core.metrics import chance
from sophon_ray.modes import task_for
from sophon_ray.run.checkpoint import load_checkpoint
from sophon_ray.run.defend import candidate, decode
from sophon_ray.run.development import development_best, development_data, red_team_search
from sophon_ray.run.keys import pretrain_key, sweep_id
from sophon_ray.run.plan import development_configs
from sophon_ray.run.tracking import resolve_uri
from sophon_ray.run.train_driver import jobs_dir, protect_job
from sophon_ray.run.train_worker import protect_variant
from sophon_ray.run.validate import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--candidate", type=int, default=None)
    parser.add_argument("--variant", default=None, help="the defended variant (default: the first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the run's own overrides")
    args = parser.parse_args()
    spec = load_spec(args.spec, args.set)
    index = next(i for i, v in enumerate(spec.protect) if v.defend and args.variant in (None, v.label))
    variant = spec.protect[index]
    sweep = find_sweep(resolve_uri(spec.tracking.uri), spec.name, sweep_id(spec))
    defends = load_defends(sweep)
    parent = defends.variants.loc[defends.variants["variant"] == variant.label, "run_id"].iloc[0]
    runs = defends.candidates[defends.candidates["parent"] == parent]
    round_ = runs["param:round"].astype(int) if "param:round" in runs else 1
    runs = runs[round_ == 1]   # a later round's candidate simulates the red team's finds of the rounds before it
    full = runs[(runs[names.STOPPED] != 1.0) & (runs[names.FEASIBLE] == 1.0)]   # a candidate that ran its attacks
    row = runs.iloc[args.candidate - 1] if args.candidate else full.iloc[0]
    params = {k[6:]: row[k] for k in runs.columns if k.startswith("param:") and k[6:] not in ("candidate", "round")
              and isinstance(row[k], str)}
    space = variant.defend.space
    values = {**space.fixed(), **{k: decode(v) for k, v in params.items()}}
    chosen = candidate(variant, values, variant.defend.seed)
    threads = int(max(1, spec.resources.cpus_per_trial))
    torch.set_num_threads(threads)
    task = task_for(spec)
    normal, card = load_checkpoint(spec.out / "checkpoints" / jobs_dir("pretrain", "normal", pretrain_key(spec)))
    splits = make_splits(spec)
    one = replace(spec, protect=(chosen,))
    normal_val = card["metrics"][task.metric.key("original_val")]
    t0 = time.perf_counter()
    model, metrics, _ = protect_variant(one, normal, splits, protect_job(one, 0, chosen.seeds[0], "bench"), normal_val)
    protect_s = time.perf_counter() - t0
    floor = chance(card["num_classes"])
    drop = normal_val - metrics[task.metric.key("original_val")]
    worst, red = float("nan"), variant.defend.red_team
    if drop <= variant.defend.guard:   # as the trial: an infeasible candidate is not attacked
        data = development_data(splits)
        worst = development_best(model, development_configs(spec), data, task, floor)
        if red is not None:   # and its red team, whose best counts too
            worst = max(worst, max(score for _, score in red_team_search(model, red, data, task, floor)))
    direct_s = time.perf_counter() - t0
    trial_s = float(row.get("time_total_s", float("nan")))
    started = runs["start"].min() / 1000.0
    out = {"variant": variant.label, "candidate": int(row["n"]), "iterations": chosen.iterations, "direct_protect_s": round(protect_s, 1),
           "direct_protect_and_attacks_s": round(direct_s, 1), "defender_trial_s": round(trial_s, 1),
           "ratio": round(trial_s / direct_s, 3), "direct_worst_case": round(worst, 2),
           "trial_worst_case": round(float(row[names.DEV_WORST_CASE]), 2),
           "candidates": len(runs), "stopped_by_asha": int((runs[names.STOPPED] == 1.0).sum()),
           "candidate_trial_s": [round(float(v), 1) for v in runs.get("time_total_s", [])],
           "search_span_s": round(runs["end"].max() / 1000.0 - started, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
