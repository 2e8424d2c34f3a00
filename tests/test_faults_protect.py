"""Protection resumes: a Ray Train worker, or the whole driver, SIGKILLed mid-protection after a state checkpoint.
Real processes and real signals; every case asserts on MLflow's contents and on Ray Train's own checkpoint record."""

import json
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.test_faults import kill_sessions, session_processes, start, wait_for_store

pytestmark = pytest.mark.faults

ITERATIONS, EVERY, EVAL = 100, 10, 5
PER_ITERATION = ("fts_loss", "adversary_loss", "ntr_loss", "fts_grad_norm")


def protect_spec(tmp: Path, name: str) -> Path:
    """Pretraining (1 epoch) and one protection of ITERATIONS (~15 s here), a state checkpoint every EVERY; the attack
    stage (for ``run``) is one trial."""
    spec = {
        "name": name,
        "output_dir": str(tmp / "out"),
        "model": {"arch": "convnet", "num_classes": 10},
        "original": {"dataset": "shapes", "image_size": 16, "channels": 3, "train_size": 600, "test_size": 200},
        "restricted": [{"dataset": "shapes_m", "image_size": 16, "channels": 3, "train_size": 1500,
                        "test_size": 300}],
        "pretrain": {"epochs": 1},
        "protect": [{"name": "v", "iterations": ITERATIONS, "inner_steps": 5, "eval_every": EVAL, "probe_every": 50,
                     "probe_epochs": 1, "checkpoint_every": EVERY}],
        "attack": {"subjects": ["normal"],
                   "evaluation": {"strategy": ["direct-all"], "optimizer": ["adam"], "lr": [1e-3], "epochs": [1],
                                  "data_fraction": [1.0], "seed": [0]}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def state_checkpoints(tmp: Path) -> list[int]:
    """Iterations of the protection state checkpoints Ray Train has registered (its own snapshot of the run)."""
    out = []
    for snapshot in (tmp / "out" / "ray").glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (json.JSONDecodeError, KeyError):  # being written
            continue
        out += [r["metrics"]["iteration"] for r in results if r["metrics"].get("stage") == "protect-state"]
    return sorted(out)


def wait_for_state_checkpoint(tmp: Path, proc, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if its := state_checkpoints(tmp):
            return its[-1]
        time.sleep(0.2)
    raise AssertionError("no protection state checkpoint: " + (tmp / "stdout.log").read_text()[-3000:])


def protect_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sophon.role") == "protect"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    return client, runs[0]


def assert_history_once(client: MlflowClient, run) -> None:
    """Every iteration's metrics exactly once, and every evaluation's."""
    for name in PER_ITERATION:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == list(range(1, ITERATIONS + 1)), (name, steps)
    evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "original_acc"))
    assert evals == list(range(EVAL, ITERATIONS + 1, EVAL)), evals


def test_a_sigkilled_train_worker_restarts_protection_from_its_last_state_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = start(tmp_path, "protect", str(protect_spec(tmp_path, "workerkill")))
    wait_for_store(tmp_path, proc)
    first = wait_for_state_checkpoint(tmp_path, proc)
    workers = session_processes(proc.pid, "RayTrainWorker")
    assert len(workers) == 1, workers
    workers[0].send_signal(signal.SIGKILL)
    at_kill = state_checkpoints(tmp_path)[-1]
    assert proc.wait(timeout=400) == 0, (tmp_path / "stdout.log").read_text()[-3000:]
    client, run = protect_run(uri, "workerkill")
    resumed = int(run.data.metrics["resumed_from_iteration"])
    # Ray Train restarted the worker group, which continued from the latest state checkpoint, not from iteration 0
    assert 0 < first <= at_kill <= resumed < ITERATIONS and resumed % EVERY == 0, (first, at_kill, resumed)
    assert run.data.metrics["iterations_run"] == ITERATIONS
    assert_history_once(client, run)
    ray_logs = (tmp_path / "out" / "logs" / "ray").resolve()
    said = "".join(p.read_text(errors="replace") for p in ray_logs.glob("worker-*.err"))
    assert f"resumed from the state checkpoint of iteration {resumed}" in said


def test_b_sigkilled_driver_then_resume_continues_protection_from_its_last_state_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = protect_spec(tmp_path, "driverkill")
    proc = start(tmp_path, "run", str(spec))
    wait_for_store(tmp_path, proc)
    wait_for_state_checkpoint(tmp_path, proc)
    kill_sessions([proc.pid])  # the driver and the local Ray instance it started, nothing else
    proc.wait(timeout=30)
    last = state_checkpoints(tmp_path)[-1]
    assert last < ITERATIONS and not list((tmp_path / "out" / "checkpoints").glob("protect-*"))
    resumed = start(tmp_path, "run", str(spec), "--resume")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "stdout.log").read_text()[-3000:]
    client, run = protect_run(uri, "driverkill")
    assert run.data.metrics["resumed_from_iteration"] == last  # the latest state checkpoint Ray Train had registered
    assert_history_once(client, run)
