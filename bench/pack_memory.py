"""What one more member of a pack costs in memory, against the estimate ``attack.pack: auto`` sizes GPU packs by.

``sophon_ray.run.packing.member_bytes`` estimates a member's memory (its parameters' state and its training batch's
activations with their gradients) from the model's footprint; ``auto`` fits GPU packs to the trial's share of GPU
memory with it. No GPU here: this measures the same tensors on the CPU. For each case (architecture, image size,
batch) one fresh process per pack size runs one ``finetune_pack`` (one epoch, 1 thread; the grouped formulation where
the model allows it, else vmap) and reports its peak RSS (``ru_maxrss``) above its RSS just before the call. The
marginal cost of a member is the difference between the largest and the smallest pack over their difference in
members; the ratio estimate / measured says whether the estimate errs high (packs smaller than they could be) or low
(packs that may not fit). CPU kernels keep other workspaces than cuDNN's, so this checks the estimate's activation
term, not a GPU's total.

Usage: ``.venv/bin/python bench/pack_memory.py`` (about 2 minutes); ``--smoke`` for seconds. Prints a table and one
JSON line (not collected).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import MIB, driver_peak_rss  # noqa: E402

CASES = ["convnet:16:32", "convnet:16:128", "convnet:32:128", "resnet18:16:32"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, help="ARCH:IMAGE_SIZE:BATCH_SIZE")
    parser.add_argument("--members", type=int, nargs=2, default=[2, 8], metavar=("SMALL", "LARGE"))
    parser.add_argument("--steps", type=int, default=4, help="training steps of the epoch")
    parser.add_argument("--child", nargs=4, metavar=("ARCH", "IMAGE", "BATCH", "MEMBERS"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="one small case: checks the script only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.members, args.steps = ["convnet:8:16"], [1, 2], 2
    return args


def child(arch: str, image: int, batch: int, members: int, steps: int) -> None:
    """One ``finetune_pack`` of ``members`` configs; prints ``{"before": RSS, "peak": peak RSS}`` in bytes."""
    import torch

    from sophon_ray.core.data import load_domain
    from sophon_ray.core.packed import finetune_pack
    from sophon_ray.modes import build_model
    from sophon_ray.modes.classification.task import CLASSIFICATION
    from sophon_ray.recipes import AttackConfig
    from sophon_ray.spec import DomainSpec, ModelSpec

    torch.set_num_threads(1)
    train, test = load_domain(DomainSpec("shapes", image, train_size=batch * steps, test_size=32))
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, 10, channels_last=True), 3, image)
    configs = [AttackConfig(strategy="direct-all", optimizer="adam", batch_size=batch, epochs=1, lr=1e-3, seed=i)
               for i in range(members)]
    before = psutil.Process().memory_info().rss
    finetune_pack(model, train, test, configs, task=CLASSIFICATION)
    print(json.dumps({"before": before, "peak": driver_peak_rss()}))


def measured(case: str, members: int, steps: int) -> int:
    """The pack's peak RSS above the RSS before it, in a fresh process."""
    arch, image, batch = case.split(":")
    out = subprocess.run([sys.executable, __file__, "--child", arch, image, batch, str(members), "--steps",
                          str(steps)], capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    return row["peak"] - row["before"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        arch, image, batch, members = args.child
        child(arch, int(image), int(batch), int(members), args.steps)
        return {}
    from sophon_ray.core.packed import footprint
    from sophon_ray.modes import build_model
    from sophon_ray.run.packing import member_bytes
    from sophon_ray.spec import ModelSpec

    small, large = args.members
    rows = []
    print("| case | estimate MiB a member | measured MiB a member | estimate / measured | pack peak MiB "
          f"({small} / {large} members) |\n|---|---:|---:|---:|---|")
    for case in args.cases:
        arch, image, batch = case.split(":")
        model = footprint(build_model(ModelSpec(arch, 10), 3, int(image)), 3, int(image))
        estimate = member_bytes(int(batch), model)
        peaks = {n: measured(case, n, args.steps) for n in (small, large)}
        per_member = (peaks[large] - peaks[small]) / (large - small)
        rows.append({"case": case, "estimate": estimate, "per_member": per_member, "peaks": peaks,
                     "footprint": model.__dict__})
        ratio = f"{estimate / per_member:.2f}" if per_member > 0 else "-"
        print(f"| {case} | {estimate / MIB:.1f} | {per_member / MIB:.1f} | {ratio} | "
              f"{peaks[small] / MIB:.0f} / {peaks[large] / MIB:.0f} |")
    payload = {"name": "pack_memory", "smoke": args.smoke, "members": args.members, "steps": args.steps,
               "rows": rows}
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
