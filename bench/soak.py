"""Chaos soak: a ``sophon-ray run`` of ``--trials`` short attack trials while one of *its* Tune trial processes is
SIGKILLed every ``--kill-every`` seconds; then MLflow must hold every trial exactly once (one FINISHED run per
trial key, every epoch once).

Victims are the ``ImplicitFunc`` processes in the sweep's own process session (the sweep is started with
``start_new_session``), never another sweep's. Recorded: kills (and how many hit a process), Tune's retries (the
progress line's ``retried`` count), retry passes, trials, duplicates, runs not FINISHED, bad histories, wall.

Usage: ``.venv/bin/python bench/soak.py`` (300 trials of 4 epochs, a kill every 10 s: about 5 min on 2 cores; trials much longer than the kill interval never finish on a busy machine: every kill restarts one);
``--smoke``: 12 trials, a kill every 5 s.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import sweep_run

NAME = "soak"
EPOCHS = 4
RETRIED = re.compile(r"(\d+) retried")


def parse_args() -> Any:
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="attack trials (normal + scratch, half each)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between two SIGKILLs")
    parser.add_argument("--max-failures", type=int, default=5, help="resources.max_failures (Tune retries per trial)")
    parser.add_argument("--seed", type=int, default=0, help="which trial process is picked")
    parser.add_argument("--progress", type=int, default=1, help="trials that must finish between two kills "
                        "(default 1; 0: kill every --kill-every seconds regardless)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory and print its path")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.kill_every = 12, 5.0
    return args


class Killer:
    """Called every second with the sweep's session id: SIGKILLs one of its trial processes every ``every_s``,
    once at least ``progress`` trials finished (in MLflow) since the previous kill: on a busy machine a Ray actor
    can take longer than ``every_s`` to start, and killing every new one would stop the sweep altogether."""

    def __init__(self, every_s: float, seed: int, uri: str, progress: int) -> None:
        self.every_s, self.rng, self.uri, self.progress = every_s, random.Random(seed), uri, progress
        self.last = time.monotonic()
        self.finished_at_last = 0
        self.kills: list[dict[str, Any]] = []
        self.misses = 0   # a kill was due and no trial process was running
        self.waits = 0    # a kill was due and too few trials had finished since the last one

    def finished(self) -> int:
        try:
            return sweep_run.ledger(self.uri, "soak", EPOCHS, histories=False).status.get("FINISHED", 0)
        except Exception:  # noqa: BLE001 - the store is being created or migrated by the driver: try next tick
            return self.finished_at_last

    def __call__(self, session: int) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        finished = self.finished() if self.progress else 0
        if finished - self.finished_at_last < self.progress:
            self.waits += 1
            return
        victims = sweep_run.session_trial_processes(session)
        if not victims:
            self.misses += 1
            return
        victim = self.rng.choice(victims)
        try:
            os.kill(victim.pid, signal.SIGKILL)
            self.kills.append({"t": time.monotonic(), "pid": victim.pid, "finished_before": finished})
            self.finished_at_last = finished
        except ProcessLookupError:
            pass
        self.last = time.monotonic()


def _mean_gap(killer: Killer) -> float:
    times = [k["t"] for k in killer.kills]
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


def section(args: Any, result: sweep_run.SweepResult, killer: Killer, book: sweep_run.Ledger) -> harness.Section:
    retried = [int(n) for n in RETRIED.findall(result.stdout)]
    passes = result.stdout.count("one more pass for them")  # the pipeline says so once per retry pass
    not_finished = book.runs - book.status.get("FINISHED", 0)
    exactly_once = (book.runs == book.keys == args.trials and not not_finished and not book.bad_histories
                    and not book.duplicate_keys)
    smoke = " **SMOKE sizes: the numbers check the script only.**" if args.smoke else ""
    sec = harness.Section(NAME, f"Chaos soak: {args.trials} trials, a trial process SIGKILLed every "
                          f"{args.kill_every:g} s", (
        f"`sophon-ray run` of {args.trials} attack trials (normal + scratch, {args.trials // 2} attack seeds of one "
        f"recipe: convnet, 8 px shapes -> shapes_m, {EPOCHS} epochs; SQLite store; resources.max_failures "
        f"{args.max_failures}; 2 trials at once) while `bench/soak.py` SIGKILLs one of the sweep's own Tune trial "
        f"processes (`ImplicitFunc`, same process session) every {args.kill_every:g} s, once at least "
        f"{args.progress} trial(s) finished since the previous kill. One run." + smoke))
    sec.goal("every trial exactly once in MLflow (one FINISHED run per key, every epoch once)", "yes",
             f"{'yes' if exactly_once else 'no'}: {book.runs} runs / {book.keys} keys / {args.trials} trials, "
             f"{book.duplicate_keys} duplicated, {not_finished} not FINISHED, {len(book.bad_histories)} bad histories",
             None if args.smoke else exactly_once and result.rc == 0,
             "Tune's retries (resources.max_failures) and the pipeline's retry pass; the outbox logs each step once")
    table = harness.Table("measured (one run)", ["item", "value"])
    table.rows += [["exit status", str(result.rc)], ["wall (process)", f"{result.wall_s:.0f} s"],
                   ["stages", ", ".join(f"{k} {v:.0f} s" for k, v in result.done.get("stages", {}).items()) or "?"],
                   ["SIGKILLs sent to trial processes", str(len(killer.kills))],
                   ["seconds with a kill due but no trial process running (pretraining, between trials)",
                    str(killer.misses)],
                   [f"seconds with a kill due but fewer than {args.progress} trial(s) finished since the last",
                    str(killer.waits)],
                   ["mean seconds between kills", f"{_mean_gap(killer):.1f}"],
                   ["Tune retries (progress line, last pass)", str(max(retried, default=0))],
                   ["pipeline retry passes", str(passes)],
                   ["MLflow outbox: operations / failed writes", f"{result.outbox.get('ops', 0):.0f} / "
                                                                 f"{result.outbox.get('failures', 0):.0f}"],
                   ["driver peak RSS", f"{result.driver_peak_rss_mib:.0f} MiB"]]
    sec.tables.append(table)
    sec.notes.append("a SIGKILL can land between two trials of a reused actor (nothing to retry) or on a trial; "
                     "Tune counts a retry only in the second case, so retries <= kills.")
    if book.bad_histories:
        sec.notes.append("bad histories: " + "; ".join(book.bad_histories[:5]))
    sec.data = {"trials": args.trials, "rc": result.rc, "wall_s": result.wall_s, "kills": killer.kills,
                "misses": killer.misses, "retried": retried, "retry_passes": passes, "ledger": book.__dict__,
                "outbox": result.outbox, "pipeline": result.done}
    return sec


def main() -> None:
    args = parse_args()
    harness.quiet_environment()
    work = Path(tempfile.mkdtemp(prefix="sb-soak-", dir="/tmp"))
    try:
        uri = f"sqlite:///{work}/mlflow.db"
        spec = sweep_run.tiny_spec("soak", work / "out", uri, args.trials // 2, ["normal", "scratch"], EPOCHS,
                                   protect=False)
        spec["resources"] = {"max_failures": args.max_failures}
        path = sweep_run.write_spec(spec, work / "soak.yaml")
        killer = Killer(args.kill_every, args.seed, uri, args.progress)
        harness.say(f"{args.trials} trials, a SIGKILL every {args.kill_every:g} s, in {work}")
        result = sweep_run.run_sweep(path, work, ["--max-trials", str(args.trials)], on_tick=killer)
        harness.say(f"exit {result.rc} after {result.wall_s:.0f} s, {len(killer.kills)} kills")
        if result.rc:
            print(result.stdout[-3000:], file=sys.stderr)
        book = sweep_run.ledger(uri, "soak", EPOCHS)
        harness.say(f"ledger: {book.runs} runs, {book.keys} keys, {book.status}, {book.duplicate_keys} duplicated, "
                    f"{len(book.bad_histories)} bad histories")
        md, js = section(args, result, killer, book).write(Path(args.out))
        harness.say(f"wrote {md} and {js}")
    finally:
        if args.keep:
            harness.say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
