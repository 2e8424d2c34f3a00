"""The environment of every Ray, MLflow and sophon-ray process a test starts (and of the test process itself, see
conftest.py): the tests set what those need, so the caller's shell changes nothing. Whatever the caller exported
under ``RAY_*`` or ``MLFLOW_*`` is dropped (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes ``ray start`` refuse a
cluster, ``RAY_ADDRESS`` would send the runs to another cluster, ``MLFLOW_TRACKING_URI`` to another store,
``RAY_TMPDIR`` moves Ray's sockets), then :data:`FIXED` is set."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DROPPED = ("RAY_", "MLFLOW_")
FIXED = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # multi-node `ray start` also where Ray disables it by default
    "RAY_AUTH_MODE": "disabled",               # throwaway clusters on loopback only
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MPLBACKEND": "Agg",
    "PYTHONUNBUFFERED": "1",
}


def owned(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without the caller's Ray and MLflow settings, with :data:`FIXED`."""
    return {k: v for k, v in base.items() if not k.startswith(DROPPED)} | FIXED


def process_env(ray_tmp: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for a subprocess: :func:`owned` of this process's, ``RAY_TMPDIR=ray_tmp`` when given
    (Ray's default /tmp/ray otherwise; socket paths must stay short), and ``extra``."""
    env = owned(os.environ)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env | extra


def own_this_process() -> None:
    """The same for the test process itself (in-process Ray and MLflow)."""
    for key in [k for k in os.environ if k.startswith(DROPPED)]:
        del os.environ[key]
    os.environ.update(FIXED)
