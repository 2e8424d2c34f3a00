"""The one supervised training loop (pretraining and every fine-tuning attack use it), optimizers,
schedules and evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from sophon_ray.recipes.augment import Augment
from sophon_ray.core.data import batches
from sophon_ray.core.state import ProtectState
from sophon_ray.recipes import OPTIMIZERS
from sophon_ray.spec import PretrainSpec
from sophon_ray.seam import Evaluation, Task

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sophon_ray.seam import Sync

def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` (:data:`sophon_ray.recipes.OPTIMIZERS`); KeyError with did-you-mean
    on a miss."""
    return OPTIMIZERS.get(name)(params, lr, weight_decay)


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
             *, task: Task) -> Evaluation:
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
                task: Task, stage: str = "fit") -> float:
    """One epoch of training on ``task``'s fitting loss of ``stage`` (``fit``: pretraining; ``attack``: an
    attacker's fine-tuning; classification: cross-entropy either way, generation: the DDPM loss at the stage's
    timestep policy) in train mode (BatchNorm statistics update); mean batch loss.

    ``sync_grads`` (data-parallel workers) averages the gradients across workers before each step.
    ``label_smoothing`` smooths the cross-entropy targets; ``augment(x, generator)`` transforms each
    training batch (on its device, drawing from ``generator`` after the batch is drawn, so a seeded run
    is reproducible); ``freeze_bn`` keeps BatchNorm layers in eval mode (running statistics untouched).
    """
    model.train()
    if freeze_bn:
        set_bn_eval(model)
    total, steps = 0.0, 0
    fit = task.fitting(stage)
    for x, y in batches(dataset, batch_size, generator):
        x, y = x.to(device), y.to(device)
        if augment is not None:
            x = augment(x, generator)
        loss = fit(model, x, y, label_smoothing)
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
    resumed_from: int = 0    # the epoch of the state it continued from (0: from the start)


def pretrain(model: nn.Module, train: Dataset, val: Dataset, spec: PretrainSpec, seed: int = 0,
             device: torch.device | str = "cpu", on_epoch: Callable[[int, dict[str, float]], None] | None = None,
             sync: "Sync | None" = None, rank: int = 0, *, task: Task,
             on_checkpoint: Callable[[ProtectState], None] | None = None,
             resume: ProtectState | None = None) -> PretrainResult:
    """Train the normal model in place on the original domain; validation score (``task``'s metric) per epoch.

    Data-parallel workers pass their shard as ``train``, their ``rank`` and a ``sync`` (see
    ``sophon_ray.core.protection.Sync``) that averages gradients and, after each epoch, BatchNorm statistics.
    ``on_checkpoint(state)`` gets the training state after every epoch but the last (``iteration`` = the epoch:
    weights, optimizer, curve and seconds shared by the ranks; this rank's batch generator and the global torch RNG
    its own), a :class:`~sophon_ray.core.state.ProtectState` that a worker saves as a protection's
    (:func:`~sophon_ray.core.protection.save_state`); ``resume`` continues from such a state as if training had never stopped (bit-identical on the CPU).
    """
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    model.to(device)
    optimizer = make_optimizer(spec.optimizer, model.parameters(), spec.lr)
    curve: list[float] = []
    first, spent = 1, 0.0
    if resume is not None:
        model.load_state_dict(resume.shared["model"])
        optimizer.load_state_dict(resume.shared["optimizer"])
        curve, spent, first = list(resume.shared["curve"]), float(resume.shared["seconds"]), resume.iteration + 1
        gen.set_state(resume.local["gen"])
        torch.set_rng_state(resume.local["torch_rng"])
        log.info("pretrain | resumed from the state checkpoint of epoch %d", resume.iteration)
    start = time.perf_counter() - spent
    for epoch in range(first, spec.epochs + 1):
        loss = train_epoch(model, train, optimizer, spec.batch_size, gen, device=device,
                           sync_grads=sync.grads if sync else None, task=task)
        if sync:
            sync.buffers([b for b in model.buffers() if b.is_floating_point()])
        curve.append(evaluate(model, val, device, task=task).score)
        if on_epoch:
            on_epoch(epoch, {"train_loss": loss, task.metric.val: curve[-1]})
        if on_checkpoint and epoch < spec.epochs:
            on_checkpoint(ProtectState(epoch, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                               "curve": list(curve), "seconds": time.perf_counter() - start},
                                       {"gen": gen.get_state(), "torch_rng": torch.get_rng_state()}))
    return PretrainResult(curve, time.perf_counter() - start, first - 1)
