"""analysis/ against a real MLflow SQLite store holding a small sweep logged in the orchestrator's layout.

Numbers are chosen so every cell can be checked by hand: each curve is a base curve plus an offset of
seed + 2 x optimizer index + lr index (+ 4 x strategy index, except scratch, which is strategy-free).
Protected stays low (final 13 + offset), normal is high (85 + offset), scratch in between (60 + offset).
"""

import os
import subprocess
import sys
import time

import matplotlib.image
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

from analysis import summary  # noqa: E402
from analysis.report import run_report  # noqa: E402
from analysis.results import HAND_WRITTEN, merge_results  # noqa: E402
from analysis.runs import (ATTACK_PARAMS, PretrainRun, RunsNotFoundError, find_sweep, load_curves,  # noqa: E402
                           load_num_classes, load_runs)
from analysis.tables import cells  # noqa: E402
from sophon_ray.recipes import legacy_defaults  # noqa: E402

RECIPE_DEFAULTS = legacy_defaults()

EXPERIMENT = "analysis-test"
SWEEP_ID = "a1b2c3d4e5f6"
OLD_SWEEP_ID = "000000000000"
STRATEGIES = ("direct-all", "initfc-fc")
OPTIMIZERS = ("sgd", "adam")
LRS = (0.001, 0.01)
SEEDS = (0, 1)
BASE = {"protected": [10, 11, 12, 12, 13], "normal": [10, 60, 75, 82, 85], "scratch": [10, 30, 45, 55, 60]}
VARIANT = "ice-sampled"
SELECTED_REASON = "lowest probe 11.0 of 2 probed state(s) at or above the floor 94.0 (select_prefer protection)"
PRETRAIN_TEST_ACC, PROTECTED_TEST_ACC = 95.0, 93.5


def curve(subject: str, strategy: str, optimizer: str, lr: float, seed: int) -> list[float]:
    offset = seed + 2 * OPTIMIZERS.index(optimizer) + LRS.index(lr)
    offset += 0 if subject == "scratch" else 4 * STRATEGIES.index(strategy)
    return [float(value + offset) for value in BASE[subject]]


def log_run(client, experiment_id, parent_id, sweep_id, role, name, params=(), metrics=None,
            histories=None, start_time=None, first_step=0):
    tags = {"mlflow.parentRunId": parent_id, "sophon.sweep_id": sweep_id, "sophon.role": role}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags, start_time=start_time).info.run_id
    now = int(time.time() * 1000)
    logged = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    for key, values in (histories or {}).items():
        logged += [Metric(key, v, now + step, step) for step, v in enumerate(values, start=first_step)]
    client.log_batch(run_id, metrics=logged, params=[Param(k, str(v)) for k, v in params])
    client.set_terminated(run_id)
    return run_id


def log_attack(client, experiment_id, parent_id, subject, strategy, optimizer, lr, seed, sweep_id=SWEEP_ID):
    values = curve(subject, strategy, optimizer, lr, seed)
    params = [("subject", subject), ("variant", VARIANT if subject == "protected" else "-"),
              ("protect_seed", 0 if subject == "protected" else -1), ("grid", "evaluation"), ("domain", "shapes_m"),
              ("data_pool", "disjoint"), ("strategy", strategy), ("optimizer", optimizer), ("lr", lr),
              ("batch_size", 64), ("data_fraction", 0.1), ("schedule", "constant"), ("epochs", len(values) - 1),
              ("seed", seed), ("weight_decay", 0.0)]
    metrics = {"restricted_acc_final": values[-1], "restricted_acc_best": max(values), "original_acc": 90.0}
    histories = {"restricted_acc": values, "restricted_loss": [3.0 - v / 50 for v in values]}
    return log_run(client, experiment_id, parent_id, sweep_id, "attack", f"{subject}-{strategy}-{optimizer}",
                   params, metrics, histories)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with an old decoy sweep and the sweep under test (its parent run id is returned)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())

    old = client.create_run(experiment_id, run_name=f"sweep-{OLD_SWEEP_ID}", start_time=1,
                            tags={"sophon.role": "sweep", "sophon.sweep_id": OLD_SWEEP_ID}).info.run_id
    log_attack(client, experiment_id, old, "normal", "direct-all", "sgd", 0.001, 0, sweep_id=OLD_SWEEP_ID)

    parent = client.create_run(experiment_id, run_name=f"sweep-{SWEEP_ID}",
                               tags={"sophon.role": "sweep", "sophon.sweep_id": SWEEP_ID}).info.run_id
    (root / "spec.yaml").write_text(f"name: {EXPERIMENT}\nmodel: {{arch: convnet, num_classes: 10}}\n")
    client.log_artifact(parent, str(root / "spec.yaml"))
    log_run(client, experiment_id, parent, SWEEP_ID, "pretrain", "pretrain",
            metrics={"original_val_acc": 96.0, "original_test_acc": PRETRAIN_TEST_ACC})
    protect = log_run(client, experiment_id, parent, SWEEP_ID, "protect", f"protect-{VARIANT}",
                      params=[("variant", VARIANT), ("loss", "ice"), ("protect_seed", 0)],
                      metrics={"original_val_acc": 94.0, "original_test_acc": PROTECTED_TEST_ACC,
                               "intactness_drop": PRETRAIN_TEST_ACC - PROTECTED_TEST_ACC, "probe_acc": 11.0,
                               "selected_iteration": 40, "rollbacks": 0},
                      histories={"fts_loss": [2.3, 2.2], "ntr_loss": [0.5, 0.4], "original_acc": [95.0, 93.5]})
    client.set_tag(protect, "selected_reason", SELECTED_REASON)   # as the orchestrator tags a protect run
    for strategy in STRATEGIES:
        for optimizer in OPTIMIZERS:
            for lr in LRS:
                for seed in SEEDS:
                    for subject in ("protected", "normal") + (("scratch",) if strategy == "direct-all" else ()):
                        log_attack(client, experiment_id, parent, subject, strategy, optimizer, lr, seed)
    # A trial that failed before its summary metrics: left out of every table.
    log_run(client, experiment_id, parent, SWEEP_ID, "attack", "failed", params=[("subject", "normal")])
    return {"uri": uri, "parent": parent, "client": client}


@pytest.fixture(scope="module")
def runs(store):
    return load_runs(store["uri"], EXPERIMENT)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return run_report(store["uri"], EXPERIMENT, tmp_path_factory.mktemp("report"))  # num_classes from spec.yaml


def test_load_runs_picks_newest_sweep_and_types_params(runs):
    # 2 strategies x 2 optimizers x 2 lrs x 2 seeds x {protected, normal} + 2 x 2 x 2 shared scratch runs.
    assert len(runs) == 2 * 2 * 2 * 2 * 2 + 2 * 2 * 2
    assert runs["subject"].value_counts().to_dict() == {"protected": 16, "normal": 16, "scratch": 8}
    assert set(runs[runs["subject"] == "scratch"]["strategy"]) == {"direct-all"}
    for column, kind in {"lr": "f", "data_fraction": "f", "weight_decay": "f", "final": "f",
                         "batch_size": "i", "epochs": "i", "seed": "i", "protect_seed": "i"}.items():
        assert runs[column].dtype.kind == kind, column
    assert set(runs["lr"]) == set(LRS) and set(runs["batch_size"]) == {64}
    assert set(runs[runs["subject"] == "protected"]["protect_seed"]) == {0}
    assert set(runs[runs["subject"] != "protected"]["protect_seed"]) == {-1}
    one = runs[(runs["subject"] == "normal") & (runs["strategy"] == "initfc-fc") & (runs["optimizer"] == "adam")
               & (runs["lr"] == 0.01) & (runs["seed"] == 1)]
    assert one["final"].tolist() == [85.0 + 1 + 2 + 1 + 4]


def test_find_sweep_by_id_and_curves(store, runs):
    assert find_sweep(store["uri"], EXPERIMENT, OLD_SWEEP_ID).sweep_id == OLD_SWEEP_ID
    assert find_sweep(store["uri"], EXPERIMENT).parent_run_id == store["parent"]
    run_id = runs[(runs["subject"] == "scratch") & (runs["optimizer"] == "sgd") & (runs["lr"] == 0.001)
                  & (runs["seed"] == 0)]["run_id"].item()
    assert load_curves(store["uri"], [run_id]) == {run_id: [10.0, 30.0, 45.0, 55.0, 60.0]}


def test_curves_are_read_in_bulk_chunks_and_match_one_history_call_per_run(store, runs, monkeypatch):
    import analysis.runs as runs_module

    ids = list(runs["run_id"])
    one_by_one = {r: [m.value for m in sorted(store["client"].get_metric_history(r, "restricted_acc"),
                                              key=lambda m: m.step)] for r in ids}
    monkeypatch.setattr(runs_module, "BULK_RUNS", 3)  # several chunks, the last one short
    calls = []
    real = MlflowClient.get_metric_history
    monkeypatch.setattr(MlflowClient, "get_metric_history", lambda self, *a: calls.append(a) or real(self, *a))
    assert load_curves(store["uri"], ids) == one_by_one and not calls  # no per-run call
    monkeypatch.setattr(runs_module, "BULK_POINTS", 2)  # every chunk's answer looks cut short: read run by run
    assert load_curves(store["uri"], ids) == one_by_one and len(calls) == len(ids)


def test_curves_fall_back_to_one_public_history_call_per_run_when_the_bulk_read_fails(store, runs, monkeypatch):
    """The bulk read is MLflow's internal (UI) API: when it fails, the public per-run read gives the same curves."""
    import analysis.runs as runs_module

    ids = list(runs["run_id"])
    expected = load_curves(store["uri"], ids)

    def broken(client):
        def read(ids, key):
            raise RuntimeError("no such endpoint")
        return read

    monkeypatch.setattr(runs_module, "_bulk_reader", broken)
    assert load_curves(store["uri"], ids) == expected


def test_cells_average_seeds_and_join_scratch_across_strategies(runs):
    table = cells(runs)
    assert len(table) == 2 * 2 * 2  # one variant x strategies x optimizers x lrs
    row = table[(table["strategy"] == "initfc-fc") & (table["optimizer"] == "adam") & (table["lr"] == 0.01)].iloc[0]
    # Seed mean offset: 0.5 (seeds 0, 1) + 2 (adam) + 1 (lr 0.01) + 4 (initfc-fc); scratch has no strategy term.
    assert (row["protected"], row["normal"], row["scratch"]) == (20.5, 92.5, 63.5)
    assert row["protected_minus_scratch"] == -43.0
    assert row["protected_seeds"] == row["normal_seeds"] == row["scratch_seeds"] == 2
    scratch_runs = runs[runs["run_id"].isin(row["scratch_runs"])]
    assert set(scratch_runs["strategy"]) == {"direct-all"} and set(scratch_runs["optimizer"]) == {"adam"}
    assert table["scratch"].notna().all()


def test_report_writes_valid_pngs(report):
    names = sorted(p.name for p in report.heatmaps + report.curves)
    assert names == ["curves-direct-all.png", "curves-initfc-fc.png", "heatmap-direct-all.png",
                     "heatmap-initfc-fc.png"]  # one grid and domain: no prefix; no secondary setting varies
    for path in report.heatmaps + report.curves:
        assert path.stat().st_size > 20_000, path
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 300, (path, image.shape)
        assert image.std() > 0.05, f"{path} looks blank"


def test_a_one_panel_curves_figure_keeps_its_title_and_legend_inside():
    """A sweep with one optimizer and a long variant name draws one narrow panel: the title is wrapped and the
    legend split into rows so that neither runs off the figure (they did: the PNG cut both at its edges)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analysis.curves import figure
    lines = pd.DataFrame([{"label": label, "optimizer": "adam", "lr": lr, "curve": [1.0, 20.0, 40.0]}
                          for label in ("protected (dos-official-adam-sim-fts-200)", "normal", "scratch")
                          for lr in (1e-4, 1e-3)])
    title = ("dos-official-pool (sweep 2b6a26093922) — direct-all: restricted-domain denoising skill, "
             "% after fine-tuning")
    fig = figure(lines, title, "mean over seeds; batch_size 32; data_fraction 0.05; schedule constant; epochs 20")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    inside = fig.bbox.expanded(1.0, 1.0)
    for artist in (fig._suptitle, fig.legends[0]):
        box = artist.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
            (artist, box, fig.bbox)


def test_summary_has_hand_computed_numbers(report):
    text = report.summary.read_text()
    # Intactness: 95.0 normal vs 93.5 protected.
    assert f"| {VARIANT} | ice | 1 | 95.0 | 93.5 (93.5-93.5) | +1.5 | +1.5 |" in text
    # Cell (initfc-fc, adam, 0.01): scratch seed-mean curve [13.5, 33.5, 48.5, 58.5, 63.5], tau = 57.15 is
    # reached at epoch 3; normal reaches it at epoch 1 (1/3), protected never (censored: budget 4 / 3).
    assert "| initfc-fc | adam | 0.01 | 20.5 | 92.5 | 63.5 | -43.0 | held, meaningful | >=1.3 | 0.33 |" in text
    # Every cell held, normal holds none, all meaningful; normal - protected = 72 everywhere; with 10 classes
    # (from the logged spec) no protected final (13.5 .. 20.5) is under chance - 2 = 8. The best attack on the
    # protected model (20.5) is 43 points under the best from scratch (63.5, in another cell than the worst).
    assert f"| {VARIANT} | 8 | 8/8 (100%) | 0/8 (0%) | 8 | 8/8 (100%) | 72.0 | +72.0 | 20.5 | 63.5 | -43.0 | 0 |" in text
    assert "| protected (ice-sampled) | 20.5 | initfc-fc, adam, lr 0.01 |" in text
    assert "| scratch | 63.5 | adam, lr 0.01 |" in text
    assert "every cell has batch_size 64, data_fraction 0.1, schedule constant, epochs 4, weight_decay 0" in text
    assert "## Evaluation grid, restricted domain `shapes_m`" in text


def test_report_is_logged_to_parent_run(store, report):
    client = store["client"]
    logged = {f.path for f in client.list_artifacts(store["parent"], "report") if not f.is_dir}
    assert logged == {f"report/{p.name}" for p in report.heatmaps + report.curves + [report.summary, report.html]}
    tables = {f.path for f in client.list_artifacts(store["parent"], "report/tables")}
    assert tables == {f"report/tables/{name}.csv" for name in report.tables} and "report/tables/cells.csv" in tables
    assert sorted(report.artifacts) == sorted(logged | tables)


def test_html_report_embeds_every_figure_and_table_and_loads_nothing(report):
    from tests.test_html import Page, external_references

    path = report.html
    assert path == report.summary.parent / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    sources = [attrs["src"] for attrs in page.all("img")]
    assert len(sources) == len(report.heatmaps) + len(report.curves) == 4
    assert all(src.startswith("data:image/png;base64,") and len(src) > 20_000 for src in sources)
    assert not external_references(page) and not page.all("link") and not page.all("script")
    assert "http://" not in text and "https://" not in text
    # the summary's sections and tables, with the same numbers
    for heading in ("Intactness (original domain)", "Robustness per protected variant (seed means)",
                    "Best attack found on each subject", "Label-information leaks (protected below chance)",
                    "Cells"):
        assert f">{heading}</h" in text, heading
    assert len(page.all("table")) == 4  # intactness, robustness, best attacks, cells (no leaks: "None.")
    assert ("<td>initfc-fc</td><td>adam</td><td class=\"r\">0.01</td><td class=\"r\">20.5</td>"
            "<td class=\"r\">92.5</td><td class=\"r\">63.5</td>") in text


def test_summary_cli_writes_markdown(store, tmp_path):
    # --num-classes overrides the spec's 10: chance 20%, so the 5 cells with protected < 18 are leaks, and every
    # comparison floors the protected finals (13.5 .. 20.5) at 20: the median gap to normal shrinks.
    assert summary.main(["--tracking-uri", store["uri"], "--experiment", EXPERIMENT, "--sweep-id", SWEEP_ID,
                         "--out", str(tmp_path), "--num-classes", "5"]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith(f"# {EXPERIMENT}: sweep {SWEEP_ID}")
    assert "| 20.5 | 63.5 | -43.0 | 5 |" in text and "floored at chance (20%)" in text
    assert "| ice-sampled | 8 | 8/8 (100%) | 0/8 (0%) | 8 | 8/8 (100%) | 69.0 |" in text  # gaps 65.5..71.5 and 72
    assert load_num_classes(find_sweep(store["uri"], EXPERIMENT, OLD_SWEEP_ID)) is None  # it logged no spec


def test_missing_experiment_and_sweep_name_the_fix(store, capsys):
    with pytest.raises(RunsNotFoundError, match="no MLflow experiment named 'nope'") as err:
        load_runs(store["uri"], "nope")
    assert store["uri"] in str(err.value) and EXPERIMENT in str(err.value) and "--experiment" in str(err.value)
    with pytest.raises(RunsNotFoundError, match=f"sweep ids there: .*{OLD_SWEEP_ID}.*--sweep-id"):
        load_runs(store["uri"], EXPERIMENT, sweep_id="ffffffffffff")
    assert summary.main(["--tracking-uri", store["uri"], "--experiment", "nope", "--out", "unused"]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_analysis_imports_neither_torch_nor_ray():
    code = ("import sys, analysis.report; heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'});"
            " print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_results_document_states_the_protocol_and_keeps_the_hand_written_part(store, tmp_path):
    path = tmp_path / "RESULTS.md"
    run_report(store["uri"], EXPERIMENT, tmp_path / "r1", log_to_parent=False, results=path, command="sophon-ray x")
    first = path.read_text()
    assert "Written by `sophon-ray x`" in first and "## Protocol" in first and first.rstrip().endswith(HAND_WRITTEN)
    assert "**Evaluation grid**" in first and "attack seeds [0, 1]; 8 cells; 40 fine-tuning runs." in first
    assert f"| {VARIANT} | 0 | 94.0 | 93.5 | +1.5 | 40 | 0 | {SELECTED_REASON} |" in first   # intactness per seed
    assert "| selected iteration | rollbacks | why this iteration |" in first                 # ... and why that one
    assert f"| **{VARIANT}** (seed means) | 8 | 8/8 (100%) |" in first
    assert f"| {VARIANT} seed 0 | 8 | 8/8 (100%) |" in first                                  # per protection seed
    assert "Meaningful cells (normal > scratch + 5): **8 of 8** (100%)" in first
    path.write_text(first + "The reading: protection held everywhere on this toy store.\n")
    run_report(store["uri"], EXPERIMENT, tmp_path / "r2", log_to_parent=False, results=path, command="sophon-ray y")
    second = path.read_text()
    assert "Written by `sophon-ray y`" in second and "The reading: protection held everywhere" in second
    assert second.count(HAND_WRITTEN) == 1 and "sophon-ray x" not in second


def test_one_results_file_holds_several_sweeps_each_replaced_in_place():
    one = merge_results("", "a", "A1")
    two = merge_results(one + "my reading\n", "b", "B1")
    three = merge_results(two, "a", "A2")
    assert three.index("A2") < three.index("B1") < three.index(HAND_WRITTEN) < three.index("my reading")
    assert "A1" not in three and three.count("<!-- results:a -->") == 1 and three.count(HAND_WRITTEN) == 1
    legacy = merge_results("# old generated text\n\n" + HAND_WRITTEN + "\nkept\n", "a", "A")
    assert "old generated" not in legacy and legacy.endswith(HAND_WRITTEN + "\nkept\n")


def _runs_frame(rows):
    base = {"subject": "normal", "variant": "-", "protect_seed": -1, "grid": "evaluation", "domain": "a",
            "data_pool": "disjoint", "strategy": "direct-all", "optimizer": "sgd", "lr": 0.01, "batch_size": 32,
            "data_fraction": 0.1, "schedule": "constant", "epochs": 10, "weight_decay": 0.0, "seed": 0,
            **RECIPE_DEFAULTS}
    frame = pd.DataFrame([{**base, **row} for row in rows])
    frame["run_id"] = [f"r{i}" for i in range(len(frame))]
    frame["best"], frame["original"] = frame["final"], 90.0
    return frame[["run_id", *ATTACK_PARAMS, "final", "best", "original"]]


def test_cells_never_average_across_restricted_domains_or_grids():
    rows = []
    for domain, grid, offset in (("a", "evaluation", 0), ("b", "evaluation", 40), ("a", "development", 20)):
        rows += [{"domain": domain, "grid": grid, "subject": "protected", "variant": "v", "protect_seed": 0,
                  "final": 10 + offset},
                 {"domain": domain, "grid": grid, "subject": "normal", "final": 50 + offset},
                 {"domain": domain, "grid": grid, "subject": "scratch", "final": 30 + offset}]
    table = cells(_runs_frame(rows)).set_index(["grid", "domain"])
    assert len(table) == 3
    assert table.loc[("evaluation", "a"), ["protected", "normal", "scratch"]].tolist() == [10, 50, 30]
    assert table.loc[("evaluation", "b"), ["protected", "normal", "scratch"]].tolist() == [50, 90, 70]
    assert table.loc[("development", "a"), ["protected", "normal", "scratch"]].tolist() == [30, 70, 50]


def test_sophon_ray_report_on_a_missing_experiment_exits_2_without_a_traceback(tmp_path, capsys):
    from sophon_ray.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: never-ran\n")
    assert main(["report", str(spec), "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert "error: no MLflow experiment named 'never-ran'" in err and "Traceback" not in err


def test_report_returns_the_short_console_table(report):
    lines = report.overview.splitlines()
    assert lines[0].split()[:4] == ["variant", "grid/domain", "drop", "held"]
    row = next(line for line in lines if line.startswith(VARIANT))
    assert "evaluation/" in row and "8/8 (100%)" in row


def test_overview_is_one_plain_row_per_variant_and_section():
    rows = []
    for strategy, protected, normal, scratch in [("direct-all", 12.0, 80.0, 30.0), ("initfc-all", 35.0, 70.0, 30.0),
                                                 ("direct-fc", 10.0, 31.0, 30.0)]:
        rows.append({"grid": "evaluation", "domain": "shapes_m", "variant": "ice", "strategy": strategy,
                     "protected": protected, "normal": normal, "scratch": scratch})
    table = pd.DataFrame(rows)
    protect = pd.DataFrame([{"variant": "ice", "original_test": 90.0}, {"variant": "ice", "original_test": 92.0}])
    text = summary.overview(table, protect, PretrainRun("r", 95.0, 94.0), num_classes=10)
    header, rule, row, *legend = text.splitlines()
    legend = " ".join(legend)
    assert header.split("  ")[0] == "variant" and all(name in header for name in summary.OVERVIEW_HEADER)
    assert set(rule) <= {"-", " "}
    assert row.split()[:3] == ["ice", "evaluation/shapes_m", "+3.0"]
    assert "2/3 (67%)" in row and "1/3 (33%)" in row and "35.0 vs 30.0 (+5.0)" in row
    assert "protected <= scratch + 1" in legend and "|" not in text and all(ord(c) < 128 for c in text)
    assert max(len(line) for line in text.splitlines()) <= 120


def test_text_table_aligns_text_left_and_numbers_right():
    assert summary.text_table(["name", "n"], [["a", "1"], ["bbb", "22"]]) == "name   n\n----  --\na      1\nbbb   22"


def test_report_tables_are_csv_beside_the_summary_with_its_numbers(report):
    text = report.summary.read_text()
    folder = report.summary.parent / "tables"
    assert set(report.tables) == {"intactness", "protect", "robustness", "cells"}  # no search, budget or benign
    assert all(path.parent == folder and path.is_file() for path in report.tables.values())
    intact = pd.read_csv(report.tables["intactness"])
    assert list(intact.columns) == summary.INTACTNESS_COLUMNS and len(intact) == 1
    r = intact.iloc[0]
    assert (f"| {r.variant} | {r.loss} | {r.seeds} | {r.normal_test:.1f} | {r.protected_test_mean:.1f} "
            f"({r.protected_test_min:.1f}-{r.protected_test_max:.1f}) | {r.drop_mean:+.1f} | {r.drop_worst_seed:+.1f} |"
            in text)
    protect = pd.read_csv(report.tables["protect"])
    assert {"variant", "protect_seed", "original_val", "original_test"} <= set(protect.columns)
    assert protect["original_test"].mean() == r.protected_test_mean
    robustness = pd.read_csv(report.tables["robustness"])
    assert list(robustness[["grid", "domain", "variant"]].itertuples(index=False, name=None)) == [
        ("evaluation", "shapes_m", VARIANT)]
    s = robustness.iloc[0]
    assert (f"| {VARIANT} | {s.cells} | {s.share_held * s.cells:.0f}/{s.cells} ({s.share_held:.0%}) | "
            f"{s.normal_share_held * s.cells:.0f}/{s.cells} ({s.normal_share_held:.0%}) | {s.meaningful} |") in text
    assert f"| {s.worst_case:.1f} | {s.best_scratch:.1f} | {s.best_vs_scratch:+.1f} | {s.leaks} |" in text
    table = pd.read_csv(report.tables["cells"])
    cell_rows = text.split("### Cells")[1].split("Overhead =")[0].count("\n|") - 2  # minus header and alignment
    assert len(table) == cell_rows == 8
    for c in table.itertuples():
        assert (f"| {c.protected:.1f} | {c.normal:.1f} | {c.scratch:.1f} | {c.protected_minus_scratch:+.1f} |"
                in text)
        assert len(c.protected_runs.split(";")) == c.protected_seeds  # run ids, ';'-joined


def test_report_result_is_a_frozen_dataclass(report):
    import dataclasses

    from analysis.report import ReportResult

    assert isinstance(report, ReportResult) and dataclasses.is_dataclass(report)
    assert {"sweep_id", "parent_run_id", "heatmaps", "curves", "search", "budget", "summary", "html", "results",
            "artifacts", "overview", "tables"} <= {f.name for f in dataclasses.fields(report)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.html = None
    assert report.sweep_id == SWEEP_ID and report.results is None and report.search == report.budget == []
    assert report.paths[:len(report.heatmaps)] == report.heatmaps and report.paths[-len(report.tables):] == list(
        report.tables.values())


def test_a_new_report_figure_is_one_entry_in_figures(store, report, tmp_path, monkeypatch):
    from analysis import contents
    from analysis.html import html_from_folder

    # the page made from the folder (FIGURES' file patterns) is the page run_report wrote (what FIGURES made)
    for figure in contents.FIGURES:
        assert set(figure.find(report.summary.parent)) == set(report.figures[figure.name]), figure.name
    written = report.html.read_text()
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in [report.summary, *report.heatmaps, *report.curves]:
        (copy / path.name).write_bytes(path.read_bytes())
    assert html_from_folder(copy).read_text() == written

    def draw(data, out):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot(range(len(data.cells)), data.cells["protected"])
        path = out / "extra-protected.png"
        fig.savefig(path)
        plt.close(fig)
        return [path]

    extra = contents.Figure("extra", "Extra: protected per cell", ("extra-*.png",), draw)
    monkeypatch.setattr(contents, "FIGURES", (*contents.FIGURES, extra))
    result = run_report(store["uri"], EXPERIMENT, tmp_path / "r", log_to_parent=False)
    assert result.figures["extra"] == [tmp_path / "r" / "extra-protected.png"]
    assert result.paths.index(tmp_path / "r" / "extra-protected.png") == len(result.heatmaps + result.curves)
    page = result.html.read_text()
    assert '<h2 id="extra-protected-per-cell">Extra: protected per cell</h2>' in page
    assert page.index("Fine-tuning curves</h2>") < page.index("Extra: protected per cell</h2>")
    assert html_from_folder(tmp_path / "r").read_text() == page


def test_analysis_has_no_mode_branch_and_no_accuracy_names_for_both_scores(runs):
    import re
    from pathlib import Path

    import analysis
    from analysis.runs import PROTECT_COLUMNS, attack_metrics
    from sophon_ray import names

    for path in Path(analysis.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert not re.search(r"""[!=]=\s*["'](generation|classification)["']""", source), path
        assert not re.search(r"""["'](generation|classification)["']\s*[!=]=""", source), path
        assert not re.search(r"""\bin\s*\(\s*["'](generation|classification)["']""", source), path
        assert not re.search(r"[!=]= *names\.(SKILL|ACCURACY)\b", source), path  # ask the mode table (has_classes)
    assert "original" in runs.columns and not any(c.endswith("_acc") for c in runs.columns)
    assert set(attack_metrics(names.SKILL)) == set(attack_metrics(names.ACCURACY)) == {"final", "best", "original"}
    assert not any(c.endswith("_acc") for c in PROTECT_COLUMNS)
