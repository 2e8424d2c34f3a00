"""Protection state checkpoint overhead on the quickstart's protection, in one process (no Ray): seconds to write
one state checkpoint (``protection.save_state``, what every Ray Train worker writes before its report) and its size
on disk, against the seconds of the iterations between two checkpoints. The model is the quickstart's convnet at
its seeded init (a checkpoint's size and write time do not depend on the values; its accuracy is the floor's base).

Usage: .venv/bin/python bench/checkpoint_overhead.py [--iterations 110] [--every 50]; ``--smoke`` (4 iterations, a
checkpoint every 2, ~10 s) checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sophon_ray.run.checkpoint import initial_model
from sophon_ray.core.data import make_splits
from sophon_ray.core.protection import protect, save_state
from sophon_ray.core.training import evaluate
from sophon_ray.run.validate import load_spec
from sophon_ray.modes.classification.task import CLASSIFICATION

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=110)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="4 iterations, a checkpoint every 2: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.iterations, args.every = 4, 2
    torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_trial 1
    spec = load_spec(REPO / "sweeps" / "quickstart.yaml", [f"protect.0.iterations={args.iterations}",
                                                          f"protect.0.checkpoint_every={args.every}"])
    splits = make_splits(spec)
    model, _ = initial_model(spec)
    rows: list[tuple[int, float, int, int]] = []
    marks: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def checkpoint(state) -> None:
            marks[state.iteration] = time.perf_counter()
            folder = Path(tmp) / str(state.iteration)
            t0 = time.perf_counter()
            save_state(state, folder)
            seconds = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in folder.iterdir())
            rows.append((state.iteration, seconds, size, len(state.shared["candidates"])))

        start = time.perf_counter()
        protect(model, splits.original_train, splits.original_val, splits.restricted_train, splits.restricted_val,
                spec.protect[0], evaluate(model, splits.original_val, task=CLASSIFICATION).score, on_checkpoint=checkpoint,
                task=CLASSIFICATION)
        wall = time.perf_counter() - start
    saving = sum(r[1] for r in rows)
    per_iteration = (wall - saving) / args.iterations
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    print(f"quickstart protection ({spec.protect[0].label}), {args.iterations} iterations, a state checkpoint every "
          f"{args.every}; {per_iteration:.3f} s per iteration (probes included); model weights {weights / 2**20:.2f} MiB")
    print("| iteration | candidates held | write s | size MiB | write / the iterations since the last checkpoint |")
    print("|---|---|---|---|---|")
    for it, seconds, size, candidates in rows:
        print(f"| {it} | {candidates} | {seconds:.3f} | {size / 2**20:.2f} | "
              f"{100 * seconds / (args.every * per_iteration):.2f}% |")


if __name__ == "__main__":
    main()
