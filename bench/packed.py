"""Packed attack trials (``sophon_ray.core.packed.finetune_pack``) vs sequential ``finetune`` calls, on the CPU.

For each pack size N (``--members``): N attack configs of one pack shape (one strategy, optimizer, batch size,
epochs; each member its own seed, hence its own data order and subset, and its own lr) run as N sequential
``finetune`` calls and as one ``finetune_pack`` call per formulation (``--formulations``: ``grouped``, the members as
one wide model, and ``vmap``, torch.vmap over functional_call). Each contender is timed whole (member preparation,
training, per-epoch evaluation of the test split), in rotating order over ``--rounds`` rounds after one warm-up
round (``harness.interleave``); the figure is the wall time per member (median over rounds) and the speed-up of each
formulation over the sequential calls (the median of the per-round ratios).

The subject is ``--arch`` built as the sweeps build it (channels-last), untrained: the timing does not depend on
the weights. Prints one JSON line (the settings, the load average before and after, and per N the seconds per
member and the speed-ups).

Usage: ``.venv/bin/python bench/packed.py`` (about a minute on 2 quiet cores); ``--smoke`` for a few seconds.
Numbers measured while other work shares the cores (see ``load_before`` / ``load_after``) are indicative only: a
busy machine slows whichever contender runs during a burst, and one thread per process is what a Tune trial gets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from sophon_ray.core.attack import finetune  # noqa: E402
from sophon_ray.core.data import load_domain  # noqa: E402
from sophon_ray.core import packed as packed_module  # noqa: E402
from sophon_ray.core.packed import INITIAL_EVALUATIONS, finetune_pack  # noqa: E402
from sophon_ray.modes import build_model  # noqa: E402
from sophon_ray.modes.classification.task import CLASSIFICATION  # noqa: E402
from sophon_ray.recipes import AttackConfig  # noqa: E402
from sophon_ray.spec import DomainSpec, ModelSpec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32], help="pack sizes N")
    parser.add_argument("--formulations", nargs="+", default=["grouped", "vmap"], choices=["grouped", "vmap"])
    parser.add_argument("--arch", default="convnet")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=320, help="the attacker's training samples")
    parser.add_argument("--test-size", type=int, default=200, help="evaluated after every epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--optimizer", default="momentum")
    parser.add_argument("--strategy", default="direct-all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Tune trial gets 1)")
    parser.add_argument("--unfolded", action="store_true", help="also time grouped packs whose evaluation keeps "
                        "its BatchNorms (core.packed.folded_batch_norms off): the fold's own gain")
    parser.add_argument("--mixed-formats", action="store_true", help="also time grouped packs whose training lets "
                        "the gradient arrive contiguous at channels-last activations (core.packed.FORMAT_EXITS "
                        "empty): the gradient format guard's own gain")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.members, args.train_size, args.test_size, args.epochs, args.rounds = [1, 4], 64, 40, 1, 1
    return args


def configs(args: argparse.Namespace, n: int) -> list[AttackConfig]:
    """N configs of one pack shape: seeds 0..N-1, lrs spread over a decade."""
    return [AttackConfig(strategy=args.strategy, optimizer=args.optimizer, batch_size=args.batch_size,
                         epochs=args.epochs, lr=0.01 * 10 ** (i / max(1, n - 1) - 0.5), seed=i) for i in range(n)]


def contenders(args: argparse.Namespace, n: int, model: torch.nn.Module, train, test) -> dict[str, Callable[[], float]]:
    members = configs(args, n)

    def sequential() -> float:
        start = harness.now()
        for config in members:
            finetune(model, train, test, config, task=CLASSIFICATION)
        return (harness.now() - start) / n

    def pack(formulation: str) -> Callable[[], float]:
        def run() -> float:
            INITIAL_EVALUATIONS.clear()   # as a fresh process: no epoch-0 evaluation kept from an earlier repeat
            start = harness.now()
            finetune_pack(model, train, test, members, task=CLASSIFICATION, formulation=formulation)
            return (harness.now() - start) / n
        return run

    def grouped_without(name: str, replacement: object) -> Callable[[], float]:
        """A grouped pack with one of core.packed's optimisations (the module attribute ``name``) replaced."""
        def run() -> float:
            kept = getattr(packed_module, name)
            setattr(packed_module, name, replacement)
            try:
                return pack("grouped")()
            finally:
                setattr(packed_module, name, kept)
        return run

    ablations = {"grouped-unfolded": (args.unfolded, "folded_batch_norms",
                                      lambda layers, params, buffers: (params, layers)),
                 "grouped-mixed-formats": (args.mixed_formats, "FORMAT_EXITS", ())}
    return {"sequential": sequential, **{f: pack(f) for f in args.formulations},
            **{label: grouped_without(name, value) for label, (on, name, value) in ablations.items() if on}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    train, test = load_domain(DomainSpec("shapes", args.image_size, train_size=args.train_size,
                                         test_size=args.test_size))
    torch.manual_seed(0)
    model = build_model(ModelSpec(args.arch, 10), 3, args.image_size)
    rows = []
    for n in args.members:
        samples = harness.interleave(contenders(args, n, model, train, test), args.rounds)
        per_member = {name: statistics.median(s) for name, s in samples.items()}
        speedup = {f: statistics.median(harness.paired_ratios(samples["sequential"], samples[f]))
                   for f in samples if f != "sequential"}
        rows.append({"members": n, "seconds_per_member": {k: round(v, 5) for k, v in per_member.items()},
                     "speedup_vs_sequential": {k: round(v, 3) for k, v in speedup.items()}})
    payload = {"name": "packed", "smoke": args.smoke, "threads": args.threads, "nproc": os.cpu_count(),
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
               "torch": torch.__version__,
               "settings": {k: getattr(args, k) for k in ("arch", "image_size", "train_size", "test_size",
                                                          "batch_size", "epochs", "optimizer", "strategy", "rounds")},
               "results": rows}
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
