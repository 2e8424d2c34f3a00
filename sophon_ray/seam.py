"""The seam between the loops and the modes: protocols only. The core loops (``core.training``,
``core.simulation``, ``core.protection``, ``core.attack``) are written against these and take the task as an
argument; each mode (``sophon_ray.modes``) implements them. Nothing here imports a mode, Ray or MLflow.

Both modes score in percent, higher = the model does the task better (on the restricted domain: the attack
succeeded), 0 = the do-nothing model, so every comparison, floor, heatmap and summary reads the same way:
classification scores accuracy; generation scores denoising skill, 100 x (1 - MSE) of the predicted noise at fixed
timesteps (the noise has unit variance, so predicting zero, which the DoS loss teaches, scores 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from sophon_ray import names

ModelLoss = Callable[["nn.Module", "Tensor", "Tensor"], "Tensor"]   # (model, x, y) -> scalar
# the stages with a fitting loss of their own (Task.fitting): pretraining and NTR, the simulated attacker inside the
# protection, the real attacker (and the protection's probes, which are attacks)
FIT_STAGES = ("fit", "simulate", "attack")


@dataclass(frozen=True)
class Evaluation:
    """A model's score on a dataset (the task's metric, %, higher = better at the task), its mean loss, and any
    finer numbers the task reports (generation: the MSE and the skill per evaluation timestep, ``mse_t<t>`` and
    ``skill_t<t>``)."""

    score: float
    loss: float
    detail: dict[str, float] = field(default_factory=dict)

    def logged(self, part: str) -> dict[str, float]:
        """``detail`` under the MLflow names of the data it was measured on: ``<part>_<name>`` (``part``:
        ``original``, ``restricted``; generation: ``restricted_skill_t1``, ...). Empty when the task has none."""
        return {f"{part}_{name}": value for name, value in self.detail.items()}


@runtime_checkable
class Model(Protocol):
    """What the attack strategies and the protection loop need of a model, whatever its mode: named parameter
    groups. Classifiers (``modes.classification.models.Net``) and denoisers (``modes.generation.unet.Denoiser``)
    implement it."""

    def head_param_names(self) -> list[str]:
        """The output layer's parameters (a classifier's last Linear, a denoiser's output conv)."""

    def blocks(self) -> list[list[str]]:
        """Parameter-name prefixes (ending in '.') of each block, input to output; together with the head they
        cover every parameter once."""

    def block_param_names(self, k: int) -> list[str]:
        """The parameters of the last ``k`` blocks."""


class Task(Protocol):
    """What a mode does that the loops must not know: fitting, suppression, scoring."""

    mode: str
    metric: names.Metric
    losses: tuple[str, ...]        # the suppression losses this mode accepts

    def fit_loss(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The loss an ordinary training step minimises: the ``fit`` stage's (pretraining, NTR)."""

    def fitting(self, stage: str) -> Callable[..., Tensor]:
        """The fitting loss of ``stage`` (one of :data:`FIT_STAGES`), called ``(model, x, y, label_smoothing=0.0)``;
        the same object (or an equal one) for the same stage, since the simulation keys its captured inner step by
        it. Generation: the DDPM loss at the stage's timestep policy (``generation.fit_t``, ``simulate_t``,
        ``attack_t``); classification: cross-entropy for every stage."""

    def suppression(self, name: str, timesteps: str | int | tuple[int, int] | None = None) -> ModelLoss:
        """The suppression loss ``name`` as a (model, x, y) -> scalar function; the same object for the same name
        and ``timesteps`` (the simulation caches its inner step by it). ``timesteps``: a protect variant's timestep
        policy (``protect[i].suppression_t``) in place of the mode's own (generation: ``generation.suppression_t``);
        None keeps the mode's. A mode whose losses take no timestep (classification) refuses one."""

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu") -> Evaluation:
        """The model's score on ``dataset`` in eval mode (the model's train/eval mode is restored)."""

    def after_attack(self, before: nn.Module, after: nn.Module, pool: Dataset, test: Dataset,
                     device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, bytes]]:
        """What an attack trial logs beside its curves, from the attacked model before and after fine-tuning,
        the attacker's data pool and the scoring split: (metrics, artifacts by name). Generation: sample grids
        and sample-quality scores; classification: nothing."""


class Sync(Protocol):
    """Data-parallel hooks (Ray Train passes an all-reduce implementation; one process needs none)."""

    def grads(self, tensors: list[torch.Tensor]) -> None:
        """Average these gradients across workers, in place."""

    def buffers(self, tensors: list[torch.Tensor]) -> None:
        """Average these floating-point buffers (BatchNorm statistics) across workers, in place."""
