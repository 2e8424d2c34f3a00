"""Classification mode: classifiers (``models``), ICE/KLU suppression (``losses``), accuracy (``task``)."""

from __future__ import annotations

from typing import Any

from sophon_ray.modes.classification.losses import LOSSES
from sophon_ray.modes.classification.models import MODELS, build
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.seam import Task

__all__ = ["LOSSES", "MODELS", "build", "problems", "task"]


def task(spec: Any = None) -> Task:
    return CLASSIFICATION


def problems(spec: Any) -> list[tuple[str, str]]:
    """Classification has no settings of its own beyond the common spec."""
    return []
