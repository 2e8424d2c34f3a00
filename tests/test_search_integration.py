"""The adaptive attacker end to end with real Ray (local) and real MLflow (SQLite), after a driver SIGKILLed
mid-search and ``--resume`` (faults): search runs and their trials, the best-found curve, budget and benign grids,
nothing finished rerun."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sophon_ray import names
from sophon_ray.run.search_space import best_found
from tests.procenv import process_env
from tests.test_faults import kill_sessions, seed_models

NUM_SAMPLES = 4
SPEC = {
    "name": "stest",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 12, "channels": 3, "train_size": 400, "test_size": 100},
    "restricted": [{"dataset": "shapes_m", "image_size": 12, "channels": 3, "train_size": 400, "test_size": 100}],
    "benign": [{"dataset": "digits", "image_size": 12, "channels": 3}],
    "pretrain": {"epochs": 1},
    "protect": [{"name": "v", "iterations": 4, "inner_steps": 2, "eval_every": 2, "probe_every": 2,
                 "probe_epochs": 1}],
    "attack": {"evaluation": {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-2], "epochs": [2]},
               "budget": {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-2], "epochs": [3],
                          "data_fraction": [0.5, 1.0]},
               "benign": {"strategy": ["initfc-all"], "optimizer": ["adam"], "lr": [1e-3], "epochs": [2]},
               "search": [{"name": "s", "num_samples": NUM_SAMPLES, "random_start": 2, "grace_period": 1,
                           "space": {"epochs": [2, 3], "batch_size": [16, 32]}}]},
}


def env() -> dict[str, str]:
    return {**process_env(), "PYTHONUNBUFFERED": "1"}


def write_spec(tmp: Path) -> Path:
    spec = {**SPEC, "output_dir": str(tmp / "out"), "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"}}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "spec.yaml"


def start(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sophon_ray.cli", *args], cwd=tmp, env=env(), text=True,
                            stdout=open(tmp / "stdout.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)


def runs(tmp: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("stest")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def assert_searches_complete(tmp: Path) -> dict[str, list]:
    """Every search run FINISHED with NUM_SAMPLES finished trials numbered 0..N-1 once each, every trial's epochs
    logged once, and the best-found curve logged once per n and equal to the attacker's pick from its trials."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    everything = runs(tmp)
    searches = [r for r in everything if r.data.tags.get(names.ROLE) == "search"]
    assert {r.data.params[names.SUBJECT] for r in searches} == {"protected", "normal", "scratch"}
    children = {}
    for search in searches:
        assert search.info.status == "FINISHED"
        kids = [r for r in everything if r.data.tags.get(names.PARENT) == search.info.run_id
                and r.info.status == "FINISHED"]
        numbers = sorted(int(r.data.params[names.SEARCH_TRIAL]) for r in kids)
        assert len(kids) == NUM_SAMPLES and len(set(numbers)) == NUM_SAMPLES, numbers
        for kid in kids:
            assert kid.data.params[names.GRID] == names.SEARCH_GRID
            assert {names.VAL_BEST, names.AT_VAL_BEST, names.FINAL} <= set(kid.data.metrics)
            steps = [m.step for m in client.get_metric_history(kid.info.run_id, names.RESTRICTED_ACC)]
            assert sorted(steps) == list(range(len(steps))) and len(steps) >= 2, steps   # each epoch once
        found = best_found([(int(r.data.params[names.SEARCH_TRIAL]), r.data.metrics[names.VAL_BEST],
                             r.data.metrics[names.AT_VAL_BEST]) for r in kids])
        logged = client.get_metric_history(search.info.run_id, names.FOUND_TEST)
        assert sorted(m.step for m in logged) == list(range(1, NUM_SAMPLES + 1))
        assert {m.step: m.value for m in logged} == pytest.approx({f.n: f.test for f in found})
        children[search.data.params[names.SUBJECT]] = kids
    return children


def search_trials(tmp: Path) -> dict[str, str]:
    """Finished search trials: run id -> trial number."""
    return {r.info.run_id: r.data.params[names.SEARCH_TRIAL] for r in runs(tmp)
            if r.data.params.get(names.GRID) == names.SEARCH_GRID and r.info.status == "FINISHED"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep as a user has it after a crash: its driver SIGKILLed once two search trials have finished, then
    ``run --resume``. Every test below reads this end state (an uninterrupted search runs in
    test_generation_integration); one sweep instead of two keeps CI short."""
    tmp = tmp_path_factory.mktemp("search")
    spec = write_spec(tmp)
    seed_models(spec)  # pretrained and protected in this process: the sweep starts at the attacks, no Ray Train
    proc = start(tmp, "run", str(spec))
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if "[3/4] search:" in (tmp / "stdout.log").read_text() and len(search_trials(tmp)) >= 2:
            break
        time.sleep(0.5)
    kill_sessions([proc.pid])  # the driver and the local Ray instance it started, nothing else on the machine
    proc.wait(timeout=30)
    before = search_trials(tmp)
    first = (tmp / "stdout.log").read_text()
    resumed = start(tmp, "run", str(spec), "--resume")
    assert resumed.wait(timeout=600) == 0, (tmp / "stdout.log").read_text()[-3000:]
    return tmp, first, before


@pytest.mark.integration
def test_every_attacked_model_gets_a_complete_search_logged_once(sweep):
    tmp, first, _ = sweep
    children = assert_searches_complete(tmp)
    scratch = children["scratch"]
    assert {r.data.params["strategy"] for r in scratch} == {"direct-all"}      # scratch has no strategy to search
    assert "search: 3 searches" in first and "12 trials to run" in first


@pytest.mark.integration
def test_budget_and_benign_grids_fine_tune_where_they_should(sweep):
    tmp, _, _ = sweep
    # finished runs only: a search trial the kill interrupted is left KILLED (its run was opened, its params were not
    # logged yet) and rerun under another key
    attack = [r for r in runs(tmp) if r.data.tags.get(names.ROLE) == "attack" and r.info.status == "FINISHED"]
    budget = [r for r in attack if r.data.params[names.GRID] == names.BUDGET]
    benign = [r for r in attack if r.data.params[names.GRID] == names.BENIGN]
    assert len(budget) == 2 * 3 and len(benign) == 3
    assert {r.data.params[names.DOMAIN] for r in benign} == {"benign:digits"}
    assert {r.data.params["data_fraction"] for r in budget} == {"0.5", "1.0"}


@pytest.mark.faults
def test_driver_killed_mid_search_then_resume_continues_the_search(sweep):
    tmp, _, before = sweep
    assert 2 <= len(before) < 3 * NUM_SAMPLES, "the kill missed the search stage"
    after = search_trials(tmp)
    assert all(after.get(run) == n for run, n in before.items()), "a finished search trial was rerun or renumbered"
    assert len(after) == 3 * NUM_SAMPLES
