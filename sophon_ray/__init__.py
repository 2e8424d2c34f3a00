"""sophon-ray: SOPHON non-fine-tunable protection and fine-tuning attack sweeps.

The public API (no Ray, no MLflow): load a spec, load domains, build / pretrain / protect / attack a
model, save and load checkpoints. Imports are lazy so ``import sophon_ray`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_spec": "sophon_ray.run.validate",
    "SweepSpec": "sophon_ray.spec",
    "SpecError": "sophon_ray.spec",
    "load_domain": "sophon_ray.core.data",
    "build_model": "sophon_ray.modes",
    "pretrain": "sophon_ray.core.training",
    "protect": "sophon_ray.core.protection",
    "finetune": "sophon_ray.core.attack",
    "AttackConfig": "sophon_ray.recipes",
    "scratch_model": "sophon_ray.core.attack",
    "save_checkpoint": "sophon_ray.run.checkpoint",
    "load_checkpoint": "sophon_ray.run.checkpoint",
    "make_card": "sophon_ray.run.checkpoint",
    "task_for": "sophon_ray.modes",
}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sophon_ray' has no attribute '{name}'")
