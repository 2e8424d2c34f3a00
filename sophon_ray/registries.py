"""Every registry in one place, for spec validation and ``sophon-ray ls`` (imports torch)."""

from sophon_ray.attack import STRATEGIES
from sophon_ray.augment import AUGMENTS
from sophon_ray.data import DATASETS
from sophon_ray.diffusion import DENOISERS
from sophon_ray.generation import GENERATION_LOSSES
from sophon_ray.losses import LOSSES
from sophon_ray.models import MODELS
from sophon_ray.simulation import INNER_OPTIMIZERS
from sophon_ray.training import BN_MODES, OPTIMIZERS, SCHEDULES

ALL = {
    "datasets": DATASETS,
    "models": MODELS,
    "denoisers": DENOISERS,
    "losses": LOSSES,
    "generation losses": GENERATION_LOSSES,
    "inner optimizers": INNER_OPTIMIZERS,
    "strategies": STRATEGIES,
    "optimizers": OPTIMIZERS,
    "schedules": SCHEDULES,
    "augmentations": AUGMENTS,
    "BN modes": BN_MODES,
}

__all__ = ["ALL", "AUGMENTS", "BN_MODES", "DATASETS", "DENOISERS", "GENERATION_LOSSES", "INNER_OPTIMIZERS", "LOSSES",
           "MODELS", "OPTIMIZERS", "SCHEDULES", "STRATEGIES"]
