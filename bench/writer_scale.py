"""MLflow writer rate against the sweep's size: today's default writer (``bench/writer.py``'s synthetic finished
attack trials, enqueued at once, timed until drained) delivering 1,000 / 5,000 / 20,000 trials into one fresh SQLite
store and into a fresh experiment of an ``mlflow server`` under gunicorn (how cluster.yaml starts it), each size once,
smallest first; every run checked (one FINISHED run per key, its params, its last epoch) and the one bulk lookup of
the sweep's runs timed. What grows with the size is the store: its tables, its indexes, the lookup.

Usage: ``nice -n 5 .venv/bin/python bench/writer_scale.py`` (about 15 minutes on 2 cores); ``--sizes 50 100``
for a quick look; ``--smoke``: 20 and 40 trials.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import harness
import writer

NAME = "writer_scale"


def parse_args() -> Any:
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="trial counts")
    args = parser.parse_args()
    if args.smoke:
        args.sizes = [20, 40]
    return args


def section(args: Any, runs: dict[tuple[str, int], dict[str, Any]]) -> harness.Section:
    smoke = "SMOKE (numbers mean nothing): " if args.smoke else ""
    sec = harness.Section(NAME, "MLflow writer: trials/s against the sweep's size", (
        f"{smoke}today's default writer (`bench/writer.py`'s synthetic finished trials: an open with "
        f"{writer.PARAMS} params, {writer.EPOCHS} epochs x 3 metrics, a summary row, a tag, the finish), all "
        "enqueued at once and timed until drained, into one fresh SQLite store per size and into a fresh "
        f"experiment of one `mlflow server` under gunicorn (`--workers {writer.SERVER_WORKERS}`, SQLite backend in "
        "WAL mode) on the same 2 cores; each size once, smallest first."))
    smallest = min(args.sizes)
    table = harness.Table("per store and size", ["store", "trials", "trials/s", "wall s", "CPU ms/trial: writer / "
                                                 "server", "failed writes", "bulk lookup of the sweep's runs (s)",
                                                 "every trial once"])
    for (store, size), r in sorted(runs.items()):
        table.rows.append([store, f"{size:,}", f"{r['trials_s']:.1f}", f"{r['wall_s']:.1f}",
                           f"{r['cpu_ms']:.1f}" + (f" / {r['server_cpu_ms']:.1f}" if r["server_cpu_ms"] else ""),
                           str(r["failures"]), f"{r.get('lookup_s', 0.0):.2f}",
                           "yes" if not r["check"] else f"**no**: {r['check']}"])
    sec.tables.append(table)
    for store in sorted({s for s, _ in runs}):
        base, top = runs.get((store, smallest)), runs.get((store, max(args.sizes)))
        if base and top and top is not base:
            ratio = top["trials_s"] / base["trials_s"]
            sec.goal(f"{store}: trials/s at {max(args.sizes):,} / at {smallest:,}", "context", f"{ratio:.2f}",
                     None, "the store's size (its tables and indexes grow; the writer keeps nothing per finished "
                     "trial)")
    return sec


def main() -> None:
    harness.quiet_environment()
    args = parse_args()
    from sophon_ray.run.delivery import DEFAULT_FSYNC_S, SERVER_WRITERS, SQLITE_WRITERS, http_env  # noqa: PLC0415

    os.environ.update(http_env())
    tmp = Path(tempfile.mkdtemp(prefix="bench-writer-scale-", dir="/tmp"))
    server = None
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        server, uri = writer.start_server(tmp / "gunicorn", "gunicorn")
        for size in sorted(args.sizes):
            for store, c in (("sqlite", writer.Contender("sqlite", "now", SQLITE_WRITERS, DEFAULT_FSYNC_S)),
                             ("gunicorn", writer.Contender("gunicorn", "now", SERVER_WRITERS, DEFAULT_FSYNC_S))):
                target = (uri, server.pid) if c.server else None
                runs[store, size] = writer.one_run(c, size, tmp / f"{store}-{size}" / "run", target, None)
                harness.say(f"{store} {size}: {runs[store, size]['trials_s']:.1f} trials/s {runs[store, size]['check']}")
                shutil.rmtree(tmp / f"{store}-{size}", ignore_errors=True)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    md, _ = section(args, runs).write(args.out)
    harness.say(f"wrote {md}")
    print(md.read_text())


if __name__ == "__main__":
    main()
