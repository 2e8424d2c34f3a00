"""Precondition for the generation setting: does pretraining help a DDPM on an offline domain pair?

SOPHON's claim (non-fine-tunability) only means something where fine-tuning a *normal* (pretrained,
unprotected) model on the restricted domain beats training from scratch at the same budget. This script
measures that for the offline datasets with the project's own loops (``sophon_ray.core.training.pretrain`` and the
attacker's ``sophon_ray.core.attack.finetune``, generation task), no Ray, every seed fixed:

1. pretrain ``--model`` (default unet-tiny) on the original domain with the DDPM loss (uniform t, Adam),
   printing each epoch's loss and original- and restricted-domain test denoising error, and its time;
2. for each fine-tuning recipe (``--recipes``, ``OPTIMIZER:LR`` with one of the project's optimizers, e.g.
   ``adam:1e-3`` or ``momentum:0.01`` = SGD with momentum 0.9) and each fraction of the restricted training split
   (``--fractions``, stratified, seeded), fine-tune the normal model and a scratch model (the same initial weights
   the normal model started from, the same recipe, batches and noise; the ``direct-all`` strategy) for
   ``--epochs`` epochs, printing the restricted test denoising error (mean over
   :data:`sophon_ray.modes.generation.ddpm.EVAL_TIMESTEPS`, fixed noise seed) after every epoch;
3. print a compact table: normal vs scratch per recipe, fraction and epoch, ``normal/scratch`` (below 0.9
   = pretraining helps by >= 10%), the per-timestep errors at the last epoch, the fine-tuned models'
   original-domain error, and wall times.

Usage: ``.venv/bin/python experiments/gen_pair.py`` (shapes -> digits, 1 channel, 16 px, ~10-15 min on 2 quiet
cores); ``--original shapes_m`` for the textured pair; ``--smoke`` (tiny sizes) checks the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sophon_ray.core.attack import AttackConfig, finetune
from sophon_ray.core.data import load_domain
from sophon_ray.modes.generation.ddpm import EVAL_TIMESTEPS, Schedule
from sophon_ray.modes.generation.unet import build_denoiser
from sophon_ray.modes.generation.task import Generation
from sophon_ray.spec import DomainSpec, GenerationSpec, PretrainSpec
from sophon_ray.core.training import OPTIMIZERS, pretrain


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning optimizer of the project's registry and its learning rate: ``adam:1e-3``, ``momentum:0.01``."""

    optimizer: str
    lr: float

    @classmethod
    def parse(cls, text: str) -> Recipe:
        name, _, lr = text.partition(":")
        if name not in OPTIMIZERS.names() or not lr:
            raise argparse.ArgumentTypeError(f"recipe {text!r}: expected OPTIMIZER:LR with OPTIMIZER one of "
                                             f"{', '.join(OPTIMIZERS.names())}, e.g. adam:1e-3")
        return cls(name, float(lr))

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
    seconds: float = 0.0                                   # fine-tuning with its per-epoch evaluations


def domain(name: str, args: argparse.Namespace, train_size: int | None) -> DomainSpec:
    return DomainSpec(dataset=name, image_size=args.image_size, channels=args.channels, mean=(0.5,), std=(0.5,),
                      train_size=train_size, test_size=args.test_size, seed=args.seed)


def error(skill: float) -> float:
    """The denoising MSE behind a generation score (skill = 100 x (1 - MSE))."""
    return 1.0 - skill / 100.0


def run_pretrain(model: torch.nn.Module, o_train, o_test, r_test, task: Generation,
                 args: argparse.Namespace) -> None:
    """``sophon_ray.core.training.pretrain`` in place, printing each epoch's loss and test errors."""
    print(f"pretrain {args.model} on {args.original} ({len(o_train)} images), adam lr {args.pretrain_lr:g}, "
          f"batch {args.batch_size}")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        r_err = task.evaluate(model, r_test).loss
        print(f"  epoch {epoch}: loss {metrics['train_loss']:.4f}  original test err "
              f"{error(metrics[task.metric.val]):.4f}  restricted test err {r_err:.4f}", flush=True)

    spec = PretrainSpec(epochs=args.pretrain_epochs, optimizer="adam", lr=args.pretrain_lr, batch_size=args.batch_size)
    result = pretrain(model, o_train, o_test, spec, args.seed + 1, on_epoch=on_epoch, task=task)
    print(f"pretraining took {result.seconds:.1f} s (training and the original-domain evaluations)")


def run_finetune(start: torch.nn.Module, subject: str, recipe: Recipe, fraction: float, r_train, r_test, o_test,
                 task: Generation, args: argparse.Namespace) -> Run:
    """The attacker's ``sophon_ray.core.attack.finetune`` (direct-all) of ``start``."""
    config = AttackConfig("direct-all", recipe.optimizer, recipe.lr, args.batch_size, epochs=args.epochs,
                          data_fraction=fraction, seed=args.seed)
    torch.manual_seed(args.seed + 2)  # the DDPM loss draws t and noise from torch's RNG: the same for both subjects
    result = finetune(start, r_train, r_test, config, original_test=o_test, task=task, keep_model=True)
    run = Run(subject, str(recipe), fraction, result.train_size, errors=list(result.restricted_loss),
              original_error=error(result.original), seconds=result.seconds)
    detail = task.evaluate(result.model, r_test).detail
    run.per_t = {t: detail[f"mse_t{t}"] for t in task.settings.eval_t}
    errs = " ".join(f"{e:.4f}" for e in run.errors)
    print(f"  {subject:7s} {recipe} frac {fraction:g} (n={run.samples}): err by epoch {errs}; original "
          f"{run.original_error:.4f}; {run.seconds:.1f} s", flush=True)
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
    p.add_argument("--model", default="unet-tiny", help="a sophon_ray.modes.generation.unet.DENOISERS preset")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--original-train-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=None, help="cap on each test split (default: all)")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--recipes", type=Recipe.parse, nargs="+",
                   default=[Recipe("adam", 1e-3), Recipe("momentum", 0.01), Recipe("momentum", 0.05)])
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
    settings = GenerationSpec(timesteps=args.T, eval_t=EVAL_TIMESTEPS, eval_seed=args.seed, samples=0)
    task = Generation(settings, Schedule.linear(settings.timesteps, settings.beta_start, settings.beta_end))
    o_train, o_test = load_domain(domain(args.original, args, args.original_train_size))
    r_train, r_test = load_domain(domain(args.restricted, args, None))
    print(f"{args.original} -> {args.restricted}, {args.channels} channel(s), {args.image_size} px, "
          f"eval timesteps {EVAL_TIMESTEPS}, threads {args.threads}")
    torch.manual_seed(args.seed)
    init = build_denoiser(args.model, args.channels, args.image_size)
    print(f"{args.model}: {sum(p.numel() for p in init.parameters()):,} parameters")
    normal = copy.deepcopy(init)
    run_pretrain(normal, o_train, o_test, r_test, task, args)
    runs: list[Run] = []
    for recipe in args.recipes:
        for fraction in args.fractions:
            for subject, start in (("normal", normal), ("scratch", init)):
                runs.append(run_finetune(start, subject, recipe, fraction, r_train, r_test, o_test, task, args))
    print()
    print(table(runs, args.epochs))
    print(f"\nfine-tuning: {len(runs)} runs, {sum(r.seconds for r in runs):.1f} s (training and per-epoch "
          f"evaluation); whole script {time.perf_counter() - wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
