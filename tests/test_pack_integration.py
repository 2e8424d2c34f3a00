"""attack.pack end to end: real Ray (local, 2 CPUs), real MLflow (SQLite in tmp_path), the real CLI. The same tiny
sweep with ``pack: 4`` and ``pack: 1`` (same pretrained model): every member is its own FINISHED run with the params,
metric names and per-epoch curves of the trial run alone, and ``--resume`` runs nothing."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.procenv import process_env

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4
SPEC = {
    "name": "packtest",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 8, "channels": 3, "train_size": 200, "test_size": 60},
    "restricted": [{"dataset": "shapes_m", "image_size": 8, "channels": 3, "train_size": 200, "test_size": 60}],
    "pretrain": {"epochs": 1},
    "protect": [],
    "attack": {"subjects": ["normal"],
               # sgd and adam: a pack of 4 (2 lrs x 2 seeds) each; adapt cannot pack: it runs alone beside them
               "evaluation": [{"strategy": ["direct-all"], "optimizer": ["sgd", "adam"], "lr": [1e-3, 3e-3],
                               "seed": [0, 1], "epochs": [2], "batch_size": [32], "data_fraction": [0.5]},
                              {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3], "epochs": [2],
                               "batch_size": [32], "data_fraction": [0.5], "adapt": ["entropy"]}]},
}
TRIALS = 9


def sophon(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sophon_ray.cli", *args], cwd=tmp, env=process_env(), text=True,
                          capture_output=True, timeout=600)


def write_spec(tmp: Path, pack: int) -> None:
    spec = {**SPEC, "attack": {**SPEC["attack"], "pack": pack}, "output_dir": str(tmp / "out"),
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"}}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))


def attack_runs(tmp: Path) -> dict[str, dict]:
    """key -> status, name, params, metrics and every metric's history of each attack run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(SPEC["name"])
    out = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get("sophon.role") != "attack":
            continue
        history = {m: sorted((p.step, p.value) for p in client.get_metric_history(r.info.run_id, m))
                   for m in r.data.metrics}
        out[r.data.tags["sophon.key"]] = {"status": r.info.status, "name": r.info.run_name,
                                          "params": r.data.params, "history": history}
    return out


def test_packed_members_are_their_own_runs_with_the_curves_of_trials_run_alone(tmp_path):
    alone, packed = tmp_path / "alone", tmp_path / "packed"
    for d in (alone, packed):
        d.mkdir()
    write_spec(alone, 1)
    first = sophon(alone, "run", "spec.yaml")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (packed / "out").mkdir()
    shutil.copytree(alone / "out" / "checkpoints", packed / "out" / "checkpoints")   # the same pretrained model
    write_spec(packed, 4)
    dry = sophon(packed, "run", "spec.yaml", "--dry-run")
    assert "packing (attack.pack: 4): 8 trials in 2 packs (Tune trials), 1 trials alone" in dry.stdout, dry.stdout
    assert "1 alone: adapt: entropy" in dry.stdout
    second = sophon(packed, "run", "spec.yaml")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[2/4] packed: 8 trials in 2 Tune trials, 1 alone" in second.stdout, second.stdout

    expected, got = attack_runs(alone), attack_runs(packed)
    assert len(expected) == TRIALS and set(got) == set(expected)
    for key, want in expected.items():
        run = got[key]
        assert run["status"] == "FINISHED" and run["name"] == want["name"] and run["params"] == want["params"]
        assert set(run["history"]) - {"compute_seconds"} == set(want["history"]) - {"compute_seconds"}, key
        for metric, points in want["history"].items():
            if metric in ("compute_seconds",):
                continue
            assert [s for s, _ in run["history"][metric]] == [s for s, _ in points], (key, metric)
            for (_, a), (_, b) in zip(run["history"][metric], points):
                assert abs(a - b) <= TOLERANCE, (want["name"], metric, a, b)

    again = sophon(packed, "run", "spec.yaml", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{TRIALS} finished earlier, 0 to run" in again.stdout, again.stdout
    assert len(attack_runs(packed)) == TRIALS
