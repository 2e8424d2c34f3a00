"""The tests' subprocesses get the environment the tests set, whatever the caller's shell exported."""

import subprocess
import sys

from tests.procenv import process_env


def test_a_hostile_shell_changes_nothing_ray_or_mlflow_see(monkeypatch):
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "10.0.0.1:6379",
                       "MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", "RAY_AUTH_MODE": "token",
                       "RAY_USAGE_STATS_ENABLED": "1", "MPLBACKEND": "TkAgg"}.items():
        monkeypatch.setenv(key, value)
    code = ("import os; from ray._private import ray_constants as c; "
            "print(c.ENABLE_RAY_CLUSTER, os.environ.get('RAY_ADDRESS'), os.environ.get('MLFLOW_TRACKING_URI'), "
            "os.environ['RAY_AUTH_MODE'], os.environ['RAY_USAGE_STATS_ENABLED'], os.environ['MPLBACKEND'])")
    out = subprocess.run([sys.executable, "-c", code], env=process_env(), text=True, capture_output=True, timeout=60)
    assert out.stdout.split() == ["True", "None", "None", "disabled", "0", "Agg"], out.stderr[-2000:]
