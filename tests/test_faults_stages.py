"""Tracking outages outside the attack grid (issue 25): an ``mlflow server`` (SQLite backend) SIGKILLed while the
models' stage writes its pretrain and protect runs, or while the searches run, then restarted on the same port and
database ``SOPHON_FAULT_OUTAGE_S`` (30) seconds later, or never. Every run that carries a result (pretrain, protect,
attack and search trials, search runs, the parent run's stage times, report files and FINISHED status) goes through
the sweep's journal, so the sweep waits the outage out and ends with every run exactly once; a store that never comes
back ends the run with exit 3 and the journal named, and ``sophon-ray sync`` then ``--resume`` complete it.

In the models' stage the server is killed as soon as the parent run exists, so the outage covers Ray Train's
pretraining and protection (which write nothing to MLflow while they run) and then the stage's writes of its runs
(models seeded instead raced: the stage could deliver its runs before the kill landed, as CI saw once)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sophon_ray import names
from sophon_ray.run.outbox import JOURNAL, Journal
from sophon_ray.run.delivery import WAIT_ENV
from tests.test_faults import (_free_port, assert_complete, env, kill_server, spec_for, start_server,
                               wait_for_store)
from tests.test_faults_tracking import OUTAGE_S, STRATEGIES, WITH_PROTECTION, outbox_failures
from tests.test_search_journal import NUM_SAMPLES, SEARCHES, finished, search_sweep, search_trials

pytestmark = pytest.mark.faults

CLI = [sys.executable, "-m", "sophon_ray.cli"]


def protected_spec(tmp: Path, uri: str, name: str) -> Path:
    """The grid of test_faults_tracking's protected sweep (protected, normal and scratch at one lr); its models are
    trained by the sweep (Ray Train), so they outlast the kill of the server that follows the parent run's creation."""
    spec = spec_for(tmp, name, STRATEGIES, ["sgd", "adam"], uri=uri)
    data = yaml.safe_load(spec.read_text())
    data["protect"] = [{"name": "v", "iterations": 4, "inner_steps": 2, "eval_every": 2, "probe_every": 2,
                        "probe_epochs": 1}]
    data["attack"]["subjects"] = ["protected", "normal", "scratch"]
    spec.write_text(yaml.safe_dump(data))
    return spec


def launch(tmp: Path, spec: Path, wait_s: float, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "run", str(spec), *extra], cwd=tmp, env={**env(tmp), WAIT_ENV: str(wait_s)},
                            text=True, stdout=open(tmp / "stdout.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_store(tmp, proc)
    return proc


def model_runs(uri: str, experiment: str) -> dict[str, list]:
    """The pretrain and protect runs by role; each must be there once, FINISHED, with its history once."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = {role: [r for r in runs if r.data.tags.get(names.ROLE) == role] for role in ("pretrain", "protect")}
    for role, found in out.items():
        assert len(found) == 1, (role, [r.info.run_name for r in found])
        run = found[0]
        assert run.info.status == "FINISHED", (role, run.info.status)
        metric = "train_loss" if role == "pretrain" else "original_acc"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps and len(steps) == len(set(steps)), (role, metric, steps)
    assert {a.path for a in client.list_artifacts(out["protect"][0].info.run_id, "checkpoint")} >= {
        "checkpoint/model.json"}
    return out


def parent_complete(uri: str, experiment: str, report: bool = True) -> None:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    parent = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
              if r.data.tags.get(names.ROLE) == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(client.get_metric_history(parent[0].info.run_id, "seconds_attack")) == 1
    figures = [a.path for a in client.list_artifacts(parent[0].info.run_id, "report") if a.path.endswith(".png")]
    assert bool(figures) == report, figures


def test_a_store_down_for_30_s_while_the_models_runs_are_written_is_waited_out_and_nothing_doubles(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        spec = protected_spec(tmp_path, uri, "modelsdown")
        proc = launch(tmp_path, spec, wait_s=OUTAGE_S + 120)
        kill_server(server)   # the parent run exists; Ray Train has not even started
        down = time.time()
        log = tmp_path / "stdout.log"
        deadline = down + 300  # the stage trains, journals its runs while the store is down, then waits for it
        while time.time() < deadline and '"role":"protect"' not in _journal_text(tmp_path):
            time.sleep(0.2)
        assert '"role":"protect"' in _journal_text(tmp_path), log.read_text()[-3000:]
        time.sleep(max(0.0, down + OUTAGE_S - time.time()))
        assert "[2/4]" not in log.read_text(), "the grid started while the store was down"
        server = start_server(tmp_path, port)
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
        failures = outbox_failures(tmp_path)
        assert failures[0] >= 1, f"the outage never hit the models' writes: {failures}"
        model_runs(uri, "modelsdown")
        assert_complete(uri, "modelsdown", expected=WITH_PROTECTION)   # also: no run left RUNNING
        parent_complete(uri, "modelsdown")
        assert Journal(tmp_path / "out" / JOURNAL).pending() == []
        assert "INCOMPLETE" not in log.read_text()
    finally:
        kill_server(server)


def test_a_store_gone_for_good_in_the_models_stage_exits_3_then_sync_and_resume_complete_the_sweep(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        spec = protected_spec(tmp_path, uri, "modelsgone")
        proc = launch(tmp_path, spec, wait_s=5)
        kill_server(server)
        log = tmp_path / "stdout.log"
        assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]   # EXIT_INCOMPLETE
        out = log.read_text()
        assert "INCOMPLETE" in out and f"sophon-ray sync {spec}" in out and str(tmp_path / "out" / JOURNAL) in out
        assert "[2/4]" not in out, "the grid ran against a store that was gone"
        journal = Journal(tmp_path / "out" / JOURNAL)
        roles = {op.data.get("role") for op in journal.pending() if op.kind == "open"}
        assert roles == {"pretrain", "protect"}, roles

        server = start_server(tmp_path, port)
        synced = subprocess.run([*CLI, "sync", str(spec)], cwd=tmp_path, env=env(tmp_path), text=True,
                                capture_output=True, timeout=120)
        assert synced.returncode == 0 and "delivered 2 of 2" in synced.stdout, synced.stdout + synced.stderr
        assert journal.pending() == []
        first = model_runs(uri, "modelsgone")
        resumed = subprocess.run([*CLI, "run", str(spec), "--resume"], cwd=tmp_path, env=env(tmp_path), text=True,
                                 capture_output=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        again = model_runs(uri, "modelsgone")
        assert {k: [r.info.run_id for r in v] for k, v in again.items()} == \
            {k: [r.info.run_id for r in v] for k, v in first.items()}
        assert_complete(uri, "modelsgone", expected=WITH_PROTECTION)
        parent_complete(uri, "modelsgone")
    finally:
        kill_server(server)


def test_a_store_down_for_30_s_during_the_searches_is_waited_out_and_every_search_trial_is_logged_once(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        _, proc = search_sweep(tmp_path, "searchdown", uri, wait_s=OUTAGE_S + 120)
        log = tmp_path / "stdout.log"
        kill_server(server)   # the search runs exist; their trials' writes and summaries meet a dead store
        time.sleep(OUTAGE_S)
        server = start_server(tmp_path, port)
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
        assert sum(outbox_failures(tmp_path)[-2:]) >= 1, "the outage never hit a search write"
        trials = finished(search_trials(uri, "searchdown"))
        per_search: dict[str, list[int]] = {}
        for parent, _, number in trials.values():
            per_search.setdefault(parent, []).append(number)
        assert len(per_search) == SEARCHES and all(sorted(n) == list(range(NUM_SAMPLES)) for n in per_search.values()), \
            per_search
        client = MlflowClient(tracking_uri=uri)
        for run in trials:   # every epoch once
            steps = [m.step for m in client.get_metric_history(run, names.RESTRICTED_ACC)]
            assert steps and sorted(steps) == list(range(len(steps))), steps
        for search_run in per_search:
            assert client.get_run(search_run).info.status == "FINISHED"
            found = [m.step for m in client.get_metric_history(search_run, names.FOUND_VAL)]
            assert found and len(found) == len(set(found)), found
        parent_complete(uri, "searchdown", report=False)   # no protected model: no report
        assert Journal(tmp_path / "out" / JOURNAL).pending() == []
    finally:
        kill_server(server)


def _journal_text(tmp: Path) -> str:
    path = tmp / "out" / JOURNAL
    return path.read_text() if path.is_file() else ""
