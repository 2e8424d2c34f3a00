"""The seam between classification and generation: a task owns the model family, the fitting loss (pretraining,
normal-training reinforcement, the simulated and the real attacker), the suppression losses, and the evaluation
score with its MLflow names. The loops (``training``, ``attack``, ``simulation``, ``protection``) call a task and
are never copied per mode.

Both tasks score in percent, higher = the model does the task better (on the restricted domain: the attack
succeeded), 0 = the do-nothing model, so every comparison, floor, heatmap and summary reads the same way:
classification scores accuracy; generation scores denoising skill, 100 x (1 - MSE) of the predicted noise at fixed
timesteps (the noise has unit variance, so predicting zero, which the DoS loss teaches, scores 0, and the MSE is
logged beside it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sophon_ray import names
from sophon_ray.data import batches
from sophon_ray.losses import LOSSES
from sophon_ray.registry import Registry

ModelLoss = Callable[[nn.Module, Tensor, Tensor], Tensor]   # (model, x, y) -> scalar


@dataclass(frozen=True)
class Evaluation:
    """A model's score on a dataset (the task's metric, %, higher = better at the task), its mean loss, and any
    finer numbers the task reports (generation: the MSE per evaluation timestep)."""

    score: float
    loss: float
    detail: dict[str, float] = field(default_factory=dict)


class Task(Protocol):
    mode: str
    metric: names.Metric
    losses: tuple[str, ...]        # the suppression losses this mode accepts
    strategies: tuple[str, ...]    # the attack strategies that make sense for its models

    def fit_loss(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The loss an ordinary training step minimises (pretraining, NTR, the attacker)."""

    def suppression(self, name: str) -> ModelLoss:
        """The suppression loss ``name`` as a (model, x, y) -> scalar function; the same object for the same name
        (the simulation caches its inner step by it)."""

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu") -> Evaluation:
        """The model's score on ``dataset`` in eval mode (the model's train/eval mode is restored)."""

    def after_attack(self, before: nn.Module, after: nn.Module, pool: Dataset, test: Dataset,
                     device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, bytes]]:
        """What an attack trial logs beside its curves, from the attacked model before and after fine-tuning,
        the attacker's data pool and the scoring split: (metrics, artifacts by name). Generation: sample grids
        and sample-quality scores; classification: nothing."""


@dataclass(frozen=True)
class _Logits:
    """A classifier suppression loss applied to the model's logits (hashable: a simulation cache key)."""

    loss: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(model(x), y)


class Classification:
    """Cross-entropy training, ICE/KLU suppression, accuracy (%)."""

    mode = "classification"
    metric = names.ACCURACY
    strategies = ("direct-all", "direct-fc", "initfc-all", "initfc-fc", "rtal", "lora", "last-k", "reinit-last-k")

    @property
    def losses(self) -> tuple[str, ...]:
        return tuple(LOSSES.names())

    def fit_loss(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    def suppression(self, name: str) -> ModelLoss:
        return _Logits(LOSSES.get(name))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
                 batch_size: int = 1000) -> Evaluation:
        was_training = model.training
        model.eval()
        correct, loss, n = 0, 0.0, 0
        for x, y in batches(dataset, batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += len(y)
        model.train(was_training)
        return Evaluation(100.0 * correct / max(1, n), loss / max(1, n))

    def after_attack(self, before: nn.Module, after: nn.Module, pool: Dataset, test: Dataset,
                     device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, bytes]]:
        return {}, {}


CLASSIFICATION = Classification()
TASKS: Registry[Callable[..., Task]] = Registry("mode")
TASKS.register("classification", "classifiers: cross-entropy, ICE/KLU suppression, accuracy")(lambda spec=None: CLASSIFICATION)


def _generation(spec=None) -> Task:
    from sophon_ray.generation import Generation  # noqa: PLC0415 - diffusion code loads only in generation mode

    return Generation.of(spec)


TASKS.register("generation", "DDPM denoisers: denoising MSE training, DoS / negative-MSE suppression, "
               "denoising skill 100 x (1 - MSE)")(_generation)


def task_for(spec) -> Task:
    """The task of a sweep spec (``spec.mode``), built from its settings (generation: the DDPM schedule)."""
    return TASKS.get(spec.mode)(spec)
