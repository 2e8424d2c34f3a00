"""analysis.search and analysis.budget: pure functions on hand-made tables, then the whole report on a real MLflow
SQLite store holding a sweep with search runs and trials, budget and benign trials in the orchestrator's layout.

Numbers (chance = 10%, 10 classes):
- search `tpe` on `shapes_m`: picks (best validation, ties: the earlier trial) protected seed 0 -> test 18,
  seed 1 -> 35 (mean 26.5, worst seed 35), normal -> 88, scratch -> 38;
- budget (40 epochs): normal reaches 80 at epoch 10 at every fraction; protected's seed-mean curve is 2e + 6 at
  fraction 0.1 (reaches 80 at epoch 37: delay), normal's own curve at 0.5 (none), flat 12 at 1.0 (wall);
- benign: protected (seed means) 72 and 52 vs normal 75 and 50.
"""

import math
import os

import matplotlib.image
import pandas as pd
import pytest
from mlflow import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

from analysis.budget import READ_EPOCH, at_epoch, break_even, break_even_text, verdict  # noqa: E402
from analysis.report import run_report  # noqa: E402
from analysis.runs import ATTACK_PARAMS  # noqa: E402
from analysis.search import explored, lr_decade, picks, searched_fields, worst_case_gap  # noqa: E402
from analysis.tables import cells  # noqa: E402
from sophon_ray import names  # noqa: E402
from sophon_ray.recipes import legacy_defaults  # noqa: E402
from tests.test_analysis import log_run  # noqa: E402

EXPERIMENT, SWEEP_ID, VARIANT, DOMAIN = "search-test", "5ea4c0ffee00", "v", "shapes_m"


# ---- pure functions ---------------------------------------------------------------------------------------------

def test_break_even_reaches_target_at_its_first_epoch_or_never():
    curve = [2.0 * e + 6 for e in range(41)]        # 80 first reached at epoch 37
    assert break_even(curve, 80.0) == 37 and break_even_text(curve, 80.0) == "37"
    assert verdict(curve, 80.0) == "delay"
    flat = [12.0] * 41
    assert break_even(flat, 80.0) is None and break_even_text(flat, 80.0) == ">40" and verdict(flat, 80.0) == "wall"
    fast = [10.0 + 7 * min(e, 10) for e in range(41)]
    assert break_even(fast, 80.0) == READ_EPOCH and verdict(fast, 80.0) == "none"
    assert at_epoch(fast) == 80.0 and at_epoch([1.0, 2.0]) == 2.0 and math.isnan(at_epoch([]))


def _trials(rows):
    keys = {names.SEARCH: "tpe", names.DOMAIN: DOMAIN, names.SUBJECT: "protected", names.VARIANT: VARIANT,
            names.PROTECT_SEED: 0, "strategy": "direct-all", "optimizer": "adam", "lr": 0.01, "augment": "none"}
    return pd.DataFrame([{**keys, **row} for row in rows])


def test_picks_take_the_best_validation_trial_earliest_on_ties():
    trials = _trials([
        {names.SEARCH_TRIAL: 0, "val_best": 12.0, "at_val_best": 11.0},
        {names.SEARCH_TRIAL: 2, "val_best": 20.0, "at_val_best": 25.0, "augment": "flip"},   # tie, later
        {names.SEARCH_TRIAL: 1, "val_best": 20.0, "at_val_best": 18.0, "strategy": "initfc-all"},
        {names.SEARCH_TRIAL: 0, "val_best": 90.0, "at_val_best": 88.0, names.SUBJECT: "normal",
         names.VARIANT: "-", names.PROTECT_SEED: -1}])
    chosen = picks(trials).set_index(names.SUBJECT)
    assert chosen.loc["protected", names.SEARCH_TRIAL] == 1 and chosen.loc["protected", "at_val_best"] == 18.0
    assert chosen.loc["protected", "trials"] == 3 and chosen.loc["normal", "trials"] == 1
    assert chosen.loc["normal", "at_val_best"] == 88.0
    assert searched_fields(trials.assign(**{k: 0 for k in ("batch_size", "data_fraction", "schedule", "epochs",
                                                             "weight_decay", "label_smoothing", "bn_mode",
                                                             "blocks", "lora_rank", "lora_alpha")})) == \
        ["strategy", "augment"]


def _found(protected, normal, scratch):
    rows = [{names.SEARCH: "tpe", names.DOMAIN: DOMAIN, names.SUBJECT: "protected", names.VARIANT: VARIANT,
             names.PROTECT_SEED: seed, "test": test} for seed, test in enumerate(protected)]
    rows += [{names.SEARCH: "tpe", names.DOMAIN: DOMAIN, names.SUBJECT: subject, names.VARIANT: "-",
              names.PROTECT_SEED: -1, "test": test} for subject, test in (("normal", normal), ("scratch", scratch))]
    return pd.DataFrame(rows)


def test_worst_case_gap_floors_at_chance():
    gap = worst_case_gap(_found([5.0, 8.0], 80.0, 6.0), chance_level=10.0).iloc[0]
    # protected 6.5 (mean) and 8 (worst seed), scratch 6: all floored at 10, so no gap at all, and held
    assert gap["mean_minus_scratch"] == 0.0 and gap["max_minus_scratch"] == 0.0
    assert gap["mean_minus_normal"] == -70.0 and gap["held"] and gap["worst_held"]
    gap = worst_case_gap(_found([5.0, 40.0], 80.0, 30.0), chance_level=10.0).iloc[0]
    assert (gap["protected_mean"], gap["protected_max"]) == (22.5, 40.0)
    assert gap["mean_minus_scratch"] == -7.5 and gap["max_minus_scratch"] == 10.0
    assert gap["held"] and not gap["worst_held"]
    assert worst_case_gap(_found([5.0], 80.0, 30.0)).iloc[0]["mean_minus_scratch"] == -25.0  # no chance: no floor


def test_explored_bins_lr_by_decade_and_keeps_the_best_test_accuracy():
    assert [lr_decade(lr) for lr in (1e-4, 5e-4, 1e-3, 0.099, 0.1)] == [-4, -4, -3, -2, -1]
    trials = _trials([{"lr": 2e-3, "at_val_best": 30.0}, {"lr": 5e-3, "at_val_best": 50.0},
                      {"lr": 0.02, "at_val_best": 40.0, "strategy": "initfc-all"}])
    best, count = explored(trials, [-4, -3, -2])
    assert best.loc["direct-all", -3] == 50.0 and count.loc["direct-all", -3] == 2
    assert math.isnan(best.loc["direct-all", -4]) and count.loc["direct-all", -4] == 0
    assert best.loc["initfc-all", -2] == 40.0 and list(best.index) == ["direct-all", "initfc-all"]


def test_cells_read_only_the_cell_grids():
    base = {**dict.fromkeys(ATTACK_PARAMS, 0), **legacy_defaults(), names.DOMAIN: DOMAIN, "strategy": "direct-all",
            "optimizer": "sgd", "lr": 0.01, "schedule": "constant", names.DATA_POOL: "disjoint", "epochs": 10}
    rows = []
    for grid, offset in ((names.EVALUATION, 0), (names.BUDGET, 1), (names.SEARCH_GRID, 2), (names.BENIGN, 3),
                         (names.DEVELOPMENT, 4)):
        rows += [{**base, names.GRID: grid, names.SUBJECT: subject, names.VARIANT: VARIANT if subject == "protected"
                  else "-", "final": value + offset, "best": value + offset}
                 for subject, value in (("protected", 10.0), ("normal", 80.0), ("scratch", 50.0))]
    runs = pd.DataFrame(rows).assign(run_id=[f"r{i}" for i in range(len(rows))])
    table = cells(runs)
    assert sorted(table[names.GRID]) == [names.DEVELOPMENT, names.EVALUATION]
    assert sorted(table["protected"]) == [10.0, 14.0]
    assert cells(runs, (names.BENIGN,))["protected"].tolist() == [13.0]


# ---- a store with every kind of run -----------------------------------------------------------------------------

def log(client, experiment_id, parent, role, name, params, metrics=None, histories=None, first_step=0):
    histories = {key: [float(v) for v in values] for key, values in (histories or {}).items()}
    return log_run(client, experiment_id, parent, SWEEP_ID, role, name, params.items(), metrics, histories,
                   first_step=first_step)


def subject_params(subject, seed):
    return {names.SUBJECT: subject, names.VARIANT: VARIANT if subject == "protected" else "-",
            names.PROTECT_SEED: seed if subject == "protected" else -1}


def recipe(**changes):
    """A recipe as an older orchestrator logged it (no label_smoothing ... lora_alpha: their defaults apply)."""
    return {"strategy": "direct-all", "optimizer": "adam", "lr": 0.01, "batch_size": 64, "data_fraction": 0.1,
            "schedule": "constant", "epochs": 4, "weight_decay": 0.0, "seed": 0, names.DATA_POOL: "disjoint",
            **changes}


def log_attack(client, eid, parent, subject, seed, grid, domain, curve, **changes):
    params = {**subject_params(subject, seed), names.GRID: grid, names.DOMAIN: domain, **recipe(**changes)}
    return log(client, eid, parent, "attack", f"{grid}-{subject}-{seed}", params,
                   {names.FINAL: curve[-1], names.BEST: max(curve)}, {names.RESTRICTED_ACC: curve})


# (search_trial, strategy, lr, augment, val_best, at_val_best) per attacked model
SEARCH_TRIALS = {
    ("protected", 0): [(0, "direct-all", 1e-3, "none", 12, 11), (1, "initfc-all", 0.01, "flip", 20, 18),
                       (2, "direct-all", 0.05, "none", 20, 25), (3, "initfc-all", 3e-4, "flip", 15, 14)],
    ("protected", 1): [(0, "direct-all", 0.02, "flip", 30, 35), (1, "direct-all", 2e-3, "none", 22, 40),
                       (2, "initfc-all", 0.002, "none", 10, 9)],
    ("normal", -1): [(0, "direct-all", 1e-3, "none", 70, 69), (1, "initfc-all", 0.01, "flip", 90, 88)],
    ("scratch", -1): [(0, "direct-all", 0.05, "none", 40, 38), (1, "direct-all", 1e-3, "flip", 25, 24)],
}
FRACTIONS = (0.1, 0.5, 1.0)


def budget_curve(subject, fraction, seed):
    normal = [10.0 + 7 * min(e, 10) for e in range(41)]
    if subject == "normal" or (subject == "protected" and fraction == 0.5):
        return normal
    if subject == "protected":
        spread = -1 if seed == 0 else 1
        return [2.0 * e + 6 + spread for e in range(41)] if fraction == 0.1 else [12.0 + spread] * 41
    slope = {0.1: 1, 0.5: 2, 1.0: 3}[fraction]
    return [min(95.0, 10.0 + slope * e) for e in range(41)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(eid, run_name="sweep", tags={names.ROLE: "sweep", names.SWEEP: SWEEP_ID}).info.run_id
    (root / "spec.yaml").write_text(f"name: {EXPERIMENT}\nmodel: {{arch: convnet, num_classes: 10}}\n")
    client.log_artifact(parent, str(root / "spec.yaml"))
    log(client, eid, parent, "pretrain", "pretrain", {}, {"original_val_acc": 96.0, "original_test_acc": 95.0})
    for seed in (0, 1):
        log(client, eid, parent, "protect", f"protect-{seed}",
                {names.VARIANT: VARIANT, "loss": "ice", names.PROTECT_SEED: seed},
                {"original_val_acc": 94.0, "original_test_acc": 93.0, "selected_iteration": 4, "rollbacks": 0})
    for subject, seeds, curve in (("protected", (0, 1), [10.0, 12, 13, 14, 14]), ("normal", (-1,), [10.0, 60, 80, 84, 85]),
                                  ("scratch", (-1,), [10.0, 30, 45, 55, 60])):
        for seed in seeds:
            log_attack(client, eid, parent, subject, seed, names.EVALUATION, DOMAIN, curve)
    for (subject, seed), trials in SEARCH_TRIALS.items():
        found, best = [], None
        for trial, strategy, lr, augment, val, test in trials:
            best = (val, test) if best is None or val > best[0] else best
            found.append(best)
        search = log(client, eid, parent, "search", f"search-{subject}-{seed}",
                         {**subject_params(subject, seed), names.DOMAIN: DOMAIN, names.SEARCH: "tpe",
                          "algorithm": "tpe", "scheduler": "asha", "num_samples": len(trials), "val_fraction": 0.2},
                         histories={names.FOUND_VAL: [v for v, _ in found], names.FOUND_TEST: [t for _, t in found]},
                         first_step=1)
        for trial, strategy, lr, augment, val, test in trials:
            params = {**subject_params(subject, seed), names.GRID: names.SEARCH_GRID, names.DOMAIN: DOMAIN,
                      names.SEARCH: "tpe", names.SEARCH_TRIAL: trial,
                      **recipe(strategy=strategy, lr=lr, epochs=10), **legacy_defaults(), "augment": augment}
            log(client, eid, search, "attack", f"search-{subject}-{trial}", params,
                    {names.FINAL: test - 1, names.BEST: test, names.VAL_BEST: val, names.AT_VAL_BEST: test,
                     names.STOPPED: float(trial == 3)}, {names.RESTRICTED_ACC: [10.0, test], names.VAL_ACC: [10, val]})
    for fraction in FRACTIONS:
        for subject, seeds in (("protected", (0, 1)), ("normal", (-1,)), ("scratch", (-1,))):
            for seed in seeds:
                log_attack(client, eid, parent, subject, seed, names.BUDGET, DOMAIN,
                           budget_curve(subject, fraction, seed), data_fraction=fraction, epochs=40)
    for domain, protected, normal, scratch in (("benign:digits", (70.0, 74.0), 75.0, 60.0),
                                               ("benign:fashion", (50.0, 54.0), 50.0, 40.0)):
        for seed, final in enumerate(protected):
            log_attack(client, eid, parent, "protected", seed, names.BENIGN, domain, [10.0, final])
        log_attack(client, eid, parent, "normal", -1, names.BENIGN, domain, [10.0, normal])
        log_attack(client, eid, parent, "scratch", -1, names.BENIGN, domain, [10.0, scratch])
    return {"uri": uri, "client": client, "parent": parent}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return run_report(store["uri"], EXPERIMENT, out, results=out / "RESULTS.md", command="sophon-ray report x")


def test_report_writes_search_and_budget_figures_and_logs_them(store, report):
    names_ = sorted(p.name for p in report.search + report.budget)
    assert names_ == sorted([f"search-found-tpe-{DOMAIN}.png", f"search-explored-tpe-{DOMAIN}.png",
                             f"budget-epochs-{DOMAIN}.png", f"budget-fraction-{DOMAIN}.png"])
    for path in report.search + report.budget:
        image = matplotlib.image.imread(path)
        assert min(image.shape[:2]) > 300 and image.std() > 0.05, path
    logged = {f.path for f in store["client"].list_artifacts(store["parent"], names.REPORT_ARTIFACTS)}
    assert {f"{names.REPORT_ARTIFACTS}/{n}" for n in names_} <= logged
    # the cell analysis saw only the evaluation cell: one heatmap, one curve figure
    assert [p.name for p in report.heatmaps] == ["heatmap-direct-all.png"]
    html = report.html.read_text()
    assert html.count("<img ") == 2 + 4 and ">Adaptive attacker: figures</h2>" in html


def test_summary_has_the_search_budget_and_benign_sections_with_their_numbers(report):
    text = report.summary.read_text()
    assert "## Adaptive attacker" in text and "## Budget: delay or wall" in text and "## Benign fine-tuning" in text
    assert "objective is its own validation split" in text
    # worst-case gap: protected 26.5 (mean of 18 and 35), worst seed 35, normal 88, scratch 38
    assert "| v | 2 | 26.5 | 35.0 | 88.0 | 38.0 | -11.5 | -3.0 | -61.5 | -53.0 | held |" in text
    # summary.md: the seed mean of the picks only (the results document has every seed)
    assert "| **protected (v) mean of 2 seeds** |  |  |  | 3.5 |  | 25.0 | 26.5 |" in text
    assert "| normal | initfc-all | flip | 0.01 | 2 | 1 | 90.0 | 88.0 |" in text
    assert "| scratch | direct-all | none | 0.05 | 2 | 0 | 40.0 | 38.0 |" in text
    # budget: normal@10 = 80; the protected seed-mean curve 2e + 6 reaches it at epoch 37, scratch (10 + e) never
    assert "| v | 0.1 | 40 | 80.0 | 26.0 | 20.0 | 86.0 | 50.0 | 37 | >40 | delay |" in text
    assert "| v | 0.5 | 40 | 80.0 | 80.0 | 30.0 | 80.0 | 90.0 | 10 | 35 | none |" in text
    assert "| v | 1 | 40 | 80.0 | 12.0 | 40.0 | 12.0 | 95.0 | >40 | 24 | wall |" in text
    assert "data fraction 0.1: **delay**" in text and "data fraction 1: **wall**" in text
    # benign: protected 72 / 52 vs normal 75 / 50; mean 62 vs 62.5
    assert "| benign:digits | v | 72.0 | 75.0 | 60.0 | -3.0 |" in text
    assert "| benign:fashion | v | 52.0 | 50.0 | 40.0 | +2.0 |" in text
    assert "| **mean of 2 cells** | v | 62.0 | 62.5 | 50.0 | -0.5 |" in text
    # the cell sections still read the evaluation grid only (one cell, 2 protection seeds)
    assert "| v | 1 | 1/1 (100%) |" in text


def test_search_budget_and_benign_tables_are_csv_with_the_summary_numbers(store, report):
    text = report.summary.read_text()
    assert set(report.tables) == {"intactness", "protect", "robustness", "cells", "search", "search_picks", "budget",
                                  "benign"}
    logged = {f.path for f in store["client"].list_artifacts(store["parent"], f"{names.REPORT_ARTIFACTS}/tables")}
    assert logged == {f"{names.REPORT_ARTIFACTS}/tables/{name}.csv" for name in report.tables}
    gap = pd.read_csv(report.tables["search"])
    g = gap.iloc[0]
    assert len(gap) == 1 and (g.search, g.domain, g.variant, g.seeds) == ("tpe", DOMAIN, "v", 2)
    assert (f"| v | 2 | {g.protected_mean:.1f} | {g.protected_max:.1f} | {g.normal:.1f} | {g.scratch:.1f} | "
            f"{g.mean_minus_scratch:+.1f} | {g.max_minus_scratch:+.1f} | {g.mean_minus_normal:+.1f} | "
            f"{g.max_minus_normal:+.1f} | held |") in text
    chosen = pd.read_csv(report.tables["search_picks"])
    assert sorted(chosen["subject"]) == ["normal", "protected", "protected", "scratch"]
    protected = chosen[chosen["subject"] == "protected"]
    assert f"| {protected['val_best'].mean():.1f} | {protected['at_val_best'].mean():.1f} |" in text
    budget = pd.read_csv(report.tables["budget"])
    assert list(budget["data_fraction"]) == [0.1, 0.5, 1.0] and list(budget["verdict"]) == ["delay", "none", "wall"]
    assert "protected_curve" not in budget.columns  # curves (lists) are left out of the CSV
    for _, b in budget.iterrows():
        assert (f"| {b['normal@10']:.1f} | {b['protected@10']:.1f} | {b['scratch@10']:.1f} | "
                f"{b['protected@last']:.1f} | {b['scratch@last']:.1f} | {b.break_even_protected} | "
                f"{b.break_even_scratch} | {b.verdict} |") in text
    benign = pd.read_csv(report.tables["benign"])
    for c in benign.itertuples():
        assert (f"| {c.domain} | {c.variant} | {c.protected:.1f} | {c.normal:.1f} | {c.scratch:.1f} | "
                f"{c.protected_minus_normal:+.1f} |") in text

def test_results_document_has_every_protection_seed(report):
    text = report.results.read_text()
    assert "## Adaptive attacker" in text and "restricted *test* split only scores the picks" in text
    assert "| protected (v) seed 0 | initfc-all | flip | 0.01 | 4 | 1 | 20.0 | 18.0 |" in text
    assert "| protected (v) seed 1 | direct-all | flip | 0.02 | 3 | 0 | 30.0 | 35.0 |" in text
    assert "| v | 0 | 0.1 | 25.0 | 85.0 | 38 | delay |" in text     # seed 0: 2e + 5 reaches 80 at 37.5 -> 38
    assert "| v | 1 | 0.1 | 27.0 | 87.0 | 37 | delay |" in text     # seed 1: 2e + 7 -> 36.5 -> 37
    assert "| benign:digits | v | 72.0 | s0 70.0, s1 74.0 | 75.0 | 60.0 | -3.0 |" in text


def test_the_console_overview_names_each_search_verdict():
    from analysis.search import Searches, search_overview

    runs = pd.DataFrame([
        {names.SEARCH: "s", names.DOMAIN: "d", names.SUBJECT: "protected", names.VARIANT: "v", names.PROTECT_SEED: 0,
         "found": [20.0, 30.0]},
        {names.SEARCH: "s", names.DOMAIN: "d", names.SUBJECT: "protected", names.VARIANT: "v", names.PROTECT_SEED: 1,
         "found": [50.0]},
        {names.SEARCH: "s", names.DOMAIN: "d", names.SUBJECT: "normal", names.VARIANT: "-", names.PROTECT_SEED: -1,
         "found": [70.0]},
        {names.SEARCH: "s", names.DOMAIN: "d", names.SUBJECT: "scratch", names.VARIANT: "-", names.PROTECT_SEED: -1,
         "found": [45.0]}])
    text = search_overview(Searches(runs, pd.DataFrame()), chance_level=10.0)
    assert text == ("search s/d, v: best found on protected 40.0 (worst seed 50.0) vs scratch 45.0, normal 70.0: "
                    "NOT held (held: protected <= scratch + 1)")
    assert search_overview(Searches(runs.iloc[0:0], pd.DataFrame())) == ""


def _labelled_parts(metric=None):
    """search_overview, search_section, budget_section and benign_section on small hand-made tables (default
    metric when ``metric`` is None)."""
    from analysis.budget import GridRuns, benign_section, budget_section
    from analysis.search import Searches, search_overview, search_section

    kwargs = {} if metric is None else {"metric": metric}
    settings = {"algorithm": "tpe", "scheduler": "asha", "num_samples": 2, "val_fraction": 0.2}
    runs = pd.DataFrame([{**keys, **settings, names.SEARCH: "tpe", names.DOMAIN: DOMAIN, "found": found}
                         for keys, found in ((subject_params("protected", 0), [20.0, 30.0]),
                                             (subject_params("normal", 0), [70.0]),
                                             (subject_params("scratch", 0), [45.0]))])
    trials = _trials([{**subject_params(subject, 0), names.SEARCH_TRIAL: trial, "val_best": val, "at_val_best": test,
                       "strategy": strategy}
                      for subject, trial, val, test, strategy in (("protected", 0, 12.0, 11.0, "direct-all"),
                                                                  ("protected", 1, 20.0, 18.0, "initfc-all"),
                                                                  ("normal", 0, 90.0, 88.0, "direct-all"),
                                                                  ("scratch", 0, 40.0, 38.0, "direct-all"))])
    trials = trials.assign(**{k: v for k, v in recipe().items() if k not in trials}, **{
        k: v for k, v in legacy_defaults().items() if k not in trials})
    searches = Searches(runs, trials)
    base = {**dict.fromkeys(ATTACK_PARAMS, 0), **legacy_defaults(), **recipe(epochs=12)}
    rows = [{**base, **subject_params(subject, seed), names.GRID: grid, names.DOMAIN: domain, "final": curve[-1],
             "best": max(curve), "curve": curve}
            for grid, domain in ((names.BUDGET, DOMAIN), (names.BENIGN, "benign:digits"))
            for subject, seed, curve in (("protected", 0, [10.0, 12.0]), ("protected", 1, [10.0, 14.0]),
                                         ("normal", -1, [10.0 + 7 * e for e in range(13)]),
                                         ("scratch", -1, [10.0 + 2 * e for e in range(13)]))]
    grid = pd.DataFrame(rows).assign(run_id=[f"r{i}" for i in range(len(rows))])
    curves = dict(zip(grid["run_id"], grid["curve"]))
    budget = GridRuns(grid[grid[names.GRID] == names.BUDGET].drop(columns="curve"), curves)
    benign = GridRuns(grid[grid[names.GRID] == names.BENIGN].drop(columns="curve"), curves)
    return {"overview": search_overview(searches, **kwargs), "search": search_section(searches, **kwargs),
            "budget": budget_section(budget, **kwargs), "benign": benign_section(benign, **kwargs)}


def test_search_and_budget_text_names_the_sweeps_metric():
    generation = _labelled_parts(names.SKILL)
    for part, text in generation.items():
        assert text and "denoising skill" in text and "accuracy" not in text, (part, text)
    assert "floored at 0 (predicting zero noise)" in generation["search"] and "chance" not in generation["search"]
    assert "| val skill (objective) | test skill |" in generation["search"]
    for part, text in _labelled_parts().items():    # classification: the default, worded as before
        assert "denoising skill" not in text, (part, text)
        assert part == "overview" or "accuracy" in text, (part, text)
    assert _labelled_parts(names.ACCURACY) == _labelled_parts()
