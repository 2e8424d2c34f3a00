"""The attack grid as a sequence of Tune runs of at most ``$SOPHON_TUNE_CHUNK`` Tune trials (issue 25: a driver whose
memory does not grow with the sweep). The planning side without Ray; then a real sweep (real Ray local, real MLflow
SQLite, the real CLI in its own process) with packs and one Tune trial per chunk: Ctrl-C in the middle stops the
sequence (no later chunk starts), ``--resume`` runs only what did not finish, every trial ends in MLflow exactly once
with every epoch once."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sophon_ray.run.packing import PackPlan, plan_packs
from sophon_ray.run.plan import plan_trials
from sophon_ray.run.tune_driver import (CHUNK, CHUNK_ENV, ChunkSizeError, chunk_plan, chunk_size, chunk_trials,
                                        tune_signals_restored)
from sophon_ray.run.validate import parse_spec
from tests.procenv import process_env

GRID = {"strategy": ["direct-all", "initfc-fc"], "optimizer": ["sgd"], "lr": [1e-3, 1e-2], "seed": [0, 1],
        "epochs": [1]}


def planned(pack: int) -> tuple[PackPlan, dict]:
    trials = plan_trials(parse_spec({"attack": {"subjects": ["normal", "scratch"], "evaluation": GRID,
                                                "pack": pack}}), [])
    return plan_packs(trials, pack), {t.key: t for t in trials}


@pytest.mark.parametrize("pack, size", [(1, 1), (1, 5), (1, 100), (3, 1), (3, 2), (3, 4), (3, 6), (3, 7)])
def test_chunks_hold_every_tune_trial_once_in_order_and_never_split_a_pack(pack, size):
    plan, table = planned(pack)
    chunks = chunk_plan(plan, size)
    assert all(1 <= len(c.units) <= size for c in chunks)
    assert [u for c in chunks for u in c.units] == plan.units          # every Tune trial once, in the plan's order
    assert len(chunks) == -(-len(plan.units) // size)
    for c in chunks:                                                    # a pack keeps all of its members
        assert all(c.packs[p] == plan.packs[p] for p in c.packs)
        assert all(why is None for _, why in c.alone)
    members = [t.key for c in chunks for t in chunk_trials(c, table)]
    assert sorted(members) == sorted(table) and len(set(members)) == len(members)   # every planned trial once


def test_an_empty_plan_has_no_chunks():
    assert chunk_plan(PackPlan({}, []), 10) == []


def test_the_chunk_size_comes_from_the_environment_and_a_bad_one_names_the_variable(monkeypatch):
    monkeypatch.delenv(CHUNK_ENV, raising=False)
    assert chunk_size() == CHUNK
    monkeypatch.setenv(CHUNK_ENV, "7")
    assert chunk_size() == 7
    for bad in ("0", "-3", "ten", "2.5"):
        monkeypatch.setenv(CHUNK_ENV, bad)
        with pytest.raises(ChunkSizeError) as err:
            chunk_size()
        assert CHUNK_ENV in str(err.value) and "unset it" in str(err.value)


def test_a_tune_run_leaves_the_signal_handlers_it_found():
    before = signal.getsignal(signal.SIGINT)
    with tune_signals_restored():
        signal.signal(signal.SIGINT, lambda *_: None)   # what Tune's run does, and leaves installed
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------ a real sweep, in chunks
EPOCHS = 2
SPEC = {
    "name": "chunktest",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 8, "channels": 3, "train_size": 200, "test_size": 60},
    "restricted": [{"dataset": "shapes_m", "image_size": 8, "channels": 3, "train_size": 200, "test_size": 60}],
    "pretrain": {"epochs": 1},
    "protect": [],
    # 2 packs of 2 (lr x seed) and a trial that cannot pack (adapt): 3 Tune trials, 5 MLflow runs
    "attack": {"subjects": ["normal"], "pack": 2,
               "evaluation": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3, 3e-3], "seed": [0, 1],
                               "epochs": [EPOCHS], "batch_size": [32], "data_fraction": [0.5]},
                              {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3], "epochs": [EPOCHS],
                               "batch_size": [32], "data_fraction": [0.5], "adapt": ["entropy"]}]},
}
TRIALS, UNITS = 5, 3


def start(tmp: Path, *args: str) -> subprocess.Popen:
    """``sophon-ray run spec.yaml ARGS`` in its own session with SIGINT's default disposition (as a foreground process
    gets it: a test run started in the background would hand it SIGINT ignored), one Tune trial per Tune run."""
    return subprocess.Popen([sys.executable, "-m", "sophon_ray.cli", "run", "spec.yaml", *args], cwd=tmp,
                            env=process_env(**{CHUNK_ENV: "1"}), text=True, stdout=open(tmp / "stdout.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finished_runs(uri: str) -> dict[str, tuple[str, int]]:
    """key -> (run id, end time) of every FINISHED attack run."""
    from tests.test_faults import attack_runs

    return {r.data.tags["sophon.key"]: (r.info.run_id, r.info.end_time) for r in attack_runs(uri, SPEC["name"])
            if r.info.status == "FINISHED"}


def assert_each_trial_once(uri: str) -> None:
    """Every trial exactly once, FINISHED, its epochs 0..EPOCHS each logged once."""
    from mlflow import MlflowClient

    from tests.test_faults import attack_runs

    client, runs = MlflowClient(tracking_uri=uri), attack_runs(uri, SPEC["name"])
    keys = [r.data.tags["sophon.key"] for r in runs]
    assert len(runs) == len(set(keys)) == TRIALS, (len(runs), len(set(keys)))
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "restricted_acc"))
        assert steps == list(range(EPOCHS + 1)), (r.info.run_name, steps)


@pytest.mark.integration
def test_ctrl_c_stops_the_chunks_and_resume_runs_only_the_rest_each_trial_once(tmp_path):
    from tests.test_faults import kill_sessions, seed_models, wait_for_store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "output_dir": str(tmp_path / "out"),
                                                        "tracking": {"uri": uri}}))
    seed_models(tmp_path / "spec.yaml")   # pretrained here: the sweep's time goes to the attack grid
    first = start(tmp_path)
    try:
        wait_for_store(tmp_path, first)
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and len(finished_runs(uri)) < 2:
            time.sleep(0.2)
        assert first.poll() is None, "the sweep ended before a chunk was seen to finish: " + \
            (tmp_path / "stdout.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGINT)       # Ctrl-C, to the driver (its Ray instance ends with it)
        assert first.wait(timeout=120) != 0
    finally:
        kill_sessions([first.pid])              # whatever the interrupted driver left behind
    log = (tmp_path / "stdout.log").read_text()
    assert f"{UNITS} Tune trials in {UNITS} Tune runs of at most 1 (${CHUNK_ENV})" in log, log[-3000:]
    before = finished_runs(uri)
    assert 2 <= len(before) < TRIALS, ("Ctrl-C did not stop the chunks after it", len(before), log[-3000:])

    second = start(tmp_path, "--resume")
    try:
        assert second.wait(timeout=400) == 0, (tmp_path / "stdout.log").read_text()[-3000:]
    finally:
        kill_sessions([second.pid])
    assert_each_trial_once(uri)
    after = finished_runs(uri)
    assert all(after[k] == v for k, v in before.items()), "a trial finished before Ctrl-C was rerun"
    log = (tmp_path / "stdout.log").read_text()
    earlier, to_run = map(int, re.findall(r"attack grid: \d+ trials, (\d+) finished earlier, (\d+) to run", log)[-1])
    assert earlier == len(before) and to_run == TRIALS - len(before), log[-3000:]
    tune_runs = [d.name for d in (tmp_path / "out" / "ray").iterdir() if d.name.startswith("attack-")]
    assert len(tune_runs) >= 3, tune_runs   # one Tune run (its experiment folder) per chunk: 2+ then 1+
