"""Generation mode's task: DDPM denoisers fitted with the denoising MSE, protected with SOPHON's DoS loss (or the
negative-MSE ablation), scored by denoising skill = 100 x (1 - MSE) at fixed timesteps (see ``sophon_ray.modes.classification.task``).

The diffusion pieces (UNet presets, schedule, losses, metric, sampler) live in :mod:`sophon_ray.modes.generation.ddpm`; this
module only binds them to a sweep's ``generation`` settings behind the :class:`~sophon_ray.modes.classification.task.Task` interface.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from sophon_ray import names
from sophon_ray.core.data import labels_of
from sophon_ray.modes.generation.ddpm import (Schedule, denoising_error, denoising_loss, dos_loss, fixed_timestep,
                                              mean_error, neg_mse_loss, normalise_policy, policy_error,
                                              policy_problem, sample, save_grid)
from sophon_ray.modes.generation.quality import (FeatureNet, dataset_images, inception_scores, sample_quality,
                                                 train_feature_net)
from sophon_ray.registry import Registry
from sophon_ray.spec import SCORE_EVAL_T, GenerationSpec, TimestepPolicy
from sophon_ray.seam import FIT_STAGES, Evaluation

GenerationLoss = Callable[[nn.Module, Tensor, Schedule, TimestepPolicy], Tensor]
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
    policy: TimestepPolicy

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(model, x, self.schedule, self.policy)


@dataclass(frozen=True)
class _Fit:
    """The DDPM loss of one fitting stage at its timestep policy (hashable: a simulation cache key); label
    smoothing has no meaning for a denoiser and is ignored."""

    schedule: Schedule
    policy: TimestepPolicy

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return denoising_loss(model, x, self.schedule, self.policy)


def _checked(policy: TimestepPolicy, steps: int) -> TimestepPolicy:
    """``policy`` in canonical form; KeyError for an unknown name (naming the policies), ValueError for a bad
    timestep or band, now rather than at the first step."""
    problem = policy_problem(policy, steps)
    if problem is not None:
        raise (KeyError if isinstance(policy, str) else ValueError)(problem)
    return normalise_policy(policy)


@dataclass(frozen=True, eq=False)
class Generation:
    """DDPM denoisers: pretraining and NTR minimise the DDPM loss at ``settings``' ``fit_t`` policy, the simulated
    attacker at ``simulate_t``, the real attacker (and the probes) at ``attack_t``; suppression losses use
    ``suppression_t`` (or a protect variant's own policy); the score is denoising skill under ``score_t`` (default:
    the mean error at ``eval_t``), with the skill at every ``eval_t`` timestep beside it. Unset stages take
    ``settings.protocol``'s policy (:meth:`GenerationSpec.stage`)."""

    settings: GenerationSpec
    schedule: Schedule
    _fits: dict[str, _Fit] = field(default_factory=dict, init=False, repr=False)
    mode = "generation"
    metric = names.SKILL
    strategies = ("direct-all", "decoder", "last-k", "lora")

    @classmethod
    def of(cls, spec=None) -> Generation:
        """The task of a sweep spec's ``generation`` settings (defaults without a spec), every stage resolved."""
        settings = (spec.generation if spec is not None else GenerationSpec()).resolved()
        return cls(settings, Schedule.linear(settings.timesteps, settings.beta_start, settings.beta_end))

    @property
    def losses(self) -> tuple[str, ...]:
        return tuple(GENERATION_LOSSES.names())

    def fitting(self, stage: str) -> _Fit:
        """The DDPM loss of ``stage`` (``fit``: pretraining and NTR, ``simulate``: the simulated attacker,
        ``attack``: the real attacker and the probes) at the stage's timestep policy; one object per stage (the
        simulation keys its captured inner step by it)."""
        if stage not in self._fits:
            if stage not in FIT_STAGES:
                raise ValueError(f"unknown fitting stage {stage!r}; allowed: {', '.join(FIT_STAGES)}")
            policy = _checked(self.settings.stage(f"{stage}_t"), self.schedule.steps)
            self._fits[stage] = _Fit(self.schedule, policy)
        return self._fits[stage]

    def fit_loss(self, model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The ``fit`` stage's loss (pretraining, NTR)."""
        return self.fitting("fit")(model, x, y)

    def suppression(self, name: str, timesteps: TimestepPolicy | None = None) -> _Suppression:
        """The suppression loss ``name`` at the timestep policy ``timesteps`` (a protect variant's
        ``suppression_t``; None: the sweep's ``generation.suppression_t``)."""
        policy = self.settings.stage("suppression_t") if timesteps is None else timesteps
        return _Suppression(GENERATION_LOSSES.get(name), self.schedule, _checked(policy, self.schedule.steps))

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu") -> Evaluation:
        """Denoising skill under ``score_t`` (``eval_t``: the mean error at the ``eval_t`` timesteps; a policy with
        one timestep: the error there; a drawing policy: the error at one seeded draw per image), its MSE as the
        loss, and ``mse_t<t>`` / ``skill_t<t>`` at every ``eval_t`` timestep (the same seeded noise for all)."""
        g = self.settings
        score = g.stage("score_t")
        fixed = None if score == SCORE_EVAL_T else fixed_timestep(score)
        steps = list(dict.fromkeys([*g.eval_t, *([fixed] if fixed is not None else [])]))
        errors = denoising_error(model, dataset, self.schedule, steps, seed=g.eval_seed)
        at_eval = {t: errors[t] for t in g.eval_t}
        if score == SCORE_EVAL_T:
            mse = mean_error(at_eval)
        elif fixed is not None:
            mse = errors[fixed]
        else:
            mse = policy_error(model, dataset, self.schedule, _checked(score, self.schedule.steps), seed=g.eval_seed)
        detail = {f"mse_t{t}": e for t, e in at_eval.items()} | {f"skill_t{t}": skill(e) for t, e in at_eval.items()}
        return Evaluation(skill(mse), mse, detail)

    def after_attack(self, before: nn.Module, after: nn.Module, pool: Dataset, test: Dataset,
                     device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, bytes]]:
        """Sample grids of the model before and after the attack (the same noise: paired images) as
        ``samples/before.png`` and ``samples/after.png``, and their quality against ``test``: ``sample_kid``,
        ``sample_confidence``, ... for the attacked model and ``sample_kid_before`` (KID and recognisability in the
        features of a classifier trained once per process on ``pool``; ``sample_fid_standard``, FID in the standard
        FID network, when ``fid_inception`` is set; ``sample_frechet_imagenet``, not FID, when torchvision's ImageNet
        Inception weights are there)."""
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
        metrics |= {f"sample_{k}": v for k, v in inception_scores(dataset_images(test), images["after"],
                                                                    g.imagenet_inception, g.fid_inception,
                                                                    device).items()}
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
