"""Generation mode end to end with real Ray (local) and real MLflow (SQLite): a DDPM denoiser pretrained and
protected with the DoS loss on Ray Train, attacked on a Ray Tune grid and by a small search, every run under the
generation task's names, sample grids on the attack runs, the report in denoising skill."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sophon_ray import names
from tests.procenv import process_env

pytestmark = pytest.mark.integration

SPEC = {
    "name": "gtest",
    "mode": "generation",
    "model": {"arch": "unet-tiny"},
    "original": {"dataset": "shapes", "image_size": 16, "channels": 1, "train_size": 300, "test_size": 60},
    "restricted": [{"dataset": "digits", "image_size": 16, "channels": 1, "train_size": 300, "test_size": 60}],
    "pretrain": {"epochs": 1, "optimizer": "adam", "lr": 2e-3, "batch_size": 32},
    "generation": {"samples": 4, "sample_steps": 5},
    "protect": [{"name": "dos", "loss": "dos", "iterations": 4, "inner_steps": 2, "base_lr": 1e-3, "alpha": 1,
                 "batch_size": 16, "eval_every": 2, "probe_every": 2, "probe_epochs": 1,
                 "environments": {"head_reinit": 0, "head_only": 0},
                 "probes": [{"strategy": "direct-all", "optimizer": "adam", "lr": 3e-3, "batch_size": 16}]}],
    "attack": {"subjects": ["protected", "normal", "scratch"],
               "evaluation": [{"strategy": ["direct-all", "decoder"], "optimizer": ["adam"], "lr": [1e-3],
                               "epochs": [2]}],
               "search": [{"name": "s", "num_samples": 2, "random_start": 2, "grace_period": 1,
                           "space": {"strategy": ["direct-all", "lora"], "epochs": [1, 2]}}]},
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gsweep")
    spec = {**SPEC, "output_dir": str(tmp / "out"), "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"}}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "sophon_ray.cli", "run", "spec.yaml"], cwd=tmp, env=process_env(),
                            text=True, capture_output=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("gtest")
    return tmp, result, client, client.search_runs([experiment.experiment_id], max_results=1000)


def _role(runs: list, role: str) -> list:
    return [r for r in runs if r.data.tags.get(names.ROLE) == role]


def _ran_to_the_end(runs: list) -> list:
    """Attack runs that were not stopped early by the search's scheduler (those have no last report: no
    original-domain score, no samples)."""
    return [r for r in _role(runs, "attack") if r.data.metrics.get(names.STOPPED) != 1.0]


def test_every_run_speaks_denoising_skill_and_the_parent_says_generation(sweep):
    _, _, _, runs = sweep
    assert [r.data.tags[names.MODE] for r in _role(runs, "sweep")] == ["generation"]
    protect = _role(runs, "protect")
    assert len(protect) == 1 and {"original_val_skill", "original_test_skill", "probe_skill"} <= set(
        protect[0].data.metrics)
    attacks = _role(runs, "attack")
    grid = [r for r in attacks if r.data.params[names.GRID] == names.EVALUATION]
    assert len(grid) == 2 * 2 + 1  # (protected, normal) x (direct-all, decoder) + scratch
    for r in attacks:
        assert r.info.status == "FINISHED"
        assert {"restricted_skill_final", "restricted_skill_best"} <= set(r.data.metrics)
        assert not any(k.endswith("_acc") or "_acc_" in k for k in r.data.metrics), sorted(r.data.metrics)
    assert all("original_skill" in r.data.metrics for r in _ran_to_the_end(runs))


def test_attack_runs_have_paired_sample_grids_and_quality_scores(sweep):
    _, _, client, runs = sweep
    for r in _ran_to_the_end(runs):
        listed = {a.path for a in client.list_artifacts(r.info.run_id, "samples")}
        assert listed == {"samples/before.png", "samples/after.png"}, (r.info.run_name, listed)
        assert {"sample_kid", "sample_kid_before", "sample_confidence"} <= set(r.data.metrics)
        mse = client.get_metric_history(r.info.run_id, "restricted_mse")
        skill = client.get_metric_history(r.info.run_id, "restricted_skill")
        assert len(mse) == len(skill) >= 2
        assert all(abs(s.value - 100 * (1 - m.value)) < 1e-6 for s, m in zip(sorted(skill, key=lambda p: p.step),
                                                                              sorted(mse, key=lambda p: p.step)))


def test_the_search_and_the_report_read_skill(sweep):
    tmp, result, _, runs = sweep
    searches = _role(runs, "search")
    assert len(searches) == 3 and all("best_found_restricted_skill" in r.data.metrics for r in searches)
    assert "best denoising skill found on protected" in result.stdout
    summary = (Path(tmp) / "out" / "report" / "summary.md").read_text()
    assert "denoising skill" in summary and "floored at 0 (predicting zero noise)" in summary
    assert "accuracy" not in summary.lower().replace("val_accuracy", "")
