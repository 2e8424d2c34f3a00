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

from tests.test_faults import kill_sessions, seed_models, session_processes, start, wait_for_store

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


def two_protections_spec(tmp: Path, name: str) -> Path:
    """:func:`protect_spec` with two protections (seeds 0 and 1 of ``v``) at ``protect_parallel: 2``: each in a Ray
    Train run of its own, 1 worker of 1 CPU each (2 cores)."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = protect_spec(tmp, name)
    spec = yaml.safe_load(path.read_text())
    spec["protect"][0]["seeds"] = [0, 1]
    spec["resources"] = {"protect_parallel": 2, "protect_workers": 1, "cpus_per_trial": 1}
    path.write_text(yaml.safe_dump(spec))
    return path


def states_by_label(tmp: Path) -> dict[str, list[int]]:
    """Iterations of the protection state checkpoints Ray Train has registered, per job label (``v-s0``, ...)."""
    out: dict[str, list[int]] = {}
    for snapshot in (tmp / "out" / "ray").glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (json.JSONDecodeError, KeyError):  # being written
            continue
        for r in results:
            if r["metrics"].get("stage") == "protect-state":
                out.setdefault(r["metrics"]["label"], []).append(r["metrics"]["iteration"])
    return {label: sorted(its) for label, its in out.items()}


def protected_models(tmp: Path) -> dict[str, tuple]:
    """Each stored protected model (label -> (model, card))."""
    from sophon_ray.run.checkpoint import load_checkpoint

    out = {}
    for folder in (tmp / "out" / "checkpoints").glob("protect-*"):
        model, card = load_checkpoint(folder)
        out[f"{card['variant']}-s{card['protect_seed']}"] = (model, card)
    return out


def seed_normal(spec_path: Path) -> None:
    """Store the spec's normal model, pretrained in this process (``seed_models`` of the spec without its
    protections), so the sweep starts with the protections (no pretraining Ray Train run: test time)."""
    spec = yaml.safe_load(spec_path.read_text())
    normal_only = spec_path.with_name("normal-only.yaml")
    normal_only.write_text(yaml.safe_dump({**spec, "protect": []}))
    seed_models(normal_only)


def uninterrupted_digests(spec_path: Path) -> dict[str, str]:
    """Each protection of the spec run straight through in this process, from the stored normal model, as a Ray
    Train worker of 1 rank runs it (``protect_variant``, ``cpus_per_trial`` 1 thread): label -> weights digest. The
    same as an uninterrupted ``sophon-ray protect`` run's stored models (checked once: equal digests), at a fraction
    of its Ray Train runs' cost."""
    import torch

    from sophon_ray.core.data import make_splits
    from sophon_ray.modes import metric_for
    from sophon_ray.run.checkpoint import load_checkpoint
    from sophon_ray.run.keys import protect_key
    from sophon_ray.run.train_driver import protect_job
    from sophon_ray.run.train_worker import protect_variant, state_digest
    from sophon_ray.run.validate import load_spec

    spec = load_spec(str(spec_path))
    normal, card = load_checkpoint(next((Path(spec.output_dir) / "checkpoints").glob("pretrain-*")))
    splits, threads = make_splits(spec), torch.get_num_threads()
    torch.set_num_threads(int(spec.resources.cpus_per_trial))
    try:
        out = {}
        for seed in spec.protect[0].seeds:
            job = protect_job(spec, 0, seed, protect_key(spec, 0, seed))
            model, _, _ = protect_variant(spec, normal, splits, job, card["metrics"][metric_for(spec.mode).key(
                "original_val")])
            out[job.label] = state_digest(model)
        return out
    finally:
        torch.set_num_threads(threads)


def test_c_resume_in_another_group_continues_each_protection_from_its_own_last_state(tmp_path):
    """Two protections at ``protect_parallel: 2`` (two Ray Train runs), the driver's session SIGKILLed once Ray Train
    registered a state checkpoint of each; ``--resume`` at ``protect_parallel: 1`` runs them in one Ray Train run of
    another name (another group): each continues from its own latest state (found in the other runs' folders), not
    from 0, and stores a model bit-identical to an uninterrupted protection's, every iteration once in MLflow."""
    from sophon_ray.run.train_worker import state_digest

    spec = two_protections_spec(tmp_path, "groups")
    seed_normal(spec)
    proc = start(tmp_path, "protect", str(spec))
    wait_for_store(tmp_path, proc)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(states_by_label(tmp_path)) < 2:
        time.sleep(0.2)
    kill_sessions([proc.pid])  # the driver and the local Ray instance it started, nothing else
    proc.wait(timeout=30)
    last = {label: its[-1] for label, its in states_by_label(tmp_path).items()}
    assert sorted(last) == ["v-s0", "v-s1"] and max(last.values()) < ITERATIONS, last
    assert not list((tmp_path / "out" / "checkpoints").glob("protect-*")), "a protection finished before the kill"
    runs_before = {p.name for p in (tmp_path / "out" / "ray").glob("train-*")}

    resumed = start(tmp_path, "protect", str(spec), "--set", "resources.protect_parallel=1", "--resume")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "stdout.log").read_text()[-3000:]
    assert {p.name for p in (tmp_path / "out" / "ray").glob("train-*")} - runs_before, "the same group ran again"
    ray_logs = (tmp_path / "out" / "logs" / "ray").resolve()
    said = "".join(p.read_text(errors="replace") for p in ray_logs.glob("worker-*.err"))
    models = protected_models(tmp_path)
    reference = uninterrupted_digests(spec)
    assert sorted(models) == sorted(reference) == ["v-s0", "v-s1"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("groups")
    for label, (model, card) in models.items():
        from_iteration = card["metrics"]["resumed_from_iteration"]
        # its own last state (a newer one than Ray Train had registered may have been whole on disk), not 0
        assert last[label] <= from_iteration < ITERATIONS and from_iteration % EVERY == 0, (label, from_iteration, last)
        assert f"protect {label}: continuing from the state checkpoint of iteration {from_iteration} found" in said
        assert state_digest(model) == reference[label], label  # as if it had never stopped
        (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sophon.role") == "protect"
                  and r.data.params.get("protect_seed") == label.rsplit("-s", 1)[1]]
        assert run.info.status == "FINISHED" and run.data.metrics["resumed_from_iteration"] == from_iteration
        assert_history_once(client, run)
