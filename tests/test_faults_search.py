"""Search trials that finished in Tune but were not yet in MLflow when the driver died (issue 25, deliverable 7),
with real processes: the SQLite store's write lock taken by another process as the search stage starts (every
write then waits and fails: a store that does not answer, while it can still be read), the driver's whole session
SIGKILLed once the search's trials have all finished in Tune (their FINISHED status journaled, not acknowledged: the
driver waits for the store), the lock released, then ``sophon-ray run --resume``: each journaled trial is delivered
once (its run, its epochs, its summary), counted as finished, never rerun, and the search ends with its
``num_samples`` trials.

Why every trial, not the first: a resumed search with trials left starts Ray again (~30 s on 2 busy cores) to
prove the same thing, that a journaled trial is not run again; a trial killed mid-run and a search continued after
a kill are test_search_integration.py's and test_search_journal.py's. The store is locked rather than an ``mlflow
server`` killed and restarted (test_search_journal.py's way): this test took 223 s with a server, 131 s with the lock
(2 cores at load ~13, 2026-12-06)."""

import math
import sqlite3
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
from tests.test_faults import env, kill_sessions, seed_models, spec_for

pytestmark = pytest.mark.faults

NUM_SAMPLES = 3


def search_keys(records: list[dict]) -> set[str]:
    """The keys of the search trials opened in these journal records."""
    return {r["key"] for r in records if r["op"] == "open" and r.get("params", {}).get(names.GRID) == names.SEARCH_GRID}


def finished_keys(records: list[dict]) -> set[str]:
    """The keys whose FINISHED status is in these journal records."""
    return {r["key"] for r in records if r["op"] == "finish" and r["status"] == "FINISHED"}


def unacknowledged_finished(journal: Journal) -> set[str]:
    """Search trials whose FINISHED status the journal holds and has not acknowledged (not known to be in MLflow)."""
    pending = [{"key": op.key, "op": op.kind, **op.data} for op in journal.pending()]
    return finished_keys(pending) & search_keys(journal.records())


def runs_by_key(uri: str, experiment: str) -> dict[str, list]:
    """Every run with a key, by key (a key with two runs shows as two)."""
    client = MlflowClient(tracking_uri=uri)
    everything = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    out: dict[str, list] = {}
    for r in everything:
        if names.KEY in r.data.tags:
            out.setdefault(r.data.tags[names.KEY], []).append(r)
    return out


def journaled_rows(records: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """What the journal holds of one trial's metrics: metric -> sorted distinct (step, value)."""
    points: dict[str, set[tuple[int, float]]] = {}
    for r in records:
        if r["key"] == key and r["op"] == "rows":
            for step, row in r["rows"]:
                for k, v in row.items():
                    if math.isfinite(v):   # the store skips the others
                        points.setdefault(k, set()).add((int(step), float(v)))
    return {k: sorted(v) for k, v in points.items()}


def write_lock(db: Path) -> sqlite3.Connection:
    """Another process's open write transaction on the SQLite database ``db`` (WAL mode: readers go on, every writer
    waits MLflow's busy timeout, 20 s, and fails); ROLLBACK and close the connection to release it."""
    connection = sqlite3.connect(db, timeout=30, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} never happened (driver exit {proc.poll()}): {log.read_text()[-3000:]}")


def test_search_trials_finished_only_in_the_journal_when_the_driver_died_are_delivered_once_never_rerun(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_for(tmp_path, "sk", ["direct-all"], ["sgd"], uri=uri, restricted_train=300)
    data = yaml.safe_load(spec.read_text())
    data["attack"]["subjects"] = ["normal"]
    data["attack"]["evaluation"]["epochs"] = [1]   # the grid (one trial) only has to be there
    data["attack"]["search"] = [{"name": "s", "num_samples": NUM_SAMPLES, "random_start": 2, "grace_period": 1,
                                 "space": {"epochs": [1, 2], "batch_size": [16, 32]}}]
    spec.write_text(yaml.safe_dump(data))
    seed_models(spec)
    log = tmp_path / "stdout.log"
    proc = subprocess.Popen([sys.executable, "-m", "sophon_ray.cli", "run", str(spec)], cwd=tmp_path,
                            env={**env(tmp_path), WAIT_ENV: "600"}, text=True, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    lock = None
    try:
        wait_for(lambda: "[3/4] search:" in log.read_text(), proc, log, "the search stage")
        lock = write_lock(tmp_path / "mlflow.db")   # the search run exists; the trials' writes wait in the journal
        journal = Journal(tmp_path / "out" / JOURNAL)
        wait_for(lambda: len(unacknowledged_finished(journal)) == NUM_SAMPLES, proc, log, "the search trials finishing")
    finally:
        kill_sessions([proc.pid])   # the driver and its local Ray instance, SIGKILLed: no drain, no clean-up
        proc.wait(timeout=30)
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
    at_kill = journal.records()
    held = unacknowledged_finished(journal)   # finished in Tune, journaled, not acknowledged ...
    done = finished_keys(at_kill) & search_keys(at_kill)
    assert len(held) == NUM_SAMPLES and held == done, (held, done)
    before = runs_by_key(uri, "sk")          # ... and not FINISHED in MLflow
    assert not [k for k in held for r in before.get(k, []) if r.info.status == "FINISHED"], "delivered already"

    resumed = subprocess.run([sys.executable, "-m", "sophon_ray.cli", "run", str(spec), "--resume"], cwd=tmp_path,
                             env=env(tmp_path), text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    to_run = NUM_SAMPLES - len(held)   # the journaled trials count as finished: only the rest run
    assert f"1 searches (search x attacked model x domain), {to_run} trials to run" in resumed.stdout, \
        resumed.stdout[-3000:]
    reopened = search_keys(journal.records()[len(at_kill):])   # the trials the resumed run started
    assert len(reopened) == to_run and not reopened & search_keys(at_kill), (reopened, held)
    assert journal.pending() == []

    after = runs_by_key(uri, "sk")
    assert all(len(runs) == 1 for runs in after.values()), {k: len(v) for k, v in after.items() if len(v) > 1}
    trials = {k: runs[0] for k, runs in after.items() if runs[0].data.params.get(names.GRID) == names.SEARCH_GRID}
    complete = {k: r for k, r in trials.items() if r.info.status == "FINISHED"}
    numbers = sorted(int(r.data.params[names.SEARCH_TRIAL]) for r in complete.values())
    assert len(complete) == NUM_SAMPLES == len(set(numbers)) and held <= set(complete), (numbers, held)
    client = MlflowClient(tracking_uri=uri)
    for key, run in trials.items():   # every logged point once
        for metric in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert len(steps) == len(set(steps)), (key, metric, steps)
    for key in held:   # delivered from the journal, as the killed run computed it
        run_id = complete[key].info.run_id
        for metric, points in journaled_rows(at_kill, key).items():
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
            assert [s for s, _ in logged] == [s for s, _ in points], (key, metric, logged, points)
            assert [v for _, v in logged] == pytest.approx([v for _, v in points]), (key, metric)
    searches = [r for runs in after.values() for r in runs if r.data.tags.get(names.ROLE) == "search"]
    assert len(searches) == 1 and searches[0].info.status == "FINISHED"
    found = client.get_metric_history(searches[0].info.run_id, names.FOUND_TEST)
    assert sorted(m.step for m in found) == list(range(1, NUM_SAMPLES + 1))
