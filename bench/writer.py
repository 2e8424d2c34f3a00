"""MLflow writer: ``--trials`` synthetic finished attack trials (open, 10 epochs of rows, the summary row, a tag,
the finish: what the Tune callback enqueues for one trial) through the outbox into (a) a fresh SQLite store and
(b) ``mlflow server`` on 127.0.0.1 started here twice, as MLflow serves it by default (uvicorn) and under gunicorn
(``--gunicorn-opts``, how ``cluster.yaml`` starts it), each with its backend a SQLite file in WAL mode,
``--workers 4`` and MLflow's job execution off; the writer of commit ``--before`` (the old code, loaded from git)
against today's, and today's with the journal's fsync off, per append (``every``) and grouped (``0.2`` s, the
default).

Measured per contender and round: trials/s from the first enqueue until the queue is drained (every trial
delivered), the caller's enqueue cost per trial, the delivery threads' busy thread-seconds per trial, journal
fsyncs per trial, the CPU seconds of the writer's own process and of the server's process tree; then every run is checked (one FINISHED run per key, its params, its last epoch) and, for
today's writer, the time of the one bulk lookup of the sweep's runs (``Tracker.keyed_runs``). Contenders run
interleaved in rotating order, each round into a new store (SQLite) or a new experiment (server).

Usage: ``nice -n 5 .venv/bin/python bench/writer.py`` (about 15 minutes on 2 cores); ``--smoke``: 5 trials,
one round, the old writer and today's default per store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness

NAME = "writer"
SQLITE_GOAL, SERVER_GOAL = 30.0, 50.0
BEFORE_REV = "ce0407d"  # the last commit with the one-thread writer (search + create + batch + terminate per trial)
EPOCHS, PARAMS = 10, 10
SERVER_WORKERS = 4
SERVERS = {"uvicorn": [], "gunicorn": ["--gunicorn-opts", "--timeout 120"]}  # how each is started (extra arguments)


@dataclass(frozen=True)
class Contender:
    """One writer set-up: the store (``sqlite`` or a server: ``uvicorn`` or ``gunicorn``), the code (``now`` or
    ``before``), delivery threads, the journal's fsync."""

    store: str
    code: str
    writers: int
    fsync: float | None
    opens_first: bool = False   # every trial's open delivered before its results arrive (how Tune sends them)

    @property
    def server(self) -> bool:
        return self.store in SERVERS

    @property
    def label(self) -> str:
        fsync = "off" if self.fsync is None else ("every" if self.fsync == 0 else f"{self.fsync:g} s")
        first = ", opens first" if self.opens_first else ""
        store = f"server ({self.store})" if self.server else self.store
        if self.code == "before":
            return f"{store} before ({BEFORE_REV}, 1 writer, no fsync){first}"
        return f"{store} now, {self.writers} writer(s), fsync {fsync}{first}"


def contenders(smoke: bool) -> list[Contender]:
    """SQLite: before, now with fsync off / every / 0.2 s, and 2 writers; each server: before (uvicorn only), now
    with 1 and SERVER_WRITERS writers at 0.2 s (and fsync off / every under gunicorn); SQLite before and now with
    every open delivered before the trials' results arrive. Smoke: the old writer and today's default, per store."""
    from sophon_ray.run.delivery import DEFAULT_FSYNC_S, SERVER_WRITERS  # noqa: PLC0415

    out = [Contender("sqlite", "before", 1, None)]
    out += [Contender("sqlite", "now", 1, f) for f in (None, 0.0, DEFAULT_FSYNC_S)]
    out += [Contender("sqlite", "now", 2, DEFAULT_FSYNC_S)]
    out += [Contender("uvicorn", "before", 1, None)]
    out += [Contender(server, "now", w, DEFAULT_FSYNC_S) for server in SERVERS for w in (1, SERVER_WRITERS)]
    out += [Contender("gunicorn", "now", SERVER_WRITERS, f) for f in (None, 0.0)]
    out += [Contender("sqlite", "before", 1, None, True), Contender("sqlite", "now", 1, DEFAULT_FSYNC_S, True)]
    return [c for c in out if (c.fsync == DEFAULT_FSYNC_S or c.code == "before") and not c.opens_first
            and c.writers in (1, SERVER_WRITERS if c.server else 1)] if smoke else out


def parse_args() -> Any:
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="trials per SQLite contender and round (default 300)")
    parser.add_argument("--server-trials", type=int, default=200,
                        help="trials per server contender and round (default 200; the old writer takes ~0.3 s each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--before", default=BEFORE_REV, help=f"git revision of the old writer (default {BEFORE_REV})")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.server_trials, args.rounds = 5, 5, 1
    return args


def load_before(rev: str) -> dict[str, types.ModuleType] | None:
    """``sophon_ray/run/tracking.py`` and ``outbox.py`` as they were at ``rev`` (modules named ``before_*``), or
    None when git or the revision is missing (a shallow checkout)."""
    modules = {}
    for name in ("tracking", "outbox"):
        shown = subprocess.run(["git", "show", f"{rev}:sophon_ray/run/{name}.py"], cwd=harness.REPO, text=True,
                               capture_output=True)
        if shown.returncode != 0:
            harness.say(f"the old writer ({rev}) is not in this checkout: {shown.stderr.strip()[:200]}")
            return None
        module = types.ModuleType(f"before_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(shown.stdout, f"{rev}:{name}.py", "exec"), module.__dict__)  # noqa: S102 - our own history
        modules[name] = module
    return modules


def start_server(folder: Path, kind: str) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` (``kind``: a key of ``SERVERS``) on a free 127.0.0.1 port over ``folder/server.db`` (put in
    WAL mode first, as a sophon-ray SQLite store is); returns the process and its URI once /health answers."""
    import socket  # noqa: PLC0415

    from sophon_ray.cli.ui import JOB_EXECUTION_OFF  # noqa: PLC0415
    from sophon_ray.run.tracking import use_wal  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    use_wal(folder / "server.db")
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination",
                               str(folder / "artifacts"), "--workers", str(SERVER_WORKERS), *SERVERS[kind]],
                              env={**os.environ, **JOB_EXECUTION_OFF}, stdout=open(folder / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    start = time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return server, uri
        except OSError:
            if server.poll() is not None or time.perf_counter() - start > 180:
                raise RuntimeError(f"mlflow server did not start; see {folder / 'server.log'}") from None
            time.sleep(0.3)


def enqueue(outbox: Any, parent: str, key: str, open_run: bool = True, results: bool = True) -> None:
    """One finished attack trial, as the Tune callback enqueues it: open (10 params), the 10 epochs' rows, the
    summary row, the node tag, the finish (``open_run`` / ``results``: that part only)."""
    if open_run:
        outbox.open(key, parent, "s1", f"trial {key}", {f"param_{i}": i / 7 for i in range(PARAMS)})
    if not results:
        return
    outbox.rows(key, [(e, {"restricted_acc": 10.0 + e, "restricted_loss": 2.0 - e / 10, "val_acc": 9.0 + e})
                      for e in range(EPOCHS)])
    outbox.rows(key, [(0, {"restricted_acc_final": 19.0, "restricted_acc_best": 19.0, "original_acc": 90.0,
                           "val_acc_best": 18.0, "restricted_acc_at_val_best": 18.5})])
    outbox.tag(key, "sophon.node", "node-a")
    outbox.finish(key, "FINISHED")


def check(tracker: Any, trials: int) -> str:
    """Every trial once: one FINISHED run per key, its 10 params and its last epoch; returns "" or what is wrong."""
    runs, token = [], None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id], "tags.`sophon.role` = 'attack'",
                                          max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    keys = [r.data.tags.get("sophon.key") for r in runs]
    bad = [r.info.run_id for r in runs if r.info.status != "FINISHED" or len(r.data.params) != PARAMS
           or r.data.metrics.get("val_acc") != 9.0 + EPOCHS - 1 or r.data.tags.get("sophon.node") != "node-a"]
    if len(runs) != trials or len(set(keys)) != trials or bad:
        return f"{len(runs)} runs, {len(set(keys))} keys, {len(bad)} incomplete (expected {trials})"
    return ""


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU seconds of process ``pid`` (all threads) and, with ``tree``, of its children now alive.
    The writer's own figure must not take the tree: the servers this script starts are its children."""
    import psutil  # noqa: PLC0415

    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *(process.children(recursive=True) if tree else [])]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def one_run(c: Contender, trials: int, folder: Path, server: tuple[str, int] | None,
            before: dict | None) -> dict[str, Any]:
    """Set up the store and the writer (untimed), enqueue ``trials`` trials, drain; then check the store.
    ``server``: the contender's server's URI and process id (its CPU time is counted), None for SQLite."""
    from sophon_ray.run import outbox as now_outbox  # noqa: PLC0415
    from sophon_ray.run import tracking as now_tracking  # noqa: PLC0415

    folder.mkdir(parents=True)
    tracking, outboxes = (before["tracking"], before["outbox"]) if c.code == "before" else (now_tracking, now_outbox)
    uri = server[0] if server else f"sqlite:///{folder}/mlflow.db"
    tracker = tracking.Tracker(uri, f"writer-{folder.parent.name}-{folder.name}")
    parent = tracker.sweep_run("s1", "sweep")
    journal_path = folder / now_outbox.JOURNAL
    if c.code == "before":
        outbox = outboxes.Outbox(tracker, journal_path)
    else:
        outbox = outboxes.Outbox(tracker, now_outbox.Journal(journal_path, c.fsync), writers=c.writers)
    outbox.start()
    cpu = [cpu_seconds(os.getpid(), tree=False), cpu_seconds(server[1]) if server else 0.0]
    start = harness.now()
    if c.opens_first:  # Tune opens a trial's run when it starts: the opens are delivered before any result
        for i in range(trials):
            enqueue(outbox, parent, f"t{i}", results=False)
        enqueued = harness.now() - start
        outbox.drain(120)
    else:
        enqueued = 0.0
    started = harness.now()
    for i in range(trials):
        enqueue(outbox, parent, f"t{i}", open_run=not c.opens_first)
    enqueued += harness.now() - started  # the caller's time in enqueue calls (its fsyncs with policy "every")
    delivered = outbox.drain(120)
    wall = harness.now() - start
    cpu = [cpu_seconds(os.getpid(), tree=False) - cpu[0], cpu_seconds(server[1]) - cpu[1] if server else 0.0]
    outbox.close()
    record = {"trials_s": trials / wall, "wall_s": wall, "enqueue_ms": enqueued / trials * 1e3,
              "busy_ms": outbox.stats.busy_s / trials * 1e3, "failures": outbox.stats.failures,
              "fsyncs": getattr(outbox.journal, "syncs", 0) / trials,
              "cpu_ms": cpu[0] / trials * 1e3, "server_cpu_ms": cpu[1] / trials * 1e3,
              "check": "" if delivered else "not drained in 120 s"}
    record["check"] = record["check"] or check(tracker, trials)
    if c.code == "now":
        t0 = harness.now()
        known = tracker.keyed_runs("s1", "attack")
        record["lookup_s"] = harness.now() - t0
        record["check"] = record["check"] or ("" if len(known) == trials else f"keyed_runs found {len(known)}")
    if c.store == "sqlite":
        shutil.rmtree(folder / "mlartifacts", ignore_errors=True)
    return record


def section(args: Any, runs: dict[Contender, list[dict[str, Any]]], before_ok: bool) -> harness.Section:
    from sophon_ray.run.delivery import DEFAULT_FSYNC_S, SERVER_WRITERS, SQLITE_WRITERS  # noqa: PLC0415

    def rate(c: Contender) -> list[float]:
        return [r["trials_s"] for r in runs.get(c, [])]

    def ratio(a: Contender, b: Contender) -> harness.Spread:
        return harness.spread(harness.paired_ratios(rate(a), rate(b)))

    sqlite_now = Contender("sqlite", "now", SQLITE_WRITERS, DEFAULT_FSYNC_S)
    servers_now = {kind: Contender(kind, "now", SERVER_WRITERS, DEFAULT_FSYNC_S) for kind in SERVERS}
    smoke = "SMOKE (numbers mean nothing): " if args.smoke else ""
    sec = harness.Section(NAME, "MLflow writer: trials/s into SQLite and into mlflow server", (
        f"{smoke}{args.trials} (SQLite) or {args.server_trials} (server) synthetic finished attack trials per contender "
        f"and round (open with {PARAMS} params, "
        f"{EPOCHS} epochs x 3 metrics, a 5-metric summary row, a tag, the finish) enqueued at once into the "
        "outbox, timed until drained; a fresh SQLite store per run, and two `mlflow server`s on 127.0.0.1, "
        "MLflow's default (uvicorn) and `--gunicorn-opts` (how cluster.yaml starts it), each "
        f"`--workers {SERVER_WORKERS}`, job execution off, its SQLite backend in WAL mode, with a new experiment "
        f"per run, on the same cores as the writer; {args.rounds} interleaved rounds, rotating order. `before` is the "
        f"writer of commit {args.before} loaded from git (one thread; search, create, one batch, terminate per "
        "trial through MlflowClient; its SQLite store in the default rollback-journal mode; journal not fsynced)."))
    met = None if args.smoke else True

    def cpu(c: Contender, key: str) -> float:
        return harness.spread([r.get(key, 0.0) for r in runs.get(c, [])]).median

    def server_limit(c: Contender) -> str:
        return (f"CPU per trial (3 REST calls): the writer {cpu(c, 'cpu_ms'):.1f} ms, the server "
                f"{cpu(c, 'server_cpu_ms'):.0f} ms, on the same 2 cores; "
                + ("uvicorn's FastAPI-to-Flask bridge costs the server ~7 CPU-ms a trial more than gunicorn"
                   if c.store == "uvicorn" else "the server's SQLite commits (an fsync each) and its CPU"))

    headline = [(sqlite_now, SQLITE_GOAL, "SQLite", "SQLite's one writer: 5 commits per trial (the run; the batch's "
                 "params, metrics and tags; its end), each an fsync of the WAL; "
                 f"{cpu(sqlite_now, 'cpu_ms'):.0f} CPU-ms per trial, the rest of its busy time waits for the disk "
                 "and the cores")]
    headline += [(c, SERVER_GOAL, f"mlflow server ({kind})", server_limit(c)) for kind, c in servers_now.items()]
    for c, goal, name, limit in headline:
        s = harness.spread(rate(c))
        sec.goal(f"trials/s into {name} ({c.label})", f">= {goal:g}", s.text(1),
                 None if met is None else s.median >= goal, limit)
        old = Contender(c.store, "before", 1, None)
        if before_ok and rate(old):
            sec.goal(f"{name}: now / before (paired per round)", "> 1", ratio(c, old).text(2),
                     None if met is None else ratio(c, old).median > 1, "-")
    first_now, first_old = Contender("sqlite", "now", 1, DEFAULT_FSYNC_S, True), Contender("sqlite", "before", 1, None, True)
    if rate(first_now):
        s = harness.spread(rate(first_now))
        sec.goal(f"trials/s into SQLite, opens delivered first ({first_now.label})", f">= {SQLITE_GOAL:g}", s.text(1),
                 None if met is None else s.median >= SQLITE_GOAL, "as above")
        if before_ok:
            sec.goal("SQLite, opens first: now / before (paired per round)", "> 1", ratio(first_now, first_old).text(2),
                     None if met is None else ratio(first_now, first_old).median > 1, "-")
    table = harness.Table("per contender: median [min-max] over rounds", [
        "contender", "trials/s", "enqueue ms/trial (caller)", "writer busy ms/trial (thread-s)",
        "CPU ms/trial: writer process / server", "fsyncs/trial",
        "bulk lookup of the sweep's runs (s)", "failed writes", "every trial once"])
    for c, recs in runs.items():
        def col(key: str, digits: int = 1, recs: list = recs) -> str:
            return harness.spread([r[key] for r in recs if key in r]).text(digits)
        checks = sorted({r["check"] for r in recs if r["check"]})
        cpu = col("cpu_ms") + (" / " + col("server_cpu_ms") if c.server else "")
        table.rows.append([c.label, col("trials_s"), col("enqueue_ms", 2), col("busy_ms"), cpu, col("fsyncs", 2),
                           col("lookup_s", 3) if c.code == "now" else "- (a search per trial)",
                           str(sum(r["failures"] for r in recs)), "yes" if not checks else "**no**: " + "; ".join(checks)])
    sec.tables.append(table)
    fsync = harness.Table("journal fsync: cost paired per round (trials/s with it / without)", ["store", "policy",
                                                                                               "ratio"])
    for store, writers in (("sqlite", SQLITE_WRITERS), ("gunicorn", SERVER_WRITERS)):
        off = Contender(store, "now", writers, None)
        for f in (0.0, DEFAULT_FSYNC_S):
            on = Contender(store, "now", writers, f)
            if rate(on) and rate(off):
                fsync.rows.append([store, on.label.split("fsync ")[1], ratio(on, off).text(3)])
    sec.tables.append(fsync)
    if not before_ok:
        sec.notes.append(f"commit {args.before} is not in this checkout: no paired before/now figure; BENCHMARKS.md's "
                         "scale section recorded 7.4 trials/s of capacity for the old writer on SQLite (not paired)")
    for c in (sqlite_now, *servers_now.values()):
        recs = runs.get(c, [])
        if recs:
            per_trial = harness.spread([(r["cpu_ms"] + r["server_cpu_ms"]) / 1e3 for r in recs])
            sec.notes.append(f"{c.label}: {per_trial.median * 1e3:.0f} CPU-ms per trial (writer process"
                             f"{' + server' if c.server else ''}): the CPU alone would allow about "
                             f"{os.cpu_count() / per_trial.median:.0f} trials/s on {os.cpu_count()} free cores "
                             "(the machine's load during the run is in the JSON's machine header)")
    sec.notes.append("trials/s counts from the first enqueue to the drained queue, so the caller's fsyncs (policy "
                     "`every`: each enqueue call fsyncs) are inside it; the writer's busy time sums its threads")
    sec.data = {"trials": args.trials, "server_trials": args.server_trials, "rounds": args.rounds, "before": args.before,
                "runs": {c.label: recs for c, recs in runs.items()}}
    return sec


def main() -> None:
    harness.quiet_environment()
    args = parse_args()
    from sophon_ray.run.delivery import http_env  # noqa: PLC0415

    os.environ.update(http_env())  # what the pipeline sets while the outbox delivers
    before = load_before(args.before)
    chosen = [c for c in contenders(args.smoke) if c.code == "now" or before is not None]
    tmp = Path(tempfile.mkdtemp(prefix="bench-writer-", dir="/tmp"))
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for kind in sorted({c.store for c in chosen if c.server}):
            servers[kind] = start_server(tmp / kind, kind)
        rounds = {"n": 0}

        def contender(c: Contender) -> Any:
            def run() -> dict[str, Any]:
                rounds["n"] += 1
                trials = args.server_trials if c.server else args.trials
                server = (servers[c.store][1], servers[c.store][0].pid) if c.server else None
                record = one_run(c, trials, tmp / f"r{rounds['n']}" / "run", server, before)
                harness.say(f"{c.label}: {record['trials_s']:.1f} trials/s {record['check']}")
                return record
            return run

        runs = harness.interleave({c: contender(c) for c in chosen}, args.rounds, warmup=0)
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGKILL)  # the server and its workers (its own process session)
            process.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    md, _ = section(args, runs, before is not None).write(args.out)
    harness.say(f"wrote {md}")
    print(md.read_text())


if __name__ == "__main__":
    main()
