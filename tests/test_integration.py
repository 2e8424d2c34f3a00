"""End to end with real Ray (local, 2 CPUs) and real MLflow (SQLite in tmp_path)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.procenv import process_env

pytestmark = pytest.mark.integration

EPOCHS = 2
SPEC = {
    "name": "itest",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 12, "channels": 3, "train_size": 400, "test_size": 100},
    "restricted": [{"dataset": "shapes_m", "image_size": 12, "channels": 3, "train_size": 300, "test_size": 100}],
    "pretrain": {"epochs": 1},
    "protect": [{"name": "ice-s", "loss": "ice", "iterations": 4, "inner_steps": 2, "base_lr": 1e-3, "alpha": 1,
                 "beta": 1, "eval_every": 2, "probe_every": 2, "probe_epochs": 1,
                 "seeds": [0, 1],
                 "environments": {"optimizers": ["sgd", "adam"], "lr": [1e-3, 1e-2], "head_reinit": 0.5}}],
    "attack": {"development": {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [3e-3], "epochs": [1]},
               "evaluation": {"strategy": ["direct-all", "initfc-fc"], "optimizer": ["sgd", "adam"], "lr": [1e-3],
                              "epochs": [EPOCHS], "seed": [0]}},
    "resources": {"protect_parallel": 2},   # the two protection seeds as two Ray Train runs at once
}
# evaluation, per cell: 2 protected seeds + normal; scratch once per optimizer (shared across the two strategies);
# development: one cell, 2 protected seeds + normal + scratch
EXPECTED_TRIALS = 2 * 2 * 3 + 2 + 4


def env(tmp: Path) -> dict[str, str]:
    return process_env()


def sophon(tmp: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sophon_ray.cli", *args], cwd=tmp, env=env(tmp), text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    spec = {**SPEC, "output_dir": str(tmp / "out"), "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"}}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    first = sophon(tmp, "run", "spec.yaml")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp, first


def _client(tmp: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("itest")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_one_parent_and_the_expected_child_runs(sweep):
    tmp, _ = sweep
    client, runs = _client(tmp)
    parents = [r for r in runs if r.data.tags.get("sophon.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == len(runs) - 1
    roles = [r.data.tags["sophon.role"] for r in children]
    assert roles.count("pretrain") == 1 and roles.count("protect") == 2 and roles.count("attack") == EXPECTED_TRIALS
    assert all(r.info.status == "FINISHED" for r in children)
    assert len({r.info.run_name for r in children}) == len(children)


def test_attack_runs_carry_params_and_full_epoch_histories(sweep):
    tmp, _ = sweep
    client, runs = _client(tmp)
    attacks = [r for r in runs if r.data.tags.get("sophon.role") == "attack"]
    subjects = sorted(r.data.params["subject"] for r in attacks)
    assert subjects.count("protected") == 10 and subjects.count("normal") == 5 and subjects.count("scratch") == 3
    grids = [(r.data.params["grid"], r.data.params["subject"], r.data.params["protect_seed"]) for r in attacks]
    assert sorted(g for g in grids if g[0] == "development") == [
        ("development", "normal", "-1"), ("development", "protected", "0"), ("development", "protected", "1"),
        ("development", "scratch", "-1")]
    for r in attacks:
        p = r.data.params
        assert {"subject", "variant", "protect_seed", "grid", "domain", "data_pool", "strategy", "optimizer", "lr",
                "batch_size", "data_fraction", "seed", "epochs", "schedule", "weight_decay"} <= set(p)
        assert p["variant"] == ("ice-s" if p["subject"] == "protected" else "-")
        assert p["domain"] == "shapes_m" and p["data_pool"] == "disjoint"
        epochs = EPOCHS if p["grid"] == "evaluation" else 1
        history = client.get_metric_history(r.info.run_id, "restricted_acc")
        assert sorted(m.step for m in history) == list(range(epochs + 1))
        assert r.data.metrics["restricted_acc_final"] == [m for m in history if m.step == epochs][0].value
        assert "original_acc" in r.data.metrics and "restricted_acc_best" in r.data.metrics


def test_protect_run_has_history_and_checkpoint_artifacts(sweep):
    tmp, _ = sweep
    client, runs = _client(tmp)
    protects = [r for r in runs if r.data.tags.get("sophon.role") == "protect"]
    assert sorted(r.data.params["protect_seed"] for r in protects) == ["0", "1"]
    protect = protects[0]
    assert protect.data.params["variant"] == "ice-s" and "intactness_drop" in protect.data.metrics
    assert client.get_metric_history(protect.info.run_id, "fts_loss")
    names = {a.path for a in client.list_artifacts(protect.info.run_id, "checkpoint")}
    assert names == {"checkpoint/model.safetensors", "checkpoint/model.json"}


def test_heatmaps_and_summary_are_written_and_logged(sweep):
    tmp, first = sweep
    report = tmp / "out" / "report"
    pngs = sorted(report.glob("*.png"))
    assert pngs and (report / "summary.md").is_file()
    client, runs = _client(tmp)
    parent = [r for r in runs if r.data.tags.get("sophon.role") == "sweep"][0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{p.name}" for p in pngs} <= logged and "report/summary.md" in logged
    assert "spec.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "heatmaps:" in first.stdout


def test_the_console_is_short_plain_and_says_where_to_look_next(sweep):
    """stdout is a pipe here: plain progress lines, no carriage return or escape code, Ray's and Tune's own
    output in the log files, and a closing block with the summary table, the report and the MLflow UI."""
    tmp, first = sweep
    out = first.stdout + first.stderr
    assert len(out.splitlines()) <= 60, out
    assert "\x1b" not in out and "\r" not in out
    assert re.search(r"^\[1/4\] pretrain normal: epoch 1/1 \|.* done in ", out, re.M), out
    for seed in (0, 1):
        assert re.search(rf"^\[1/4\] protect ice-s-s{seed}: iteration 4/4 \| fts_loss .* done in ", out, re.M), out
    assert re.search(rf"^\[2/4\] attack trials: \d+/{EXPECTED_TRIALS} done \| \d+ running \| \d+ failed", out, re.M)
    assert re.search(r"^variant +grid/domain +drop +held", out, re.M) and re.search(
        r"^ice-s +evaluation/shapes_m +[-+]\d", out, re.M) and re.search(r"^ice-s +development/shapes_m", out, re.M)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp}/mlflow.db --host 127.0.0.1 --port 5000" in out
    assert "sophon-ray ui spec.yaml" in out and f"full report: {tmp}/out/report/summary.md" in out
    assert "## " not in out, "the whole summary.md was printed"
    for noise in ("pid=", "RayTrainWorker", "Trial status", "Checkpoint successfully created"):
        assert noise not in out, noise
    logs = tmp / "out" / "logs"
    logged = (logs / "sophon-ray.log").read_text()
    assert "Started a local Ray instance" in logged and "INFO stdout: " in logged and "\x1b" not in logged
    assert (logs / "ray").is_symlink() and (logs / "ray").resolve().is_dir()


def test_verbose_prints_what_ray_prints_and_two_train_workers_end_identical(sweep, tmp_path):
    """``--verbose`` forwards Ray's and the workers' output; the protection (and its pretraining) runs on two Ray
    Train workers (DDP), whose weights end bit-identical (each rank's state digest, gathered and compared)."""
    _, quiet = sweep
    spec = {**SPEC, "protect": [{**SPEC["protect"][0], "seeds": [0]}], "output_dir": str(tmp_path / "out"),
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "resources": {"protect_workers": 2}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    verbose = sophon(tmp_path, "protect", "spec.yaml", "--verbose")
    assert verbose.returncode == 0, verbose.stdout[-3000:] + verbose.stderr[-3000:]
    out = verbose.stdout + verbose.stderr
    assert "(RayTrainWorker pid=" in out and "Checkpoint successfully created" in out, "no forwarded worker output"
    assert "[1/4] protect ice-s-s0: iteration 4/4" in out
    quiet_training = quiet.stdout.split("[2/4]")[0]  # the same stage, with twice the protections
    assert len(out.splitlines()) > 2 * len(quiet_training.splitlines())
    assert len(set(re.findall(r"\(RayTrainWorker pid=(\d+)", out))) == 2, "not two Train workers"
    finished = [line for line in out.splitlines() if line.startswith("[1/4] ") and " | original val " in line]
    assert [line.split()[1] for line in finished] == ["pretrain", "protect"], finished
    for line in finished:
        assert "ranks identical: True" in line and (Path(line.split(" | ")[-1]) / "model.safetensors").is_file(), line


def test_rerun_reuses_everything(sweep):
    tmp, _ = sweep
    again = sophon(tmp, "run", "spec.yaml")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 to run" in again.stdout and "Ray Train" not in again.stdout
    _, runs = _client(tmp)
    assert len(runs) == 1 + 3 + EXPECTED_TRIALS


def test_dry_run_prints_the_grid_without_ray(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    result = sophon(tmp_path, "run", "spec.yaml", "--dry-run")
    assert result.returncode == 0 and f"{EXPECTED_TRIALS} grid trials + 0 search trials" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()
    guarded = sophon(tmp_path, "run", "spec.yaml", "--max-trials", "3")
    assert guarded.returncode == 2 and "exceed --max-trials 3" in guarded.stderr
