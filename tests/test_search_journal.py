"""Search trials are journaled like grid trials (issue 25): an ``mlflow server`` SIGKILLed as the search stage starts
and not back before the driver gives up leaves the search trials that finished in the journal (exit 3, the journal
named); ``sophon-ray sync`` delivers them once, and ``--resume`` continues every search from them: no finished search
trial is rerun or renumbered, every search ends with its ``num_samples`` trials, each logged once."""

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
from tests.test_faults import _free_port, env, kill_server, seed_models, spec_for, start_server

pytestmark = pytest.mark.faults

NUM_SAMPLES = 3
SEARCHES = 2   # normal and scratch


def search_trials(uri: str, experiment: str) -> dict[str, tuple[str, str, int]]:
    """Search trial runs: run id -> (search run id, status, trial number)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    everything = client.search_runs([exp.experiment_id], max_results=1000)
    return {r.info.run_id: (r.data.tags.get(names.PARENT, ""), r.info.status, int(r.data.params[names.SEARCH_TRIAL]))
            for r in everything if r.data.params.get(names.GRID) == names.SEARCH_GRID and names.SEARCH_TRIAL in
            r.data.params}


def finished(trials: dict[str, tuple[str, str, int]]) -> dict[str, tuple[str, str, int]]:
    return {k: v for k, v in trials.items() if v[1] == "FINISHED"}


def search_sweep(tmp: Path, name: str, uri: str, wait_s: float) -> tuple[Path, subprocess.Popen]:
    """A sweep of 2 searches (normal, scratch) x NUM_SAMPLES trials over a tiny grid, models seeded, started with
    ``$SOPHON_TRACKING_WAIT_S`` = ``wait_s``; returns (spec, driver) once the search stage has begun (its search
    runs exist)."""
    spec = spec_for(tmp, name, ["direct-all"], ["sgd"], uri=uri)
    data = yaml.safe_load(spec.read_text())
    data["attack"]["search"] = [{"name": "s", "num_samples": NUM_SAMPLES, "random_start": 2, "grace_period": 1,
                                 "space": {"epochs": [1, 2], "batch_size": [16, 32]}}]
    spec.write_text(yaml.safe_dump(data))
    seed_models(spec)
    log = tmp / "stdout.log"
    proc = subprocess.Popen([sys.executable, "-m", "sophon_ray.cli", "run", str(spec)], cwd=tmp,
                            env={**env(tmp), WAIT_ENV: str(wait_s)}, text=True, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and "[3/4] search:" not in log.read_text():
        time.sleep(0.2)
    return spec, proc


def test_search_trials_outlive_a_store_that_dies_then_sync_and_resume_finish_every_search_once(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        spec, proc = search_sweep(tmp_path, "sj", uri, wait_s=5)
        log = tmp_path / "stdout.log"
        kill_server(server)   # the search runs exist; every search trial's writes meet a dead store
        assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]   # EXIT_INCOMPLETE
        out = log.read_text()
        assert "INCOMPLETE" in out and f"sophon-ray sync {spec}" in out, out[-3000:]
        journal = Journal(tmp_path / "out" / JOURNAL)
        assert journal.pending(), "no search trial was left in the journal: the test did not test it"

        server = start_server(tmp_path, port)
        cli = [sys.executable, "-m", "sophon_ray.cli"]
        synced = subprocess.run([*cli, "sync", str(spec)], cwd=tmp_path, env=env(tmp_path), text=True,
                                capture_output=True, timeout=120)
        assert synced.returncode == 0 and "delivered" in synced.stdout, synced.stdout + synced.stderr
        assert journal.pending() == []
        before = finished(search_trials(uri, "sj"))
        assert before, "sync delivered no finished search trial"

        resumed = subprocess.run([*cli, "run", str(spec), "--resume"], cwd=tmp_path, env=env(tmp_path), text=True,
                                 capture_output=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        after = finished(search_trials(uri, "sj"))
        assert all(after.get(run) == row for run, row in before.items()), "a delivered search trial was rerun"
        per_search: dict[str, list[int]] = {}
        for parent, _, number in after.values():
            per_search.setdefault(parent, []).append(number)
        assert len(per_search) == SEARCHES and all(len(n) == NUM_SAMPLES == len(set(n)) for n in per_search.values()), \
            per_search
        client = MlflowClient(tracking_uri=uri)
        for run in after:   # every epoch once
            steps = [m.step for m in client.get_metric_history(run, names.RESTRICTED_ACC)]
            assert sorted(steps) == list(range(len(steps))) and steps, steps
        for parent in per_search:
            assert client.get_run(parent).info.status == "FINISHED"
    finally:
        kill_server(server)
