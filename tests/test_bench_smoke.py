"""The benchmark scripts in bench/ run end to end in their --smoke mode and write their results section.

Each smoke run is a subprocess with real Ray / MLflow where the benchmark uses them. A smoke run measured under a
minute on this project's 2-core machine runs in the default suite (and in CI, ``-m "not slow"``); one that starts
Ray is marked ``integration`` (CI runs it; plain ``pytest`` leaves it out, as every Ray test). A smoke run measured
over a minute stays ``slow``, its measured time beside it (times: wall on 2 cores shared with other work, load
average in brackets; bench/README.md has the table). Fast default-suite guards keep the slow ones from breaking
unnoticed: every script imports, and the specs they build validate. The collect test fabricates its sections.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procenv import process_env

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
HEADLINE = ["figure", "goal", "measured: median [min-max]", "met", "limited by"]
TIMEOUT_S = 300  # smoke modes take 3-190 s here (2 shared cores); headroom for a busy machine


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp, env=process_env(PYTHON=sys.executable), text=True, capture_output=True,
                          timeout=TIMEOUT_S)


def check_section(out: Path, name: str, columns: list[str]) -> dict:
    assert out.is_file(), f"{out} not written"
    text = out.read_text()
    for column in HEADLINE + columns:
        assert column in text, f"column {column!r} missing from {out.name}:\n{text[:2000]}"
    assert "SMOKE" in text
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["name"] == name and payload["machine"]["nproc"] >= 1
    return payload


def test_fts_step_smoke(tmp_path):
    """No Ray; 30 s measured (load 1.9)."""
    out = tmp_path / "fts_step.md"
    proc = run([sys.executable, str(BENCH / "fts_step.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "fts_step", ["ms/plain step", "ms/inner step", "inner/plain", "ms/outer iteration",
                                              "outer/(K+ntr) plain"])
    for label in ("convnet fp32 channels_last", "resnet18 fp32 channels_last"):
        row = payload["data"][label]
        assert row["plain_s"] and row["inner_s"] and row["outer_s"]
        assert all(s > 0 for s in row["plain_s"] + row["inner_s"] + row["outer_s"])


@pytest.mark.slow
def test_tune_throughput_smoke(tmp_path):
    """Slow: 72 s measured (load 3.2), 188 s (load 6.1): Ray, a spawned process pool, two Tune runs of 4 one-epoch
    trials each; fixed start-up costs, not the smoke size, make it."""
    out = tmp_path / "tune_throughput.md"
    proc = run([sys.executable, str(BENCH / "tune_throughput.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "tune_throughput", ["wall / sequential", "per-trial overhead s (median / p90)",
                                                     "driver peak RSS MiB", "trial process peak RSS MiB"])
    trials = payload["data"]["trials"]
    runs = payload["data"]["runs"]
    packed = {"packed loop", "tune packed", "tune+mlflow packed"}
    assert set(runs) == {"sequential", "process pool", "tune", "tune+mlflow", *packed}
    assert all(len(r["compute"]) == trials for name, rs in runs.items() if name not in packed for r in rs)
    assert all(len(r["compute"]) == 1 for name in packed for r in runs[name]), "the smoke grid is one pack of 4"
    assert all(r["memory"]["worker_rss_mib"] for r in runs["tune"]), "no trial process was sampled"


@pytest.mark.slow
def test_train_scaling_smoke(tmp_path):
    """Slow: 84 s measured (load 2.8), 271 s (load 16.7): two Ray Train protect jobs of 2 iterations, each mostly the
    TorchTrainer's fixed start-up cost (~30 s), plus the driver's pretraining."""
    out = tmp_path / "train_scaling.md"
    proc = run([sys.executable, str(BENCH / "train_scaling.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "train_scaling", ["iterations/s", "environments/s (x workers)",
                                                   "TorchTrainer fixed cost s", "ranks identical"])
    runs = payload["data"]["runs"]
    assert set(runs) == {"1 worker x 1 thread", "2 workers x 1 thread"}
    assert all(r["ranks_identical"] and r["iterations"] == 2 for rs in runs.values() for r in rs)


@pytest.mark.slow
def test_soak_smoke_kills_only_its_own_trials_and_finds_every_trial_once(tmp_path):
    """The chaos soak at smoke size (12 trials, a SIGKILL every 5 s): the sweep still ends with every trial
    exactly once in MLflow."""
    out = tmp_path / "soak.md"
    proc = run([sys.executable, str(BENCH / "soak.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "soak", ["SIGKILLs sent to trial processes", "Tune retries"])
    ledger = payload["data"]["ledger"]
    assert payload["data"]["rc"] == 0 and ledger["runs"] == ledger["keys"] == 12, ledger
    assert ledger["status"] == {"FINISHED": 12} and not ledger["bad_histories"] and not ledger["duplicate_keys"]


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    out = tmp_path / "scale.md"
    proc = run([sys.executable, str(BENCH / "scale.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "scale", ["driver peak RSS", "MLflow write capacity", "sophon-ray report SPEC"])
    assert payload["data"]["rc"] == 0 and payload["data"]["report_rc"] == 0
    assert payload["data"]["ledger"]["runs"] == payload["data"]["ledger"]["keys"] == 20


@pytest.mark.slow
def test_recovery_smoke_every_case_ends_with_every_trial_once(tmp_path):
    """Slow: 177 s measured (load 1.2): cases 1 (SQLite and `mlflow server`), 2 (a 3 s server outage) and 4 (the
    driver's session SIGKILLed, then --resume) of 6 trials, the normal model pretrained once in the bench process (no
    Ray Train); each of the five commands pays Ray's start."""
    out = tmp_path / "recovery.md"
    proc = subprocess.run([sys.executable, str(BENCH / "recovery.py"), "--smoke", "--out", str(out)], cwd=tmp_path,
                          env=process_env(PYTHON=sys.executable), text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "recovery", ["wall s (total)", "/ uninterrupted", "exit statuses", "on --resume",
                                              "outbox failed writes", "ledger"])
    cases = payload["data"]["cases"]
    assert list(cases) == ["uninterrupted-sqlite", "uninterrupted-server", "server-restarted", "driver-kill-grid"]
    for name, case in cases.items():
        assert not case["problems"], (name, case["problems"])
        assert case["ledger"]["runs"] == case["ledger"]["keys"] == 6 and case["runs"]["sweep"] == {"FINISHED": 1}
    killed = cases["driver-kill-grid"]
    assert [s["rc"] for s in killed["steps"]] == [-9, 0] and killed["events"]["driver session SIGKILL"]["seen"] >= 2
    resumed = killed["steps"][1]["plan"]
    assert resumed["trials"] == 6 and resumed["earlier"] >= 2 and resumed["earlier"] + resumed["todo"] == 6, resumed
    assert cases["server-restarted"]["events"]["server restart"]["start_s"] > 0


@pytest.mark.slow
def test_quickstart_smoke(tmp_path):
    out = tmp_path / "quickstart.md"
    proc = run(["bash", str(BENCH / "quickstart.sh"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "quickstart", ["stage: pretrain+protect", "stage: attack", "stage: report",
                                                "peak RSS"])
    assert payload["data"]["pipeline"]["trials"] == 3 and payload["data"]["timing"]["peak_rss_mib"] > 0


def test_gpu_script_refuses_clearly_without_a_gpu(tmp_path):
    """3 s measured: only --check."""
    import torch

    proc = run(["bash", str(BENCH / "gpu.sh"), "--check"], tmp_path)
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_checkpoint_overhead_smoke(tmp_path):
    """No Ray; 9 s measured (load 2.1). Prints its table (no results section)."""
    proc = run([sys.executable, str(BENCH / "checkpoint_overhead.py"), "--smoke"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 iterations, a state checkpoint every 2" in proc.stdout
    assert "| 2 | " in proc.stdout, proc.stdout


def test_packed_smoke(tmp_path):
    """No Ray; 6 s measured (load 3.0). One JSON line: seconds per member and speed-ups per pack size."""
    proc = run([sys.executable, str(BENCH / "packed.py"), "--smoke"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["members"] for r in payload["results"]] == [1, 4]
    assert all(set(r["speedup_vs_sequential"]) == {"grouped", "vmap"} for r in payload["results"])


def test_pack_size_smoke(tmp_path):
    """No Ray; ~15 s. The section: per shape auto's N (the cache rule) and the speed-up of every N measured."""
    out = tmp_path / "pack_size.md"
    proc = run([sys.executable, str(BENCH / "pack_size.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["data"]["rows"]
    assert [(r["image_size"], r["batch_size"], r["widest"], r["auto"]) for r in rows] == [(8, 16, 1024, 32),
                                                                                         (16, 64, 4096, 4)]
    assert [set(r["speedups"]) for r in rows] == [{"2", "4", "32"}, {"2", "4"}]    # JSON keys; auto's N measured
    assert "| 16 | 64 | 4096 |" in out.read_text() and "SMOKE" in out.read_text()
    again = tmp_path / "again.md"       # --rows: the recorded speed-ups, auto's N from the current rule
    proc = run([sys.executable, str(BENCH / "pack_size.py"), "--rows", str(out.with_suffix(".json")), "--out",
                str(again)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(again.with_suffix(".json").read_text())["data"]["rows"] == json.loads(
        out.with_suffix(".json").read_text())["data"]["rows"]
    assert f"Re-read from `{out.with_suffix('.json')}`" in again.read_text()


def test_pack_memory_smoke(tmp_path):
    """No Ray; ~15 s (three processes). One case: the estimate and the measured cost of one more member."""
    proc = run([sys.executable, str(BENCH / "pack_memory.py"), "--smoke"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = payload["rows"]
    assert row["case"] == "convnet:8:16" and row["footprint"]["widest"] == 8 * 8 * 16
    assert row["estimate"] > 0 and set(row["peaks"]) == {"1", "2"} and all(p > 0 for p in row["peaks"].values())
    assert "| convnet:8:16 |" in proc.stdout


def test_float_paths_smoke(tmp_path):
    """No Ray. One JSON line: per recipe, each float path's departure from the reference trial."""
    proc = run([sys.executable, str(BENCH / "float_paths.py"), "--smoke"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(payload["recipes"]) == {"sgd 0.001", "momentum 0.01", "adam 0.001", "adam 0.01"}
    for paths in payload["recipes"].values():
        assert set(paths) == {"2 threads", "contiguous weights", "packed (member 0 of 4)"}
        assert all(p["max_abs"] >= 0 for p in paths.values())
    assert payload["recipes"]["sgd 0.001"]["packed (member 0 of 4)"]["first_epoch_over"] is None


def test_pack_agreement_reads_two_real_mlflow_stores(tmp_path):
    """Two SQLite MLflow stores with the same trial names: one curve leaves the tolerance at epoch 2 (its final
    score 3 points apart), one stays inside it, one lone trial matches exactly."""
    code = """
import sys, mlflow
curves = {"eva/x/normal/direct-all/adam/lr0.01/bs32/s0": [1.0, 0.8, 0.6 + float(sys.argv[2])],
          "eva/x/normal/direct-all/sgd/lr0.001/bs32/s0": [1.0, 0.9, 0.8 + float(sys.argv[2]) / 1e4],
          "eva/x/normal/direct-all/sgd/lr0.001/bs32/warm_start=original/s0": [1.0, 0.9, 0.8]}
mlflow.set_tracking_uri(sys.argv[1])
for name, losses in curves.items():
    with mlflow.start_run(run_name=name):
        for step, loss in enumerate(losses):
            mlflow.log_metric("restricted_loss", loss, step=step)
            mlflow.log_metric("restricted_acc", 50.0 + (3.0 if "adam" in name and float(sys.argv[2]) else 0), step=step)
"""
    for name, shift in (("a", "0"), ("b", "0.5")):
        proc = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / name}.db", shift], cwd=tmp_path,
                              env=process_env(MLFLOW_DISABLE_TELEMETRY="true"), text=True, capture_output=True,
                              timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([sys.executable, str(BENCH / "pack_agreement.py"), str(tmp_path / "a.db"), str(tmp_path / "b.db")],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["trials"] == 3 and payload["curve_leaves_tolerance"] == 1
    assert payload["first_departure_epochs"] == {"2": 1}
    assert payload["final_acc_abs_diff"]["max"] == 3.0 and payload["final_acc_abs_diff"]["over_1_point"] == 1
    assert payload["alone_in_both"] == 1 and payload["alone_leaving_tolerance"] == 0
    assert payload["leaving_by_optimizer_lr"] == {"adam 0.01": "1/1", "sgd 0.001": "0/2"}


@pytest.mark.slow
def test_packed_stage_smoke(tmp_path):
    """Slow: 130 s measured (load 0.5): two `sophon-ray run`s of a tiny quickstart (the first trains the models and,
    with --time-first, is attack.pack 1's round; attack.pack auto reuses them); each pays Ray's start."""
    out = tmp_path / "packed_stage.md"
    proc = run([sys.executable, str(BENCH / "packed_stage.py"), "--smoke", "--time-first", "--out", str(out)],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "packed_stage", ["attack stage s", "Tune trials", "trial process peak RSS MiB"])
    runs = payload["data"]["runs"]
    assert set(runs) == {"1", "auto"}
    assert runs["1"][0]["trials_run"] == runs["auto"][0]["trials_run"] == 12   # 4 recipes x 3 subjects
    assert runs["1"][0]["tune_trials"] == 12 and runs["auto"][0]["tune_trials"] == 4   # scratch: a pack per seed
    assert all(r["stages"]["attack"] > 0 for rs in runs.values() for r in rs)
    assert runs["1"] == [payload["data"]["first"]]   # the first run, which trained the models, is pack 1's round
    assert runs["1"][0]["stages"]["pretrain+protect"] > runs["auto"][0]["stages"]["pretrain+protect"]


def test_collect_orders_sections_under_a_machine_header(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name in ("zeta_extra", "tune_throughput", "fts_step"):
        (results / f"{name}.md").write_text(f"## {name} section\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
        (results / f"{name}.json").write_text(json.dumps({"name": name, "machine": {"nproc": 64, "cpu": "elsewhere",
                                                                                    "host": "other"}}))
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(BENCH / "collect.py"), "--results", str(results), "--out", str(out)],
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# sophon-ray benchmarks")
    for item in ("cores (nproc)", "| CPU |", "| RAM |", "| torch |", "| ray |", "collected"):
        assert item in text
    positions = [text.index(f"## {n} section") for n in ("fts_step", "tune_throughput", "zeta_extra")]
    assert positions == sorted(positions)
    assert "ran on another machine: 64 cores, elsewhere" in text


def test_the_benchmarks_specs_validate_against_the_current_spec_schema():
    """Fast guard (default suite) for the slow smoke runs above: the specs the benchmarks build or override still
    validate, so a renamed spec field breaks CI, not the next benchmark run (an `attack.grid` left in two benchmarks
    after the evaluation issue renamed it went unnoticed for a wave)."""
    import re
    import shlex

    from sophon_ray.run.validate import load_spec

    sys.path.insert(0, str(BENCH))
    try:
        import tune_throughput
    finally:
        sys.path.remove(str(BENCH))
    for argv in ([], ["--smoke"]):
        tune_throughput.sweep_spec(tune_throughput.parse_args(argv))  # raises SpecError when invalid
    script = (BENCH / "quickstart.sh").read_text()
    block = script[script.index("SETS=(--set"):script.index(")\nfi")]
    tokens = shlex.split(re.sub(r"^SETS=\(", "", block).replace("\n", " "))
    overrides = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]
    assert len(overrides) >= 10, overrides
    spec = load_spec(REPO / "sweeps" / "quickstart.yaml", overrides)
    assert spec.protect[0].iterations == 4 and spec.attack.evaluation[0].strategy == ("direct-all",)
    sys.path.insert(0, str(BENCH))
    try:
        import packed_stage
    finally:
        sys.path.remove(str(BENCH))
    args = packed_stage.parse_args(["--smoke"])
    for pack in args.packs:
        load_spec(Path(args.spec), [*args.sets, f"attack.pack={pack}", "output_dir=/tmp/x", "tracking.uri=sqlite:///x"])


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_benchmark_script_imports(script):
    """Fast guard (default suite) for the slow smoke runs: every bench/ script still imports (a moved or renamed
    sophon_ray module breaks CI, not the next benchmark run)."""
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(BENCH))
    assert module.__doc__, f"bench/{script}.py has no docstring"


def test_the_ray_benchmarks_tiny_specs_validate():
    """Fast guard for the slow smoke runs of train_scaling, soak and scale: the specs they build still parse."""
    from types import SimpleNamespace

    from sophon_ray.run.validate import parse_spec

    sys.path.insert(0, str(BENCH))
    try:
        import sweep_run
        import train_scaling
    finally:
        sys.path.remove(str(BENCH))
    for smoke in (True, False):
        spec = train_scaling.sweep_spec(SimpleNamespace(smoke=smoke, iterations=None, device="cpu"))
        assert spec.protect[0].iterations == (2 if smoke else 40)
    for subjects, protect in ((["normal", "scratch"], False), (["protected", "normal"], True)):  # soak, scale
        raw = sweep_run.tiny_spec("bench", Path("/tmp/out"), "sqlite:////tmp/x.db", 2, subjects, protect=protect)
        spec = parse_spec(raw, "bench")
        assert spec.attack.subjects == tuple(subjects) and len(spec.protect) == (1 if protect else 0)
