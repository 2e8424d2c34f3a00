"""Generation mode: DDPM denoisers (``unet``), the DDPM schedule, losses and sampler (``ddpm``), sample quality
(``quality``), and the task binding them to a sweep's ``generation`` settings (``task``)."""

from __future__ import annotations

from typing import Any

from sophon_ray.modes.generation.ddpm import TIMESTEP_POLICIES as TIMESTEPS
from sophon_ray.modes.generation.ddpm import policy_problem as timestep_problem
from sophon_ray.modes.generation.task import GENERATION_LOSSES as LOSSES
from sophon_ray.modes.generation.task import Generation
from sophon_ray.modes.generation.unet import DENOISERS as MODELS
from sophon_ray.modes.generation.unet import Denoiser
from sophon_ray.seam import Task

__all__ = ["LOSSES", "MODELS", "TIMESTEPS", "build", "problems", "task", "timestep_problem"]


def task(spec: Any = None) -> Task:
    return Generation.of(spec)


def build(spec: Any, channels: int, image_size: int, weights: str | None = None) -> Denoiser:
    """The DDPM UNet preset ``spec.arch`` (``num_classes`` unused); no published weights exist for them."""
    if weights:
        raise ValueError(f"model '{spec.arch}' has no published weights; remove pretrain.weights or pick a "
                         "torchvision architecture (resnet18, resnet34, resnet50, vgg13)")
    return MODELS.get(spec.arch)(channels, image_size)


def problems(spec: Any) -> list[tuple[str, str]]:
    from sophon_ray.modes.generation.checks import problems as check  # noqa: PLC0415

    return check(spec)
