"""Recovery: what each tracking outage and each driver kill costs against an uninterrupted run of the same sweep.

One small sweep (``sophon-ray run`` in its own process session: pretraining, one short protection with state
checkpoints, ``--seeds`` x 2 one-epoch attack trials), run once per case, each case in a fresh working directory
and store. A case's wall is the *total* a user spends until the sweep is complete in MLflow: every command they run
(the interrupted run, ``sophon-ray sync``, ``sophon-ray run --resume``), summed. Then the ledger is checked (every
trial exactly once: one FINISHED run per key, every epoch once; the sweep's parent run FINISHED, nothing left
RUNNING); the bench exits 1 when a case's ledger is not exact. Cases:

1. uninterrupted, SQLite store; and uninterrupted, ``mlflow server`` store (the baseline of 2 and 3);
2. ``mlflow server`` SIGKILLed mid-grid and restarted ``--outage`` s later on the same port and database;
3. the server SIGKILLed mid-grid and not restarted (``SOPHON_TRACKING_WAIT_S=5``): exit 3; then the server
   restarted, ``sophon-ray sync SPEC``, ``sophon-ray run SPEC --resume``;
4. the driver's process session (the driver and the local Ray it started) SIGKILLed mid-grid, then ``--resume``;
5. the same mid-protection, after a protection state checkpoint (``protect[0].checkpoint_every``), then ``--resume``;
6. SIGTERM to the driver mid-grid (a clean stop, exit 143), then ``--resume``.

"Mid-grid" is once a third of the trials are FINISHED in MLflow (a quarter for the server cases). One run of each
case (absolute figures, each case's ratio to its store's uninterrupted run; cases run one after the other, not
interleaved: read ratios within ~10% as noise on shared cores).

Usage: ``nice -n 5 .venv/bin/python bench/recovery.py`` (50 trials: about 15-20 min on 2 cores); ``--smoke``: 6
trials, no protection (the normal model pretrained once in this process and copied into every case, so no case
starts Ray Train), cases 1 (both stores), 2 with a 3 s outage, and 4. ``--cases A B --merge EARLIER.json`` runs
some cases again and keeps the earlier run's others in the section (the ``ended`` column says which ran when).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
import sweep_run

NAME = "recovery"
EPOCHS = 1
ALL_CASES = ["uninterrupted-sqlite", "uninterrupted-server", "server-restarted", "server-gone", "driver-kill-grid",
             "driver-kill-protect", "driver-sigterm-grid"]
SMOKE_CASES = ["uninterrupted-sqlite", "uninterrupted-server", "server-restarted", "driver-kill-grid"]
BASELINE = {c: "uninterrupted-server" if c.startswith("server") else "uninterrupted-sqlite" for c in ALL_CASES}
TITLES = {
    "uninterrupted-sqlite": "1. uninterrupted, SQLite store",
    "uninterrupted-server": "1. uninterrupted, `mlflow server` store",
    "server-restarted": "2. server SIGKILLed mid-grid, restarted after the outage",
    "server-gone": "3. server SIGKILLed mid-grid, not restarted: exit 3; restart, `sync`, `--resume`",
    "driver-kill-grid": "4. driver session SIGKILLed mid-grid, `--resume`",
    "driver-kill-protect": "5. driver session SIGKILLed mid-protection (after a state checkpoint), `--resume`",
    "driver-sigterm-grid": "6. SIGTERM to the driver mid-grid (clean stop), `--resume`",
}
PLAN = re.compile(r"attack grid: (?P<trials>\d+) trials, (?P<earlier>\d+) finished earlier, (?P<todo>\d+) to run")
RUN_NOW = re.compile(r"attack grid done \| (?P<run>\d+) run now")
GONE_WAIT_S = 5.0   # SOPHON_TRACKING_WAIT_S of case 3: how long the stage end waits for a store that is down
STORE_OPEN = "| MLflow "  # the driver's line once it has created (and migrated) its store


def parse_args(argv: list[str] | None = None) -> Any:
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=25, help="attack seeds per subject (2 subjects): trials = 2x")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the server stays down in case 2")
    parser.add_argument("--iterations", type=int, default=200, help="protection iterations")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="protection state checkpoint interval")
    parser.add_argument("--cases", nargs="*", choices=ALL_CASES, default=None, help="a subset (default: all)")
    parser.add_argument("--nice", type=int, default=0, help="nice level of every sophon-ray command")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one command may take")
    parser.add_argument("--keep", action="store_true", help="keep the working directory and print its path")
    parser.add_argument("--merge", type=Path, default=None, help="an earlier recovery.py JSON: its cases that "
                        "--cases does not run again are kept in the section (each says when it ran)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.outage, args.timeout = 3, 3.0, 300.0
        args.cases = args.cases or SMOKE_CASES
    args.cases = args.cases or ALL_CASES
    merged = set(json.loads(args.merge.read_text())["data"]["cases"]) if args.merge else set()
    for case in args.cases:
        if BASELINE[case] not in args.cases and BASELINE[case] not in merged:
            parser.error(f"--cases: {case} is measured against {BASELINE[case]}; add it")
    return args


# ---------------------------------------------------------------------------------------------- the sweep
def sweep_spec(args: Any, out: Path, uri: str) -> dict[str, Any]:
    """The one spec shape every case runs: ``sweep_run.tiny_spec`` with 2 x ``--seeds`` one-epoch trials and one
    protection of ``--iterations`` with a state checkpoint every ``--checkpoint-every`` (case 5 kills it after
    one); at ``--smoke`` no protection (subjects normal + scratch)."""
    subjects = ["normal", "scratch"] if args.smoke else ["protected", "normal"]
    spec = sweep_run.tiny_spec(NAME, out, uri, args.seeds, subjects, EPOCHS, protect=not args.smoke)
    if spec["protect"]:
        spec["protect"][0].update({"iterations": args.iterations, "checkpoint_every": args.checkpoint_every,
                                   "eval_every": args.checkpoint_every, "probe_every": args.iterations // 2})
    return spec


def trial_count(args: Any) -> int:
    return 2 * args.seeds


def seed_normal_model(args: Any, models: Path) -> Path:
    """``--smoke`` only: pretrain the spec's normal model in this process and store it under ``models`` where a
    sweep's ``checkpoints/`` holds it, so that every case reuses it (a copy) and none starts Ray Train."""
    from sophon_ray.core.data import make_splits  # noqa: PLC0415
    from sophon_ray.run.keys import pretrain_key  # noqa: PLC0415
    from sophon_ray.run.train_driver import jobs_dir  # noqa: PLC0415
    from sophon_ray.run.validate import parse_spec  # noqa: PLC0415

    spec = parse_spec(sweep_spec(args, models / "unused", "sqlite:////unused.db"), NAME)
    harness.pretrained_normal(spec, make_splits(spec), models / jobs_dir("pretrain", "normal", pretrain_key(spec)))
    return models


# ------------------------------------------------------------------------------------------ what fires when
class When:
    """``on_tick`` of :func:`sweep_run.run_sweep`: once ``ready()`` holds, ``act(session)`` runs (once); records
    the seconds from the command's start to the action and what ``ready`` saw."""

    def __init__(self, ready: Callable[[], Any], act: Callable[[int], None]) -> None:
        self.ready, self.act, self.start = ready, act, time.perf_counter()
        self.at_s: float | None = None
        self.seen: Any = None
        self.session = 0  # the command's process session (its driver's pid)

    def __call__(self, session: int) -> None:
        self.session = session
        if self.at_s is not None:
            return
        seen = self.ready()
        if seen:
            self.act(session)
            self.at_s, self.seen = time.perf_counter() - self.start, seen


def finished_at_least(workdir: Path, uri: str, n: int) -> Callable[[], int]:
    """Ready once ``n`` attack trials are FINISHED in the store (polled only after the driver opened it: two
    processes creating one SQLite schema at once collide); returns that count."""
    def ready() -> int:
        log = workdir / "stdout.log"
        if not log.is_file() or STORE_OPEN not in log.read_text(errors="replace"):
            return 0
        try:
            done = sweep_run.ledger(uri, NAME, EPOCHS, histories=False).status.get("FINISHED", 0)
        except Exception:  # noqa: BLE001 - the store is busy or being migrated: try on the next tick
            return 0
        return done if done >= n else 0
    return ready


def protection_states(out: Path) -> list[int]:
    """Iterations of the protection state checkpoints Ray Train has registered (its own snapshot of the run;
    pretraining's, label ``normal``, left out)."""
    found = []
    for snapshot in (out / "ray").glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, json.JSONDecodeError, KeyError):  # being written
            continue
        found += [r["metrics"]["iteration"] for r in results if r["metrics"].get("stage") == "protect-state"
                  and r["metrics"].get("label") != "normal"]
    return sorted(found)


def mid_protection(out: Path) -> Callable[[], int]:
    """Ready once Ray Train registered a protection state checkpoint and no protected model is stored yet;
    returns the checkpoint's iteration."""
    def ready() -> int:
        states = protection_states(out)
        if states and not list((out / "checkpoints").glob("protect-*")):
            return states[-1]
        return 0
    return ready


# ---------------------------------------------------------------------------------------------- one case
@dataclass
class Step:
    """One command of a case: what it was, its exit status and wall, and the grid lines it printed."""

    command: str
    rc: int
    wall_s: float
    plan: dict[str, int] = field(default_factory=dict)   # "N trials, E finished earlier, T to run"
    run_now: int | None = None                            # "[3/4] attack grid done | R run now"


@dataclass
class CaseResult:
    name: str
    store: str
    steps: list[Step]
    events: dict[str, Any]
    outbox_failures: list[int]
    ledger: dict[str, Any]
    runs: dict[str, dict[str, int]]
    problems: list[str]
    ran: str = ""   # when the case ended (UTC): cases merged from an earlier run (--merge) say so

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.steps)


def step_of(label: str, result: sweep_run.SweepResult) -> Step:
    plan = PLAN.search(result.stdout)
    run_now = RUN_NOW.search(result.stdout)
    return Step(label, result.rc, result.wall_s, {k: int(v) for k, v in plan.groupdict().items()} if plan else {},
                int(run_now["run"]) if run_now else None)


class Case:
    """A case's working directory, spec and store (a fresh SQLite file, or a fresh ``mlflow server`` on a free
    port over its own database), and the commands run in it."""

    def __init__(self, args: Any, work: Path, name: str, models: Path | None) -> None:
        self.args, self.name = args, name
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.store = "server" if "server" in name else "sqlite"
        self.server = None
        if self.store == "server":
            self.port = sweep_run.free_port()
            self.uri = f"http://127.0.0.1:{self.port}"
            self.server = sweep_run.start_server(self.dir, self.port)
        else:
            self.uri = f"sqlite:///{self.dir}/mlflow.db"
        if models is not None:
            shutil.copytree(models, self.dir / "out" / "checkpoints")
        self.spec = sweep_run.write_spec(sweep_spec(args, self.dir / "out", self.uri), self.dir / f"{NAME}.yaml")
        self.steps: list[Step] = []
        self.events: dict[str, Any] = {}

    def run(self, label: str, extra: list[str] = (), when: When | None = None,
            env: dict[str, str] | None = None) -> sweep_run.SweepResult:
        result = sweep_run.run_sweep(self.spec, self.dir, list(extra), nice=self.args.nice,
                                     timeout_s=self.args.timeout, on_tick=when, extra_env=env)
        (self.dir / f"stdout-{len(self.steps)}.log").write_text(result.stdout)
        self.steps.append(step_of(label, result))
        harness.say(f"  {self.name}: `{label}` exit {result.rc} in {result.wall_s:.1f} s")
        return result

    def mid_grid(self, share: float) -> Callable[[], int]:
        return finished_at_least(self.dir, self.uri, max(1, int(trial_count(self.args) * share)))

    def fired(self, when: When, what: str) -> None:
        """Record when ``when`` fired; fail loudly when it never did (the sweep ended first)."""
        if when.at_s is None:
            raise RuntimeError(f"case {self.name}: the {what} never happened (the sweep ended first); see "
                               f"{self.dir / 'stdout.log'}")
        self.events[what] = {"at_s": round(when.at_s, 1), "seen": when.seen}

    def finish(self) -> CaseResult:
        """Check the ledger (the server must be up), stop the server, and return the case's record."""
        trials = trial_count(self.args)
        try:
            book = sweep_run.ledger(self.uri, NAME, EPOCHS)
            runs = sweep_run.run_statuses(self.uri, NAME)
        finally:
            if self.server is not None:
                sweep_run.kill_server(self.server)
        problems = []
        if not (book.runs == book.keys == trials and book.status == {"FINISHED": trials}):
            problems.append(f"{book.runs} attack runs for {book.keys} keys of {trials} trials, status {book.status}")
        if book.duplicate_keys or book.bad_histories:
            problems.append(f"{book.duplicate_keys} duplicated keys, bad histories {book.bad_histories[:3]}")
        if runs.get("sweep") != {"FINISHED": 1}:
            problems.append(f"parent run(s): {runs.get('sweep')}")
        running = {role: c["RUNNING"] for role, c in runs.items() if c.get("RUNNING")}
        if running:
            problems.append(f"runs left RUNNING: {running}")
        if self.steps[-1].rc != 0:
            problems.append(f"the last command exited {self.steps[-1].rc}")
        logs = sorted((self.dir / "out" / "logs").glob("sophon-ray*.log"))
        log = "\n".join(p.read_text(errors="replace") for p in logs)
        failures = [int(m["failures"]) for m in sweep_run.OUTBOX.finditer(log)]
        return CaseResult(self.name, self.store, self.steps, self.events, failures, asdict(book), runs, problems,
                          harness.machine()["date"])


def cleanup_session(case: Case, when: When) -> None:
    """After an interrupted command: SIGKILL what is left of its process session (Ray's processes can outlive their
    driver); how many were left is recorded."""
    left = sweep_run.kill_session(when.session) if when.session else 0
    case.events.setdefault("left_in_session", []).append(left)


# ---------------------------------------------------------------------------------------------- the cases
def uninterrupted(case: Case) -> None:
    case.run("run")


def server_restarted(case: Case) -> None:
    """Kill the server once a quarter of the trials are in it; a timer restarts it ``--outage`` s later on the same
    port and database while the sweep keeps running (the stage end waits long enough: outage + 120 s)."""
    restarted: dict[str, Any] = {}

    def restart() -> None:
        t0 = time.perf_counter()
        case.server = sweep_run.start_server(case.dir, case.port)
        restarted["start_s"] = round(time.perf_counter() - t0, 1)

    timers: list[threading.Timer] = []

    def outage(_session: int) -> None:
        sweep_run.kill_server(case.server)
        timers.append(threading.Timer(case.args.outage, restart))
        timers[0].start()

    when = When(case.mid_grid(0.25), outage)
    case.run("run", when=when, env={"SOPHON_TRACKING_WAIT_S": str(case.args.outage + 120)})
    for t in timers:
        t.join()
    case.fired(when, "server SIGKILL")
    case.events["server restart"] = {"after_s": case.args.outage, **restarted}


def server_gone(case: Case) -> None:
    when = When(case.mid_grid(0.25), lambda _session: sweep_run.kill_server(case.server))
    case.run("run", when=when, env={"SOPHON_TRACKING_WAIT_S": str(GONE_WAIT_S)})
    case.fired(when, "server SIGKILL")
    t0 = time.perf_counter()
    case.server = sweep_run.start_server(case.dir, case.port)
    case.events["server restart"] = {"start_s": round(time.perf_counter() - t0, 1)}
    wall, rc, output = sweep_run.run_command(["sync", str(case.spec)], case.dir, timeout_s=case.args.timeout)
    (case.dir / f"stdout-{len(case.steps)}.log").write_text(output)
    case.steps.append(Step("sync", rc, wall))
    harness.say(f"  {case.name}: `sync` exit {rc} in {wall:.1f} s: {output.strip().splitlines()[:1]}")
    case.run("run --resume", ["--resume"])


def driver_killed(share: float | None) -> Callable[[Case], None]:
    """SIGKILL the driver's whole process session mid-grid (``share`` of the trials FINISHED) or, with ``share``
    None, mid-protection after a state checkpoint; then ``--resume``."""
    def case_fn(case: Case) -> None:
        ready = case.mid_grid(share) if share is not None else mid_protection(case.dir / "out")
        when = When(ready, lambda session: sweep_run.kill_session(session))
        case.run("run", when=when)
        case.fired(when, "driver session SIGKILL")
        cleanup_session(case, when)
        case.run("run --resume", ["--resume"])
    return case_fn


def driver_sigterm(case: Case) -> None:
    when = When(case.mid_grid(1 / 3), lambda session: os.kill(session, signal.SIGTERM))
    case.run("run", when=when)
    case.fired(when, "SIGTERM to the driver")
    cleanup_session(case, when)
    case.run("run --resume", ["--resume"])


RUNNERS: dict[str, Callable[[Case], None]] = {
    "uninterrupted-sqlite": uninterrupted, "uninterrupted-server": uninterrupted,
    "server-restarted": server_restarted, "server-gone": server_gone,
    "driver-kill-grid": driver_killed(1 / 3), "driver-kill-protect": driver_killed(None),
    "driver-sigterm-grid": driver_sigterm,
}
EXPECTED_RC = {"server-gone": 3, "driver-kill-grid": -9, "driver-kill-protect": -9, "driver-sigterm-grid": 143}


# ---------------------------------------------------------------------------------------------- the section
def merged_cases(path: Path, now: dict[str, CaseResult]) -> dict[str, CaseResult]:
    """The cases of an earlier run's JSON (``--merge``) that this run did not run again."""
    payload = json.loads(path.read_text())
    cases, ended = payload["data"]["cases"], f"by {payload['machine']['date']}"
    kept = {}
    for name, c in cases.items():
        if name in now:
            continue
        fields = {k: c[k] for k in CaseResult.__dataclass_fields__ if k in c}
        fields["steps"] = [Step(**s) for s in c["steps"]]
        fields["ran"] = fields.get("ran") or ended
        kept[name] = CaseResult(**fields)
    return kept


def case_rows(results: dict[str, CaseResult]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        base = results[BASELINE[name]]
        resumed = next((s for s in r.steps if s.command.endswith("--resume")), None)
        rerun = (f"{resumed.plan.get('earlier', '?')} finished earlier, {resumed.plan.get('todo', '?')} to run"
                 if resumed else "-")
        rows.append([TITLES[name], r.ran or "?", f"{r.wall_s:.1f}", f"{r.wall_s / base.wall_s:.2f}",
                     " + ".join(f"{s.wall_s:.1f}" for s in r.steps), " / ".join(str(s.rc) for s in r.steps),
                     rerun, str(sum(r.outbox_failures)), "exact" if not r.problems else "**NOT exact**"])
    return rows


def section(args: Any, results: dict[str, CaseResult]) -> harness.Section:
    trials = trial_count(args)
    niceness = os.nice(0) + args.nice
    smoke = (" **SMOKE sizes: the numbers check the script only** (no protection; the normal model pretrained once "
             "in the bench process and copied into every case).") if args.smoke else ""
    protection = "" if args.smoke else (f", one protection of {args.iterations} iterations with a state checkpoint "
                                        f"every {args.checkpoint_every}")
    sec = harness.Section(NAME, f"Recovery: each outage and kill against an uninterrupted run ({trials} trials)", (
        f"`sophon-ray run` of one small sweep (convnet, 8 px shapes -> shapes_m: pretraining{protection}, {trials} "
        f"one-epoch attack trials, 2 at once), once per case, each in a fresh working directory and store"
        f"{f', at nice {niceness}' if niceness else ''}. Wall: every command a user runs until the sweep is complete"
        " in MLflow, summed (the interrupted run, `sophon-ray sync`, `--resume`; not the bench's own "
        "server restarts). Mid-grid: a third of the trials FINISHED in MLflow (a quarter in the server cases). One "
        "run per case, one after the other (not interleaved): ratios within ~10% are noise on shared cores." + smoke))
    exact = all(not r.problems for r in results.values())
    sec.goal("every case: every trial exactly once in MLflow, parent run FINISHED, nothing RUNNING", "yes",
             "yes" if exact else "no: " + "; ".join(f"{n}: {', '.join(r.problems)}" for n, r in results.items()
                                                   if r.problems),
             exact if not args.smoke else None, "the journal, idempotent replay and `--resume`")
    for name, r in results.items():
        if name.startswith("uninterrupted"):
            continue
        base = results[BASELINE[name]]
        sec.goal(f"{TITLES[name]}: wall / uninterrupted ({base.store})", "context",
                 f"{r.wall_s / base.wall_s:.2f} ({r.wall_s:.0f} s vs {base.wall_s:.0f} s)", None,
                 "see the notes")
    table = harness.Table("per case (one run each)", ["case", "ended", "wall s (total)", "/ uninterrupted",
                                                      "commands' walls s", "exit statuses", "on --resume",
                                                      "outbox failed writes", "checks (ledger, exits)"])
    table.rows = case_rows(results)
    sec.tables.append(table)
    events = harness.Table("when each fault landed (seconds into the interrupted command) and what it saw",
                           ["case", "events"])
    events.rows = [[TITLES[n], "; ".join(f"{k}: {v}" for k, v in r.events.items())]
                   for n, r in results.items() if r.events]
    if events.rows:
        sec.tables.append(events)
    sec.notes.append("exit statuses: -9 is the SIGKILLed driver (no exit of its own), 143 a SIGTERM's clean stop, 3 "
                     "a run whose results wait in the journal (`INCOMPLETE`); \"on --resume\" is the resumed run's "
                     "`attack grid: N trials, E finished earlier, T to run` line (T: trials run again or for the "
                     "first time).")
    sec.data = {"trials": trials, "seeds": args.seeds, "outage_s": args.outage, "iterations": args.iterations,
                "checkpoint_every": args.checkpoint_every, "nice": niceness,
                "cases": {n: {**asdict(r), "wall_s": r.wall_s, "ratio": r.wall_s / results[BASELINE[n]].wall_s}
                          for n, r in results.items()}}
    return sec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.quiet_environment()
    work = Path(tempfile.mkdtemp(prefix="sb-recovery-", dir="/tmp"))
    results: dict[str, CaseResult] = {}
    try:
        models = seed_normal_model(args, work / "models") if args.smoke else None
        for name in args.cases:
            harness.say(f"case {name} ({trial_count(args)} trials) in {work / name}")
            case = Case(args, work, name, models)
            error = None
            try:
                RUNNERS[name](case)
            except Exception as e:  # noqa: BLE001 - recorded as the case's problem; the other cases still run
                error = f"{type(e).__name__}: {e}"
                harness.say(f"  {name} FAILED: {error}")
            if not case.steps:
                if case.server is not None:
                    sweep_run.kill_server(case.server)
                raise RuntimeError(f"case {name}: no command ran ({error})")
            try:
                results[name] = case.finish()
            except Exception as e:  # noqa: BLE001 - the store could not be read: the case fails, the others run
                results[name] = CaseResult(name, case.store, case.steps, case.events, [], {}, {},
                                           [f"ledger unreadable: {type(e).__name__}: {e}"], harness.machine()["date"])
            r = results[name]
            if error:
                r.problems.insert(0, error)
            harness.say(f"  {name}: {r.wall_s:.1f} s in all, exits {[s.rc for s in r.steps]}, outbox failures "
                        f"{r.outbox_failures}, ledger {'exact' if not r.problems else r.problems}")
            expected = EXPECTED_RC.get(name, 0)
            if r.steps[0].rc != expected:
                r.problems.append(f"the first command exited {r.steps[0].rc}, expected {expected}")
        results = {**merged_cases(args.merge, results), **results} if args.merge else results
        results = {n: results[n] for n in ALL_CASES if n in results}
        md, js = section(args, results).write(Path(args.out))
        harness.say(f"wrote {md} and {js}")
    finally:
        if args.keep:
            harness.say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    bad = {n: r.problems for n, r in results.items() if r.problems}
    if bad:
        print(f"LEDGER NOT EXACT: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
