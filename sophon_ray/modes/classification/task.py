"""Classification mode's task: cross-entropy fitting (pretraining, NTR, the simulated and the real attacker),
ICE/KLU suppression on the logits, accuracy (%) as the score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sophon_ray import names
from sophon_ray.core.data import batches
from sophon_ray.modes.classification.losses import LOSSES
from sophon_ray.seam import FIT_STAGES, Evaluation, ModelLoss


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

    @property
    def losses(self) -> tuple[str, ...]:
        return tuple(LOSSES.names())

    def fit_loss(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    def fitting(self, stage: str) -> Callable[..., Tensor]:
        """Cross-entropy whatever the stage (the stages' timestep policies are generation mode's)."""
        if stage not in FIT_STAGES:
            raise ValueError(f"unknown fitting stage {stage!r}; allowed: {', '.join(FIT_STAGES)}")
        return self.fit_loss

    def suppression(self, name: str, timesteps: str | None = None) -> ModelLoss:
        if timesteps is not None:
            raise ValueError(f"classification's suppression losses take no timestep policy, got {timesteps!r}: "
                             "protect[i].suppression_t is generation mode only; remove it")
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
