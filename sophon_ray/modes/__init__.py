"""The one table of modes. A mode is one package under ``sophon_ray/modes/`` plus one line in :data:`MODES`;
validation, the catalog (``sophon-ray ls``), the drivers and ``analysis/`` ask this table and never branch on a
mode's name.

Importing this module is cheap (no torch): a mode's package, with its task, models and losses, is imported the
first time something asks for them. Each mode package exposes ``task(spec)``, ``MODELS`` (its architectures),
``LOSSES`` (its suppression losses), ``build(model_spec, channels, image_size, weights)`` and
``problems(spec)`` (the checks only it knows, as ``(field path, message)`` pairs); a mode whose suppression losses
draw timesteps also exposes ``TIMESTEPS`` (its named timestep policies: what ``protect[i].suppression_t`` may name)
and ``timestep_problem(policy, steps)`` (why a policy, named, a fixed t or a band, is not one; None when it is).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sophon_ray import names
from sophon_ray.registry import Registry

if TYPE_CHECKING:
    from sophon_ray.seam import Task


@dataclass(frozen=True)
class Mode:
    """One mode: its name, its score (metric and MLflow keys), whether that score has a chance level of
    100 / num_classes, and the package that implements it."""

    name: str
    doc: str
    metric: names.Metric
    has_classes: bool
    package: str
    model_noun: str        # what its models are, in words (error messages): classifier | denoiser

    @property
    def plugin(self) -> ModuleType:
        """The mode's package (imports torch)."""
        return importlib.import_module(self.package)

    def task(self, spec: Any = None) -> Task:
        """The mode's task for a sweep spec (its settings; defaults without a spec)."""
        return self.plugin.task(spec)

    def models(self) -> Registry:
        return self.plugin.MODELS

    def losses(self) -> Registry:
        return self.plugin.LOSSES

    def timesteps(self) -> Registry | None:
        """The timestep policies its suppression losses take (generation); None: they take none (classification)."""
        return getattr(self.plugin, "TIMESTEPS", None)


MODES: Registry[Mode] = Registry("mode")
for _mode in (
    Mode("classification", "classifiers: cross-entropy, ICE/KLU suppression, accuracy", names.ACCURACY,
         has_classes=True, package="sophon_ray.modes.classification", model_noun="classifier"),
    Mode("generation", "DDPM denoisers: denoising MSE training, DoS / negative-MSE suppression, denoising skill "
         "100 x (1 - MSE)", names.SKILL, has_classes=False, package="sophon_ray.modes.generation", model_noun="denoiser"),
):
    MODES.register(_mode.name, _mode.doc)(_mode)


def mode_of(name: str) -> Mode:
    """The mode called ``name``; KeyError naming the modes and the closest one."""
    return MODES.get(name)


def metric_for(name: str) -> names.Metric:
    """The score (and MLflow keys) of mode ``name``: classification accuracy, generation denoising skill."""
    return MODES.get(name).metric


def task_for(spec: Any) -> Task:
    """The task of a sweep spec (``spec.mode``), built from its settings (generation: the DDPM schedule)."""
    return MODES.get(spec.mode).task(spec)


def mode_of_arch(arch: str) -> Mode | None:
    """The mode whose model registry has ``arch`` (None: no mode has it)."""
    return next((m for m in (MODES.get(n) for n in MODES.names()) if arch in m.models()), None)


def all_archs() -> list[str]:
    return [a for n in MODES.names() for a in MODES.get(n).models().names()]


def build_model(spec: Any, channels: int = 3, image_size: int = 32, weights: str | None = None) -> Any:
    """Build ``spec.arch`` (a :class:`~sophon_ray.spec.ModelSpec`) for ``channels`` x ``image_size`` inputs, from
    whichever mode registers it (classifiers: ``spec.num_classes`` outputs; DDPM UNets: the same shape out).

    ``weights='torchvision'`` loads a classifier's published ImageNet weights into its body (needs a download);
    KeyError for an unknown architecture. With ``spec.channels_last`` the model's 4-D weights are NHWC."""
    mode = mode_of_arch(spec.arch)
    if mode is None:
        from sophon_ray.registry import did_you_mean  # noqa: PLC0415

        raise KeyError(f"unknown model '{spec.arch}'{did_you_mean(spec.arch, all_archs())}; allowed: "
                       f"{', '.join(all_archs())}")
    model = mode.plugin.build(spec, channels, image_size, weights)
    if spec.channels_last:
        import torch  # noqa: PLC0415 - this module stays torch-free on import

        model = model.to(memory_format=torch.channels_last)
    return model
