"""Generation mode's task: DDPM denoisers fitted with the denoising MSE, protected with SOPHON's DoS loss (or the
negative-MSE ablation), scored by denoising skill = 100 x (1 - MSE) at fixed timesteps (see ``sophon_ray.modes.classification.task``).

The diffusion pieces (UNet presets, schedule, losses, metric, sampler) live in :mod:`sophon_ray.modes.generation.ddpm`; this
module only binds them to a sweep's ``generation`` settings behind the :class:`~sophon_ray.modes.classification.task.Task` interface.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from sophon_ray import names
from sophon_ray.core.data import labels_of
from sophon_ray.modes.generation.ddpm import (TIMESTEP_POLICIES, Schedule, denoising_error, denoising_loss, dos_loss,
                                              mean_error, neg_mse_loss, sample, save_grid)
from sophon_ray.modes.generation.quality import FeatureNet, dataset_images, fid, sample_quality, train_feature_net
from sophon_ray.registry import Registry
from sophon_ray.spec import GenerationSpec
from sophon_ray.seam import Evaluation

GenerationLoss = Callable[[nn.Module, Tensor, Schedule, str], Tensor]
GENERATION_LOSSES: Registry[GenerationLoss] = Registry("generation suppression loss")
GENERATION_LOSSES.register("dos", "DoS: mean squared predicted noise on restricted images (SOPHON's generation "
                           "loss; saturates at the refusal eps_hat = 0)")(dos_loss)
GENERATION_LOSSES.register("neg_mse", "negative denoising MSE (the paper's ablation: unbounded, diverges)")(neg_mse_loss)


def skill(mse: float) -> float:
    """Denoising skill, %: 100 x (1 - MSE). The noise has unit variance, so 0 = predicting zero noise (what DoS
    teaches), 100 = perfect, < 0 = worse than predicting zero."""
    return 100.0 * (1.0 - mse)


@dataclass(frozen=True)
class _Suppression:
    """A generation suppression loss bound to the schedule and timestep policy (hashable: a simulation cache key)."""

    loss: GenerationLoss
    schedule: Schedule
    policy: str

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(model, x, self.schedule, self.policy)


@dataclass(frozen=True, eq=False)
class Generation:
    """DDPM denoisers: the attacker, NTR and pretraining minimise the DDPM loss at uniform t; suppression losses
    use ``settings.suppression_t`` (or a protect variant's own policy); the score is denoising skill at
    ``settings.eval_t``."""

    settings: GenerationSpec
    schedule: Schedule
    mode = "generation"
    metric = names.SKILL
    strategies = ("direct-all", "decoder", "last-k", "lora")

    @classmethod
    def of(cls, spec=None) -> Generation:
        """The task of a sweep spec's ``generation`` settings (defaults without a spec)."""
        settings = spec.generation if spec is not None else GenerationSpec()
        return cls(settings, Schedule.linear(settings.timesteps, settings.beta_start, settings.beta_end))

    @property
    def losses(self) -> tuple[str, ...]:
        return tuple(GENERATION_LOSSES.names())

    def fit_loss(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return denoising_loss(model, x, self.schedule, "uniform")

    def suppression(self, name: str, timesteps: str | None = None) -> _Suppression:
        """The suppression loss ``name`` at the timestep policy ``timesteps`` (a protect variant's
        ``suppression_t``; None: the sweep's ``generation.suppression_t``)."""
        if timesteps is not None:
            TIMESTEP_POLICIES.get(timesteps)   # a KeyError naming the policies now, not at the first step
        policy = self.settings.suppression_t if timesteps is None else timesteps
        return _Suppression(GENERATION_LOSSES.get(name), self.schedule, policy)

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu") -> Evaluation:
        errors = denoising_error(model, dataset, self.schedule, self.settings.eval_t,
                                 seed=self.settings.eval_seed)
        mse = mean_error(errors)
        return Evaluation(skill(mse), mse, {f"mse_t{t}": e for t, e in errors.items()})

    def after_attack(self, before: nn.Module, after: nn.Module, pool: Dataset, test: Dataset,
                     device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, bytes]]:
        """Sample grids of the model before and after the attack (the same noise: paired images) as
        ``samples/before.png`` and ``samples/after.png``, and their quality against ``test``: ``sample_kid``,
        ``sample_confidence``, ... for the attacked model and ``sample_kid_before`` (KID and recognisability in the
        features of a classifier trained once per process on ``pool``; ``sample_fid`` when Inception weights are
        there)."""
        g = self.settings
        if g.samples == 0:
            return {}, {}
        images = {when: sample(model, self.schedule, g.samples, torch.Generator().manual_seed(g.eval_seed), device,
                               g.sample_steps).cpu()
                  for when, model in (("before", before), ("after", after))}
        artifacts = {f"samples/{when}.png": _png(x) for when, x in images.items()}
        if not g.sample_quality:
            return {}, artifacts
        net = _feature_net(pool, g.eval_seed)
        metrics = {f"sample_{k}": v for k, v in sample_quality(net, test, images["after"]).items()}
        metrics["sample_kid_before"] = sample_quality(net, test, images["before"])["kid"]
        score = fid(dataset_images(test), images["after"], g.fid_weights, device)
        if score is not None:
            metrics["sample_fid"] = score
        return metrics, artifacts


def _png(images: Tensor) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return save_grid(images, Path(folder) / "grid.png", nrow=8).read_bytes()


_FEATURE_NETS: dict[tuple[str, int], FeatureNet] = {}


def _digest(pool: Dataset) -> str:
    """A content key of a data pool (each trial rebuilds its datasets from the object store: ids differ)."""
    if isinstance(pool, TensorDataset):
        h = hashlib.sha1()
        for t in pool.tensors:
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()
    return f"id-{id(pool)}"


def _feature_net(pool: Dataset, seed: int) -> FeatureNet:
    """The sample-quality classifier of a data pool, trained once per process (Ray reuses trial workers) and
    seeded, so every trial on the pool scores in the same features."""
    x, _ = pool[0]
    key = (_digest(pool), seed)
    if key not in _FEATURE_NETS:
        classes = int(labels_of(pool).max()) + 1
        _FEATURE_NETS[key] = train_feature_net(pool, x.shape[0], x.shape[-1], classes, seed)
    return _FEATURE_NETS[key]
