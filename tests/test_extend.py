"""Adding a strategy is one registration: the recipe table's mechanics on a table of its own (fast), then a
throwaway strategy with its own setting, registered by a plugin module (tests/plugin_strategy.py, named in
SOPHON_RAY_PLUGINS), through validation, a grid, a search, MLflow and the report with real Ray and MLflow."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sophon_ray import names
from sophon_ray.recipes import PLUGINS_ENV
from sophon_ray.recipes.table import RecipeTable, Setting
from tests.procenv import process_env

ROOT = Path(__file__).resolve().parents[1]


def small_table() -> RecipeTable:
    table = RecipeTable()
    table.setting(Setting("strategy", str, "a", "", choices=lambda: table.strategies.names(), since=0))
    table.setting(Setting("lr", float, 0.1, "", grid=(0.1, 0.2), low=0, low_open=True, since=0))
    table.setting(Setting("seed", int, 0, "", since=0))
    table.strategy("a")(lambda model, generator, config: [])
    table.strategy("b", settings=(Setting("k", int, 1, "k of b", search=(1, 2), low=1),))(
        lambda model, generator, config: [])
    return table


def test_a_strategy_setting_becomes_a_config_field_a_grid_axis_and_a_search_dimension():
    table = small_table()
    config, grid, space = table.freeze()
    assert [f.name for f in dataclasses.fields(config)] == ["strategy", "lr", "seed", "k"]
    assert grid().k == (1,) and grid().lr == (0.1, 0.2) and space().k == (1, 2)
    assert table.applies("k", "b") and not table.applies("k", "a") and table.applies("lr", "a")
    assert table.grid_order()[-1] == "seed"
    # added since the table: logged (and keyed) only off its default, read back as its default
    assert "k" not in table.params(config()) and table.params(config(strategy="b", k=2))["k"] == 2
    assert table.legacy_defaults() == {"k": 1} and table.casts()["k"] is int
    assert Setting("k", int, 1, "", low=1).problem(0) == "must be >= 1, got 0"


def test_the_table_refuses_duplicates_and_late_registrations():
    table = small_table()
    with pytest.raises(ValueError, match="declared twice"):
        table.setting(Setting("lr", float, 0.1, ""))
    table.freeze()
    with pytest.raises(RuntimeError, match="SOPHON_RAY_PLUGINS"):
        table.strategy("c")(lambda model, generator, config: [])


def test_a_missing_plugin_module_is_an_error_that_names_the_variable():
    proc = subprocess.run([sys.executable, "-c", "import sophon_ray.recipes"], capture_output=True, text=True,
                          env={**process_env(), PLUGINS_ENV: "no_such_module_xyz"}, cwd=ROOT)
    assert proc.returncode != 0 and f"{PLUGINS_ENV}: cannot import plugin module 'no_such_module_xyz'" in proc.stderr


SPEC = {
    "name": "extend",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 12, "channels": 3, "train_size": 300, "test_size": 100},
    "restricted": [{"dataset": "shapes_m", "image_size": 12, "channels": 3, "train_size": 300, "test_size": 100}],
    "pretrain": {"epochs": 1},
    "protect": [{"name": "v", "iterations": 4, "inner_steps": 2, "eval_every": 2, "probe_every": 2,
                 "probe_epochs": 1}],
    "attack": {"evaluation": {"strategy": ["noisy-head"], "optimizer": ["sgd"], "lr": [1e-2], "epochs": [1],
                              "head_noise": [0.0, 0.5]},
               "development": {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-2], "epochs": [1],
                               "warm_start": ["original"], "shrink": [0.5], "adapt": ["entropy"]},
               "search": [{"name": "s", "num_samples": 2, "random_start": 2, "scheduler": "none",
                           "space": {"strategy": ["noisy-head"], "head_noise": [0.1, 0.5], "epochs": [1],
                                     "batch_size": [32], "optimizer": ["sgd"], "schedule": ["constant"],
                                     "augment": ["none"], "bn_mode": ["train"]}}]},
}


def plugin_env() -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**process_env(), PLUGINS_ENV: "tests.plugin_strategy", "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}


@pytest.mark.integration
def test_a_plugin_strategy_runs_through_validation_grid_search_mlflow_and_the_report(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "output_dir": str(tmp_path / "out"),
                                    "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    cli = [sys.executable, "-m", "sophon_ray.cli"]
    plain = subprocess.run([*cli, "validate", str(spec)], capture_output=True, text=True, env=process_env(), cwd=tmp_path)
    assert plain.returncode == 2 and "unknown strategy 'noisy-head'" in plain.stdout + plain.stderr
    listed = subprocess.run([*cli, "ls"], capture_output=True, text=True, env=plugin_env(), cwd=tmp_path)
    assert "noisy-head" in listed.stdout and "head_noise" in listed.stdout
    seed = ("import sys; from pathlib import Path; from tests.test_faults import seed_models; "
            "seed_models(Path(sys.argv[1]))")  # pretrain + protect in one process: no Ray Train start
    seeded = subprocess.run([sys.executable, "-c", seed, str(spec)], capture_output=True, text=True, env=plugin_env(),
                            cwd=ROOT, timeout=600)
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    run = subprocess.run([*cli, "run", str(spec)], capture_output=True, text=True, env=plugin_env(), cwd=tmp_path,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("extend").experiment_id], max_results=500)
    grid = [r for r in runs if r.data.params.get(names.GRID) == names.EVALUATION]
    noisy = [r for r in grid if r.data.params["subject"] == "normal"]
    assert {r.data.params["strategy"] for r in noisy} == {"noisy-head"}
    # head_noise is logged where it is not its default, and the two cells are two runs
    assert sorted(r.data.params.get("head_noise", "default") for r in noisy) == ["0.5", "default"]
    assert {r.data.params["strategy"] for r in grid if r.data.params["subject"] == "scratch"} == {"direct-all"}
    searched = [r for r in runs if r.data.params.get(names.GRID) == names.SEARCH_GRID
                and r.data.params["subject"] == "normal"]
    assert len(searched) == 2 and {r.data.params["strategy"] for r in searched} == {"noisy-head"}
    assert {r.data.params["head_noise"] for r in searched} <= {"0.1", "0.5"}
    # issue 21's families through Tune and MLflow: a warm-started, shrunk, label-free-adapted development cell
    informed = [r for r in runs if r.data.params.get(names.GRID) == names.DEVELOPMENT]
    assert informed and all(r.info.status == "FINISHED" for r in informed)
    assert {(r.data.params["warm_start"], r.data.params["shrink"], r.data.params["adapt"]) for r in informed} == {
        ("original", "0.5", "entropy")}
    report = tmp_path / "out" / "report"
    assert (report / "evaluation-shapes_m-heatmap-noisy-head.png").is_file()  # a section per grid and domain
    summary = (report / "summary.md").read_text()
    assert "noisy-head" in summary
    assert "shrink + adapt entropy + warm start original" in summary   # the family section of the development grid
    # --resume finds every trial again by its key, the informed cell's included: nothing reruns
    again = subprocess.run([*cli, "run", str(spec), "--resume"], capture_output=True, text=True, env=plugin_env(),
                           cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 to run" in again.stdout, again.stdout[-3000:]
