"""The scripts outside bench/ still run (default suite): experiments/ (one-off studies, experiments/README.md) and
tools/ (packaging helpers). ``gen_pair.py`` runs its smoke mode (the project's pretrain and finetune loops on a
DDPM denoiser); the others only parse ``--help``, which imports them (gen_calibrate's smallest run is minutes,
offline_wheels downloads)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procenv import process_env

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], tmp: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp, env=process_env(), text=True, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("script", ["experiments/gen_calibrate.py", "experiments/gen_pair.py", "experiments/informed_probe.py",
                                    "experiments/weight_distance.py",
                                    "tools/offline_wheels.py"])
def test_script_imports_and_answers_help(script, tmp_path):
    proc = run([sys.executable, str(REPO / script), "--help"], tmp_path, 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]


def test_gen_pair_smoke_compares_normal_and_scratch(tmp_path):
    out = tmp_path / "runs.json"
    proc = run([sys.executable, str(REPO / "experiments" / "gen_pair.py"), "--smoke", "--json", str(out)], tmp_path,
               300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| recipe | fraction (n) | epoch | normal err | scratch err | normal/scratch |" in proc.stdout
    runs = json.loads(out.read_text())
    assert sorted(r["subject"] for r in runs) == ["normal", "scratch"]
    for r in runs:
        assert len(r["errors"]) == 2 and all(0 < e < 5 for e in r["errors"]), r
        assert len(r["per_t"]) == 5 and r["original_error"] > 0
