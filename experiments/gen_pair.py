"""Precondition for the generation setting: does pretraining help a DDPM on an offline domain pair?

SOPHON's claim (non-fine-tunability) only means something where fine-tuning a *normal* (pretrained,
unprotected) model on the restricted domain beats training from scratch at the same budget. This script
measures that for the offline datasets, plain PyTorch, no Ray, every seed fixed:

1. pretrain ``--model`` (default unet-tiny) on the original domain with the DDPM loss (uniform t, Adam),
   printing the loss, the original- and restricted-domain test denoising error and the time per epoch;
2. for each fine-tuning recipe (``--recipes``, ``adam:LR`` or ``sgd:LR`` with momentum 0.9) and each
   fraction of the restricted training split (``--fractions``, stratified, seeded), fine-tune the normal
   model and a scratch model (the same initial weights the normal model started from, the same recipe) for
   ``--epochs`` epochs, printing the restricted test denoising error (mean over
   :data:`sophon_ray.diffusion.EVAL_TIMESTEPS`, fixed noise seed) after every epoch;
3. print a compact table: normal vs scratch per recipe, fraction and epoch, ``normal/scratch`` (below 0.9
   = pretraining helps by >= 10%), the per-timestep errors at the last epoch, the fine-tuned models'
   original-domain error, and wall times.

Usage: ``.venv/bin/python bench/gen_pair.py`` (shapes -> digits, 1 channel, 16 px, ~10-15 min on 2 quiet
cores); ``--original shapes_m`` for the textured pair; ``--smoke`` (tiny sizes, < 1 min) checks the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sophon_ray.data import batches, load_domain, stratified_subset
from sophon_ray.diffusion import (
    EVAL_TIMESTEPS, Denoiser, Schedule, build_denoiser, denoising_error, denoising_loss, mean_error,
)
from sophon_ray.spec import DomainSpec


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning optimizer: ``adam:LR`` or ``sgd:LR`` (momentum 0.9)."""

    optimizer: str
    lr: float

    @classmethod
    def parse(cls, text: str) -> Recipe:
        name, _, lr = text.partition(":")
        if name not in ("adam", "sgd") or not lr:
            raise argparse.ArgumentTypeError(f"recipe {text!r}: expected adam:LR or sgd:LR, e.g. adam:1e-3")
        return cls(name, float(lr))

    def build(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)

    def __str__(self) -> str:
        return f"{self.optimizer}:{self.lr:g}"


@dataclass
class Run:
    """One fine-tuning run: the restricted test error (mean over timesteps) before and after each epoch."""

    subject: str
    recipe: str
    fraction: float
    samples: int
    errors: list[float] = field(default_factory=list)      # index 0: before fine-tuning
    per_t: dict[int, float] = field(default_factory=dict)  # after the last epoch
    original_error: float = float("nan")                   # original-domain test error after the last epoch
    train_s: float = 0.0
    eval_s: float = 0.0


def domain(name: str, args: argparse.Namespace, train_size: int | None) -> DomainSpec:
    return DomainSpec(dataset=name, image_size=args.image_size, channels=args.channels, mean=(0.5,), std=(0.5,),
                      train_size=train_size, test_size=args.test_size, seed=args.seed)


def train_epoch(model: Denoiser, data: torch.utils.data.Dataset, optimizer: torch.optim.Optimizer,
                schedule: Schedule, batch_size: int, generator: torch.Generator) -> float:
    """One pass over ``data`` with the DDPM loss (uniform t); the mean batch loss."""
    model.train()
    losses = []
    for x, _ in batches(data, batch_size, generator=generator, shuffle=True):
        loss = denoising_loss(model, x, schedule, "uniform", generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return statistics.fmean(losses)


def evaluate(model: Denoiser, data: torch.utils.data.Dataset, schedule: Schedule, seed: int) -> dict[int, float]:
    return denoising_error(model, data, schedule, EVAL_TIMESTEPS, seed=seed)


def pretrain(init: Denoiser, o_train, o_test, r_test, schedule: Schedule, args: argparse.Namespace) -> Denoiser:
    model = copy.deepcopy(init)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.pretrain_lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    print(f"pretrain {args.model} on {args.original} ({len(o_train)} images), adam lr {args.pretrain_lr:g}, "
          f"batch {args.batch_size}")
    start = time.perf_counter()
    for epoch in range(1, args.pretrain_epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, o_train, optimizer, schedule, args.batch_size, generator)
        took = time.perf_counter() - t0
        o_err, r_err = mean_error(evaluate(model, o_test, schedule, args.seed)), \
            mean_error(evaluate(model, r_test, schedule, args.seed))
        print(f"  epoch {epoch}: loss {loss:.4f}  original test err {o_err:.4f}  restricted test err {r_err:.4f}"
              f"  ({took:.1f} s train)", flush=True)
    print(f"pretraining took {time.perf_counter() - start:.1f} s")
    return model


def finetune(start: Denoiser, subject: str, recipe: Recipe, fraction: float, data, r_test, o_test,
             schedule: Schedule, args: argparse.Namespace) -> Run:
    model = copy.deepcopy(start)
    optimizer = recipe.build(model)
    generator = torch.Generator().manual_seed(args.seed + 2)  # the same batches and noise for both subjects
    run = Run(subject, str(recipe), fraction, len(data))
    t0 = time.perf_counter()
    run.errors.append(mean_error(evaluate(model, r_test, schedule, args.seed)))
    run.eval_s += time.perf_counter() - t0
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        train_epoch(model, data, optimizer, schedule, args.batch_size, generator)
        t1 = time.perf_counter()
        per_t = evaluate(model, r_test, schedule, args.seed)
        run.errors.append(mean_error(per_t))
        run.train_s += t1 - t0
        run.eval_s += time.perf_counter() - t1
    run.per_t = per_t
    run.original_error = mean_error(evaluate(model, o_test, schedule, args.seed))
    errs = " ".join(f"{e:.4f}" for e in run.errors)
    print(f"  {subject:7s} {recipe} frac {fraction:g} (n={len(data)}): err by epoch {errs}; original "
          f"{run.original_error:.4f}; {run.train_s:.1f} s train + {run.eval_s:.1f} s eval", flush=True)
    return run


def table(runs: list[Run], epochs: int) -> str:
    """Normal vs scratch per (recipe, fraction): errors after each epoch and normal/scratch."""
    by_key = {(r.recipe, r.fraction, r.subject): r for r in runs}
    keys = sorted({(r.recipe, r.fraction) for r in runs}, key=lambda k: (k[0], k[1]))
    lines = ["| recipe | fraction (n) | epoch | normal err | scratch err | normal/scratch |",
             "|---|---|---|---|---|---|"]
    for recipe, fraction in keys:
        normal, scratch = by_key[(recipe, fraction, "normal")], by_key[(recipe, fraction, "scratch")]
        for epoch in range(1, epochs + 1):
            n, s = normal.errors[epoch], scratch.errors[epoch]
            lines.append(f"| {recipe} | {fraction:g} ({normal.samples}) | {epoch} | {n:.4f} | {s:.4f} | {n / s:.3f} |")
    lines += ["", "last epoch, per timestep (normal / scratch):", ""]
    header = " | ".join(f"t={t}" for t in EVAL_TIMESTEPS)
    lines += [f"| recipe | fraction | {header} | original-domain err (normal / scratch) |",
              "|---|---|" + "---|" * len(EVAL_TIMESTEPS) + "---|"]
    for recipe, fraction in keys:
        normal, scratch = by_key[(recipe, fraction, "normal")], by_key[(recipe, fraction, "scratch")]
        cells = " | ".join(f"{normal.per_t[t]:.3f} / {scratch.per_t[t]:.3f}" for t in EVAL_TIMESTEPS)
        lines.append(f"| {recipe} | {fraction:g} | {cells} | {normal.original_error:.3f} / "
                     f"{scratch.original_error:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", default="shapes", help="original (pretraining) domain: shapes or shapes_m")
    p.add_argument("--restricted", default="digits", help="restricted domain (default digits)")
    p.add_argument("--model", default="unet-tiny", help="a sophon_ray.diffusion.DENOISERS preset")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--original-train-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=None, help="cap on each test split (default: all)")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--recipes", type=Recipe.parse, nargs="+",
                   default=[Recipe("adam", 1e-3), Recipe("sgd", 0.01), Recipe("sgd", 0.05)])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--T", type=int, default=1000, help="diffusion steps of the linear schedule")
    p.add_argument("--threads", type=int, default=1, help="torch threads (trial workers use 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, numbers mean nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.original_train_size, args.test_size, args.pretrain_epochs, args.epochs = 256, 64, 1, 1
        args.fractions, args.recipes = [0.1], [Recipe("adam", 1e-3)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    schedule = Schedule.linear(args.T)
    o_train, o_test = load_domain(domain(args.original, args, args.original_train_size))
    r_train, r_test = load_domain(domain(args.restricted, args, None))
    print(f"{args.original} -> {args.restricted}, {args.channels} channel(s), {args.image_size} px, "
          f"eval timesteps {EVAL_TIMESTEPS}, threads {args.threads}")
    torch.manual_seed(args.seed)
    init = build_denoiser(args.model, args.channels, args.image_size)
    print(f"{args.model}: {sum(p.numel() for p in init.parameters()):,} parameters")
    normal = pretrain(init, o_train, o_test, r_test, schedule, args)
    runs: list[Run] = []
    for recipe in args.recipes:
        for fraction in args.fractions:
            data = stratified_subset(r_train, fraction, args.seed)
            for subject, start in (("normal", normal), ("scratch", init)):
                runs.append(finetune(start, subject, recipe, fraction, data, r_test, o_test, schedule, args))
    print()
    print(table(runs, args.epochs))
    train_s = sum(r.train_s for r in runs)
    eval_s = sum(r.eval_s for r in runs)
    print(f"\nfine-tuning: {len(runs)} runs, {train_s:.1f} s training + {eval_s:.1f} s evaluation; "
          f"whole script {time.perf_counter() - wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
