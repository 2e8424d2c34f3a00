"""The defender search end to end through ``sophon-ray run`` (real Ray Tune over real Ray Train, real MLflow in a
temp dir): candidates exactly once under ``defend/<variant>``, the chosen setting written out and protected, and
``--resume`` reusing every finished candidate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.procenv import process_env

SPEC = {
    "name": "defend-it",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 12, "train_size": 300, "test_size": 100},
    "restricted": [{"dataset": "shapes_m", "image_size": 12, "train_size": 300, "test_size": 100}],
    "pretrain": {"epochs": 2},
    "protect": [{"name": "defended", "iterations": 10, "inner_steps": 2, "batch_size": 32, "eval_every": 5,
                 "probe_every": 5, "probe_epochs": 1, "seeds": [0],
                 "defend": {"num_samples": 2, "random_start": 2, "max_concurrent": 2, "guard": 60.0,
                            "space": {"alpha": {"distribution": "loguniform", "low": 1.0, "high": 10.0},
                                      "env_optimizers": [["sgd"], ["sgd", "adam"]]}}}],
    "attack": {"development": [{"strategy": ["direct-all"], "optimizer": ["momentum"], "lr": [1e-2],
                                "data_fraction": [0.5], "epochs": [1]}],
               "evaluation": [{"strategy": ["direct-all"], "optimizer": ["momentum"], "lr": [1e-2],
                               "data_fraction": [0.5], "epochs": [1]}]},
    "resources": {"protect_workers": 1, "cpus_per_trial": 1},
}


HARDENED = {**SPEC, "name": "defend-rounds",
            "protect": [{**SPEC["protect"][0],
                         "environments": {"recipes": {"strategy": ["direct-all", "initfc-all", "direct-fc"],
                                                      "optimizer": ["sgd", "adam", "rmsprop"],
                                                      "schedule": ["constant", "cosine"], "augment": ["none", "flip"],
                                                      "bn_mode": ["train", "frozen"]}},
                         "defend": {**SPEC["protect"][0]["defend"], "rounds": 2,
                                    "space": {"alpha": {"distribution": "loguniform", "low": 1.0, "high": 10.0}},
                                    "red_team": {"num_samples": 2, "random_start": 2, "join": 1, "share": 0.5,
                                                 "space": {"strategy": ["direct-all", "initfc-all"],
                                                           "optimizer": ["sgd", "adam"], "epochs": [1],
                                                           "batch_size": [32], "data_fraction": [0.5]}}}}]}


@pytest.mark.integration
def test_a_defend_sweep_chooses_protects_and_resumes(tmp_path):
    """Two rounds of a defender whose simulated attacker is drawn from the recipe space: candidates exactly once
    under ``defend/<variant>`` with their probe estimates, every feasible one met by the red team; round 2's
    candidates simulate round 1's choice's best find; the chosen setting written out, protected and reported;
    ``--resume`` reuses every finished candidate."""
    from mlflow import MlflowClient

    from sophon_ray.names import RED_TEAM_BEST, RED_TEAM_FOUND, ROLE, STOPPED
    from sophon_ray.run.development import found_recipes

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**HARDENED, "output_dir": str(tmp_path / "out"), "tracking": {"uri": uri}}))
    cli = [sys.executable, "-m", "sophon_ray.cli", "run", str(spec)]
    run = subprocess.run(cli, capture_output=True, text=True, env=process_env(), cwd=tmp_path, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "round 1/2: chose candidate" in run.stdout and "round 2/2: chose candidate" in run.stdout

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("defend-rounds").experiment_id
    runs = client.search_runs([exp], max_results=500)
    (defend,) = [r for r in runs if r.data.tags.get(ROLE) == "defend"]
    candidates = [r for r in runs if r.data.tags.get(ROLE) == "defend-candidate"]
    by_round = {k: [c for c in candidates if c.data.params["round"] == str(k)] for k in (1, 2)}
    assert len(by_round[1]) == 2 and len(by_round[2]) == 2
    for c in candidates:
        m = c.data.metrics
        if m["feasible"] == 1.0 and m.get(STOPPED) != 1.0:   # attacked: its red team ran, its best counts
            assert RED_TEAM_FOUND in c.data.tags and m["dev_worst_case"] >= m[RED_TEAM_BEST]
    scratch = {m.step: m.value for m in client.get_metric_history(defend.info.run_id, "dev_best_scratch")}
    for c in candidates:
        m = c.data.metrics
        assert c.info.status == "FINISHED" and "alpha" in c.data.params
        if m["feasible"] == 1.0 and m.get("last") == 1.0:   # the objective: development worst case minus scratch
            assert m["defend_objective"] == pytest.approx(m["dev_worst_case"] - scratch[int(c.data.params["round"]) - 1])
        steps = {h.step for h in client.get_metric_history(c.info.run_id, "defend_objective")}
        assert {5} <= steps and (m.get(STOPPED) == 1.0 or {10, 11} <= steps)   # probes, then the final report
    first = next(c for c in by_round[1] if c.data.params["candidate"] == defend.data.tags["round1_chosen"])
    carried = found_recipes(first.data.tags[RED_TEAM_FOUND])
    assert len(carried) == 1
    fragment = yaml.safe_load((tmp_path / "out" / "defend" / "defended.yaml").read_text())["protect"][0]
    chosen = next(c for c in by_round[2] if c.data.params["candidate"] == defend.data.tags["chosen_candidate"])
    assert fragment["alpha"] == pytest.approx(float(chosen.data.params["alpha"]))
    (protect,) = [r for r in runs if r.data.tags.get(ROLE) == "protect"]   # the chosen setting, protected, attacked
    assert float(protect.data.params["alpha"]) == pytest.approx(fragment["alpha"])
    assert fragment["environments"]["known_share"] == 0.5
    assert found_recipes(__import__("json").dumps([{k: v for k, v in r.items()} for r in
                                                   fragment["environments"]["known"]])) == carried
    history = {m.step: m.value for m in client.get_metric_history(defend.info.run_id, "dev_best_scratch")}
    assert set(history) == {0, 1}          # each round's baseline over its own development grid
    report = tmp_path / "out" / "report"
    summary = (report / "summary.md").read_text()
    assert "## Defender search" in summary and summary.count("**chosen**") == 1
    assert "- round 1: 2 candidates, chose #" in summary and "- round 2: 2 candidates, chose #" in summary
    assert (report / "defend-pareto-defended.png").is_file() and (report / "tables" / "defend.csv").is_file()

    again = subprocess.run([*cli, "--resume"], capture_output=True, text=True, env=process_env(), cwd=tmp_path,
                           timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("2 of 2 candidates finished earlier") == 2 and "0 to run" in again.stdout
    assert sum(r.data.tags.get(ROLE) == "defend-candidate" for r in client.search_runs([exp], max_results=500)) == 4
