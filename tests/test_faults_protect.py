"""Protection resumes: a Ray Train worker, or the whole driver, SIGKILLed mid-protection after a state checkpoint;
and a protection that diverges is rolled back. Real processes and real signals; every case asserts on MLflow's
contents and on Ray Train's own checkpoint record."""

import json
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.test_faults import kill_sessions, session_processes, start, wait_for_store

pytestmark = pytest.mark.faults

ITERATIONS, EVERY, EVAL = 50, 10, 5
PER_ITERATION = ("fts_loss", "adversary_loss", "ntr_loss", "fts_grad_norm")


# lr 1e6 and no clipping: the protection diverges at once and is rolled back (a variant that ends in 8 iterations)
DIVERGING = {"name": "blowup", "iterations": 8, "inner_steps": 2, "base_lr": 1.0e+6, "alpha": 1.0e+6, "beta": 1.0e+6,
             "clip_norm": 1.0e+12, "eval_every": 2, "probe_every": 4, "probe_epochs": 1, "max_rollbacks": 2}


def protect_spec(tmp: Path, name: str, diverging_first: bool = False) -> Path:
    """Pretraining (1 epoch) and one protection ``v`` of ITERATIONS (~10 s here), a state checkpoint every EVERY,
    after the DIVERGING one when ``diverging_first`` (all in one Ray Train run); the attack stage (for ``run``) is one
    trial."""
    spec = {
        "name": name,
        "output_dir": str(tmp / "out"),
        "model": {"arch": "convnet", "num_classes": 10},
        "original": {"dataset": "shapes", "image_size": 16, "channels": 3, "train_size": 600, "test_size": 200},
        "restricted": [{"dataset": "shapes_m", "image_size": 16, "channels": 3, "train_size": 1500,
                        "test_size": 300}],
        "pretrain": {"epochs": 1},
        "protect": [DIVERGING] * diverging_first + [
            {"name": "v", "iterations": ITERATIONS, "inner_steps": 5, "eval_every": EVAL, "probe_every": 25,
             "probe_epochs": 1, "checkpoint_every": EVERY}],
        "attack": {"subjects": ["normal"],
                   "evaluation": {"strategy": ["direct-all"], "optimizer": ["adam"], "lr": [1e-3], "epochs": [1],
                                  "data_fraction": [1.0], "seed": [0]}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def state_checkpoints(tmp: Path, pretraining: bool = False) -> list[int]:
    """Iterations of the protection state checkpoints Ray Train has registered (its own snapshot of the run); with
    ``pretraining``, the epochs of the pretraining's (its job's label is ``normal``)."""
    out = []
    for snapshot in (tmp / "out" / "ray").glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (json.JSONDecodeError, KeyError):  # being written
            continue
        out += [r["metrics"]["iteration"] for r in results if r["metrics"].get("stage") == "protect-state"
                and (r["metrics"].get("label") == "normal") == pretraining]
    return sorted(out)


def wait_for_state_checkpoint(tmp: Path, proc, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if its := state_checkpoints(tmp):
            return its[-1]
        time.sleep(0.2)
    raise AssertionError("no protection state checkpoint: " + (tmp / "stdout.log").read_text()[-3000:])


def protect_run(uri: str, experiment: str, variant: str = "v"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("sophon.role") == "protect" and r.data.params.get("variant") == variant]
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
    """The Ray Train run protects two variants: ``blowup`` diverges (rolled back, recorded, never checkpointed), then
    ``v``, whose worker is SIGKILLed after a state checkpoint: the restarted group skips the finished jobs and
    continues ``v`` from that checkpoint."""
    from sophon_ray.run.checkpoint import load_checkpoint

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = start(tmp_path, "protect", str(protect_spec(tmp_path, "workerkill", diverging_first=True)))
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
    assert "continuing from Ray Train's latest checkpoint: 2 job(s) finished" in said  # pretraining and blowup

    # the diverged protection: rolled back, the events in MLflow and on the card, a finite checkpoint, run once
    client, diverged = protect_run(uri, "workerkill", "blowup")
    assert diverged.data.metrics["rollbacks"] >= 1 and diverged.data.metrics["resumed_from_iteration"] == 0
    assert client.get_metric_history(diverged.info.run_id, "rollback"), "rollback events not in MLflow"
    model, card = load_checkpoint(next((tmp_path / "out" / "checkpoints").glob("protect-blowup-*")))
    assert card["rollback_events"] and all("non-finite" in e["reason"] or "floor" in e["reason"]
                                           for e in card["rollback_events"])
    assert all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point())


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
