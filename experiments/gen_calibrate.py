"""Choose generation-protection settings on the development protocol of a generation spec (default: the generation
quickstart): pretrain once, then per candidate protect and attack with two development recipes on the protector's
restricted share, scored on restricted *validation* data; normal and scratch get the same attacks. Never reads
the restricted test split or the evaluation grid. Plain PyTorch, one process, no Ray or MLflow.

    python experiments/gen_calibrate.py '{"u-a1": {"alpha": 1, "ntr_steps": 4}, "one-a1": {"alpha": 1, "suppression_t": "one"}}'

Each candidate is a dict of ``protect[0]`` fields to change, plus ``suppression_t`` (the generation timestep
policy). Prints one line per candidate: seconds, original validation skill (normal's beside it), restricted
validation skill before the attack, after each development attack, rollbacks and the selected iteration."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from sophon_ray.core.attack import AttackConfig, finetune, scratch_model
from sophon_ray.run.checkpoint import initial_model
from sophon_ray.core.data import make_splits
from sophon_ray.core.protection import protect
from sophon_ray.modes import task_for
from sophon_ray.core.training import pretrain
from sophon_ray.run.validate import load_spec

REPO = Path(__file__).resolve().parents[1]
DEV = [AttackConfig("direct-all", "adam", 1e-3, 32, epochs=4, data_fraction=0.5),
       AttackConfig("direct-all", "momentum", 1e-2, 32, epochs=4, data_fraction=0.5)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", help='JSON: {"name": {protect[0] field: value, ..., "suppression_t": policy}, ...}')
    p.add_argument("spec", nargs="?", default=str(REPO / "sweeps" / "quickstart_generation.yaml"),
                   help="the generation spec (default: sweeps/quickstart_generation.yaml)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    spec = load_spec(args.spec)
    task = task_for(spec)
    splits = make_splits(spec)
    t0 = time.time()
    normal, _ = initial_model(spec)
    pretrain(normal, splits.original_train, splits.original_val, spec.pretrain, spec.seed, task=task)
    print(f"pretrain {time.time() - t0:.0f}s", flush=True)
    nval = task.evaluate(normal, splits.original_val).score

    def attack(model, scratch=False):
        out = []
        for cfg in DEV:
            m = scratch_model(model, 0) if scratch else model
            out.append(finetune(m, splits.restricted_train[0], splits.restricted_val[0], cfg, task=task).final)
        return out

    base = {"normal": attack(normal), "scratch": attack(normal, True)}
    print("normal", base, "orig", nval, flush=True)
    v = spec.protect[0]
    cands = {k: dict(x) for k, x in json.loads(args.candidates).items()}
    for name, change in cands.items():
        gen = change.pop("suppression_t", "uniform")
        t = task_for(dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, suppression_t=gen)))
        vs = dataclasses.replace(v, **change)
        t1 = time.time()
        res = protect(normal, splits.original_train, splits.original_val, splits.restricted_train,
                      splits.restricted_val, vs, nval, task=t)
        o = t.evaluate(res.model, splits.original_val).score
        r0 = t.evaluate(res.model, splits.restricted_val[0]).score
        print(name, gen, change, f"{time.time() - t1:.0f}s | orig {o:.1f} (normal {nval:.1f}) | restricted before "
              f"attack {r0:.1f} | after dev attacks {[round(x, 1) for x in attack(res.model)]} | rollbacks "
              f"{len(res.rollbacks)} sel {res.selected_iteration}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
