"""The one supervised training loop (pretraining and every fine-tuning attack use it), optimizers,
schedules and evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from sophon_ray.augment import Augment
from sophon_ray.data import batches
from sophon_ray.registry import Registry
from sophon_ray.spec import PretrainSpec
from sophon_ray.tasks import CLASSIFICATION, Evaluation, Task

if TYPE_CHECKING:
    from sophon_ray.protection import Sync

OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
SCHEDULES: Registry[Callable[[int], Callable[[int], float]]] = Registry("lr schedule")
BN_MODES: Registry[bool] = Registry("BN mode")  # name -> freeze_bn for train_epoch
BN_MODES.register("train", "BatchNorm in train mode: batch statistics normalise, running statistics adapt")(False)
BN_MODES.register("frozen", "BatchNorm in eval mode: running statistics kept and used; affine parameters "
                  "still train if the strategy trains them")(True)


def _reg(name: str, doc: str, build: OptimizerFactory) -> None:
    OPTIMIZERS.register(name, doc)(build)


_reg("sgd", "SGD, no momentum", lambda p, lr, wd: torch.optim.SGD(p, lr=lr, weight_decay=wd))
_reg("momentum", "SGD, momentum 0.9", lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd))
_reg("nesterov", "SGD, Nesterov momentum 0.9",
     lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd))
_reg("adam", "Adam (0.9, 0.999)", lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd))
_reg("adamw", "AdamW, decoupled weight decay (attack.weight_decay, else 0.01)",
     lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd or 0.01))
_reg("rmsprop", "RMSprop (alpha 0.99)", lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, weight_decay=wd))
_reg("adagrad", "Adagrad", lambda p, lr, wd: torch.optim.Adagrad(p, lr=lr, weight_decay=wd))
_reg("adadelta", "Adadelta (rho 0.9); lr scales the update, 1.0 is the classic setting",
     lambda p, lr, wd: torch.optim.Adadelta(p, lr=lr, weight_decay=wd))


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name``; KeyError with did-you-mean on a miss."""
    return OPTIMIZERS.get(name)(params, lr, weight_decay)


@SCHEDULES.register("constant")
def constant(total_steps: int) -> Callable[[int], float]:
    """Constant learning rate."""
    return lambda step: 1.0


@SCHEDULES.register("cosine")
def cosine(total_steps: int) -> Callable[[int], float]:
    """Cosine decay from lr to 0 over all fine-tuning steps."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


WARMUP_FRACTION = 0.1


@SCHEDULES.register("warmup-cosine")
def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10% of steps (lr/w, 2lr/w, ... lr), then cosine decay to 0."""
    warm = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(step - warm, total_steps - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _cos_between(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


ONE_CYCLE = {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4}


@SCHEDULES.register("one-cycle")
def one_cycle(total_steps: int) -> Callable[[int], float]:
    """OneCycleLR (pct_start 0.3): cosine from lr/25 up to lr over 30% of steps, then down to lr/25/1e4."""
    initial = 1 / ONE_CYCLE["div_factor"]
    final = initial / ONE_CYCLE["final_div_factor"]
    peak_end = float(ONE_CYCLE["pct_start"] * total_steps) - 1  # OneCycleLR's phase boundaries, in steps
    last = float(total_steps - 1)

    def factor(step: int) -> float:
        step = min(step, max(0, total_steps - 1))  # LambdaLR's call after the last step: hold the end value
        if step <= peak_end:
            return _cos_between(initial, 1.0, step / peak_end if peak_end > 0 else 1.0)
        return _cos_between(1.0, final, (step - peak_end) / (last - peak_end) if last > peak_end else 1.0)

    return factor


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
             task: Task = CLASSIFICATION) -> Evaluation:
    """``task``'s score (classification: accuracy, %) and mean loss of ``model`` in eval mode; restores the
    model's train/eval mode."""
    return task.evaluate(model, dataset, device)


def set_bn_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics used and kept), the rest untouched."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_epoch(model: nn.Module, dataset: Dataset, optimizer: torch.optim.Optimizer, batch_size: int,
                generator: torch.Generator, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                device: torch.device | str = "cpu", sync_grads: Callable[[list[torch.Tensor]], None] | None = None,
                *, label_smoothing: float = 0.0, augment: Augment | None = None, freeze_bn: bool = False,
                task: Task = CLASSIFICATION) -> float:
    """One epoch of training on ``task``'s fitting loss (classification: cross-entropy) in train mode (BatchNorm
    statistics update); mean batch loss.

    ``sync_grads`` (data-parallel workers) averages the gradients across workers before each step.
    ``label_smoothing`` smooths the cross-entropy targets; ``augment(x, generator)`` transforms each
    training batch (on its device, drawing from ``generator`` after the batch is drawn, so a seeded run
    is reproducible); ``freeze_bn`` keeps BatchNorm layers in eval mode (running statistics untouched).
    """
    model.train()
    if freeze_bn:
        set_bn_eval(model)
    total, steps = 0.0, 0
    for x, y in batches(dataset, batch_size, generator):
        x, y = x.to(device), y.to(device)
        if augment is not None:
            x = augment(x, generator)
        loss = task.fit_loss(model, x, y, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync_grads:
            sync_grads([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item()
        steps += 1
    return total / max(1, steps)


@dataclass
class PretrainResult:
    val_score: list[float]   # the task's validation score per epoch
    seconds: float


def pretrain(model: nn.Module, train: Dataset, val: Dataset, spec: PretrainSpec, seed: int = 0,
             device: torch.device | str = "cpu", on_epoch: Callable[[int, dict[str, float]], None] | None = None,
             sync: "Sync | None" = None, rank: int = 0, task: Task = CLASSIFICATION) -> PretrainResult:
    """Train the normal model in place on the original domain; validation score (``task``'s metric) per epoch.

    Data-parallel workers pass their shard as ``train``, their ``rank`` and a ``sync`` (see
    ``sophon_ray.protection.Sync``) that averages gradients and, after each epoch, BatchNorm statistics.
    """
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    model.to(device)
    optimizer = make_optimizer(spec.optimizer, model.parameters(), spec.lr)
    start, curve = time.perf_counter(), []
    for epoch in range(1, spec.epochs + 1):
        loss = train_epoch(model, train, optimizer, spec.batch_size, gen, device=device,
                           sync_grads=sync.grads if sync else None, task=task)
        if sync:
            sync.buffers([b for b in model.buffers() if b.is_floating_point()])
        curve.append(evaluate(model, val, device, task).score)
        if on_epoch:
            on_epoch(epoch, {"train_loss": loss, task.metric.val: curve[-1]})
    return PretrainResult(curve, time.perf_counter() - start)
