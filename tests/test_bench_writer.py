"""``bench/writer.py --smoke``: the MLflow writer benchmark end to end (a real SQLite store, a real ``mlflow server``
on 127.0.0.1, the old writer loaded from git), its section written and every trial found once in each store.
No Ray, but slow: 123 s measured (load 11), 147 s under pytest (load 15): an ``mlflow server`` start and
a fresh SQLite store (MLflow's table migrations) per contender are fixed costs, not the smoke size."""

import sys

import pytest

from tests.test_bench_smoke import BENCH, check_section, run


@pytest.mark.slow
def test_writer_smoke(tmp_path):
    out = tmp_path / "writer.md"
    proc = run([sys.executable, str(BENCH / "writer.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "writer", ["trials/s", "enqueue ms/trial (caller)", "fsyncs/trial",
                                            "every trial once"])
    runs = payload["data"]["runs"]
    assert any(label.startswith("sqlite now") for label in runs)
    assert any(label.startswith("server (uvicorn) now") for label in runs)
    assert any(label.startswith("server (gunicorn) now") for label in runs)
    for label, records in runs.items():
        assert records and all(r["trials_s"] > 0 and r["check"] == "" for r in records), (label, records)


def test_the_writer_section_reads_its_headline_from_todays_defaults_and_pairs_rounds():
    """Fast guard (default suite) for the slow smoke run: the section's headline is today's default writer per store
    against the goals, ratios are paired per round, and a writer that lost a trial is reported."""
    from types import SimpleNamespace

    sys.path.insert(0, str(BENCH))
    try:
        import writer
    finally:
        sys.path.remove(str(BENCH))
    args = SimpleNamespace(smoke=False, trials=300, server_trials=100, rounds=2, before=writer.BEFORE_REV)
    record = {"enqueue_ms": 0.1, "busy_ms": 30.0, "cpu_ms": 20.0, "server_cpu_ms": 0.0, "fsyncs": 0.2,
              "failures": 0, "check": "", "lookup_s": 0.01}
    runs = {c: [{**record, "trials_s": (40.0 if c.code == "now" else 10.0) * (r + 1)} for r in range(2)]
            for c in writer.contenders(False)}
    lost = next(c for c in runs if c.store == "gunicorn" and c.code == "now" and c.writers == 1)
    runs[lost][1]["check"] = "99 runs, 99 keys, 0 incomplete (expected 100)"
    text = writer.section(args, runs, before_ok=True).markdown()
    assert "| trials/s into SQLite (sqlite now, 1 writer(s), fsync 0.2 s) | >= 30 | 60.0 [40.0-80.0] | yes |" in text
    for kind in ("uvicorn", "gunicorn"):
        assert (f"| trials/s into mlflow server ({kind}) (server ({kind}) now, 8 writer(s), fsync 0.2 s) | >= 50 | "
                "60.0 [40.0-80.0] | yes |") in text
    assert "mlflow server (uvicorn): now / before (paired per round) | > 1 | 4.00" in text
    assert "| SQLite: now / before (paired per round) | > 1 | 4.00 [4.00-4.00] | yes | - |" in text
    assert "**no**: 99 runs, 99 keys" in text


@pytest.mark.slow
def test_writer_scale_smoke(tmp_path):
    """``bench/writer_scale.py --smoke``: two sizes into SQLite and a gunicorn server, every trial once."""
    out = tmp_path / "writer_scale.md"
    proc = run([sys.executable, str(BENCH / "writer_scale.py"), "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_section(out, "writer_scale", ["store", "trials", "trials/s", "every trial once"])
    rows = payload["tables"][0]["rows"]
    assert {(r[0], r[1]) for r in rows} == {(s, n) for s in ("sqlite", "gunicorn") for n in ("20", "40")}
    assert all(r[-1] == "yes" for r in rows), rows
