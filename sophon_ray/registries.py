"""Every registry in one place, for spec validation and ``sophon-ray ls`` (imports torch)."""

from sophon_ray.data import DATASETS
from sophon_ray.losses import LOSSES
from sophon_ray.models import MODELS
from sophon_ray.simulation import INNER_OPTIMIZERS
from sophon_ray.attack import STRATEGIES
from sophon_ray.training import OPTIMIZERS, SCHEDULES

ALL = {
    "datasets": DATASETS,
    "models": MODELS,
    "losses": LOSSES,
    "inner optimizers": INNER_OPTIMIZERS,
    "strategies": STRATEGIES,
    "optimizers": OPTIMIZERS,
    "schedules": SCHEDULES,
}

__all__ = ["ALL", "DATASETS", "INNER_OPTIMIZERS", "LOSSES", "MODELS", "OPTIMIZERS", "SCHEDULES", "STRATEGIES"]
