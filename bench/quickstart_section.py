"""The quickstart benchmark's two helpers (called by ``bench/quickstart.sh``):

- ``timed TIME_FILE -- CMD...``: run CMD, then write its wall time and peak RSS to TIME_FILE in the
  ``/usr/bin/time -v`` format (the fallback where GNU time is missing);
- ``report --log LOG --time TIME_FILE ...``: parse the run's log (the pipeline's ``done in N s (...)`` line)
  and the time file into a results section (markdown + JSON).
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import harness

NAME = "quickstart"
GOAL_S = 10 * 60  # the orchestration issue: the quickstart finishes in <= 10 minutes on 2 CPU cores
DONE = re.compile(r"done in (?P<total>[\d.]+) s \((?P<stages>[^)]*)\); (?P<trials>\d+) trials, (?P<run>\d+) run now")
STAGE = re.compile(r"(?P<name>[\w+]+) (?P<seconds>[\d.]+) s")


def timed(time_file: Path, command: list[str]) -> int:
    """Run ``command``; write its wall time and the peak RSS of its largest waited-for process (kB)."""
    start = time.perf_counter()
    rc = subprocess.call(command)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    minutes, seconds = divmod(wall, 60)
    time_file.write_text(f"\tElapsed (wall clock) time (h:mm:ss or m:ss): {int(minutes)}:{seconds:05.2f}\n"
                         f"\tMaximum resident set size (kbytes): {peak_kb}\n\tExit status: {rc}\n")
    return rc


def parse_time(text: str) -> dict[str, float]:
    """Wall seconds, peak RSS (MiB), user/system CPU seconds and CPU share from ``/usr/bin/time -v`` output."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in value.split(":")]
            out["wall_s"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
        elif key == "Maximum resident set size (kbytes)":
            out["peak_rss_mib"] = int(value) / 1024
        elif key == "User time (seconds)":
            out["user_s"] = float(value)
        elif key == "System time (seconds)":
            out["system_s"] = float(value)
        elif key == "Percent of CPU this job got":
            out["cpu_percent"] = float(value.rstrip("%"))
    return out


def parse_log(text: str) -> dict[str, object]:
    """The pipeline's final ``done in`` line: total, per-stage seconds, trial counts (empty when missing)."""
    found = DONE.search(text)
    if not found:
        return {}
    stages = {m["name"]: float(m["seconds"]) for m in STAGE.finditer(found["stages"])}
    return {"total_s": float(found["total"]), "stages": stages, "trials": int(found["trials"]),
            "trials_run": int(found["run"])}


def report(args: argparse.Namespace) -> None:
    """Write the quickstart section from the run's log, its time file and exit status."""
    log_text = Path(args.log).read_text(errors="replace") if Path(args.log).is_file() else ""
    timing = parse_time(Path(args.time).read_text()) if Path(args.time).is_file() else {}
    done = parse_log(log_text)
    setup = (f"`{args.command}` in a fresh temporary working directory (fresh SQLite MLflow store, private Ray temp "
             f"dir, nothing reused), timed by {args.timer}; the sweep's own settings (resources.cpus_per_trial 1, "
             "protect_workers 1). An absolute time, the one figure here that is not a side-by-side ratio: run it "
             "on a quiet machine." + (" **SMOKE overrides: the numbers check the script only.**" if args.smoke else ""))
    sec = harness.Section(NAME, "Quickstart end to end", setup)
    wall = timing.get("wall_s", float("nan"))
    sec.goal("quickstart wall (sophon-ray run, start to exit)", f"<= {GOAL_S // 60} min on 2 CPU cores", f"{wall / 60:.2f} min" if timing else "n/a", None if args.smoke or not timing or args.rc
             else wall <= GOAL_S, "the stage that dominates the breakdown below: protection (one process, "
             "protect_workers 1) after the TorchTrainer start, then 162 attack trials on 2 slots; see the "
             "fts_step, train_scaling and tune_throughput sections")
    table = harness.Table("stage breakdown (the pipeline's own timers) and the process", ["item", "value"])
    stages = done.get("stages", {})
    table.rows += [[f"stage: {name}", f"{seconds:.0f} s ({100 * seconds / done['total_s']:.0f}%)"]
                   for name, seconds in stages.items()]
    if done:
        rest = done["total_s"] - sum(stages.values())
        table.rows.append(["not in a stage timer (pre-flight, MLflow store and parent run, summary print)",
                           f"{rest:.0f} s ({100 * rest / done['total_s']:.0f}%)"])
    table.rows += [["pipeline total (done in)", f"{done['total_s']:.0f} s" if done else "missing"],
                   ["process wall incl. interpreter start and Ray shutdown", f"{wall:.1f} s" if timing else "n/a"],
                   ["trials (run now)", f"{done.get('trials', '?')} ({done.get('trials_run', '?')})"],
                   ["peak RSS, largest single process (normally the driver)",
                    f"{timing['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in timing else "n/a"],
                   ["CPU user / system s (reaped processes)", f"{timing['user_s']:.0f} / {timing['system_s']:.0f}"
                    if "user_s" in timing else "n/a"],
                   ["exit status", str(args.rc)]]
    sec.tables.append(table)
    sec.notes += [
        "peak RSS: /usr/bin/time -v reports the largest peak RSS of any *single* process in the run's tree that "
        "was reaped by its parent (the driver; the raylet and GCS it started; Ray workers the raylet reaped), not "
        "a sum: normally the driver (per-process figures for the trial and Train workers are in the "
        "tune_throughput and train_scaling sections).",
        "CPU user/system likewise counts only reaped processes, so it can miss Ray workers still alive at "
        "shutdown.",
    ]
    if args.rc:
        sec.notes.append(f"**the run failed (exit {args.rc})**; last log lines: "
                         + " / ".join(log_text.strip().splitlines()[-3:]))
    sec.data = {"timing": timing, "pipeline": done, "rc": args.rc}
    md, js = sec.write(Path(args.out))
    harness.say(f"wrote {md} and {js}")


def main() -> None:
    """``timed`` (run and time a command) or ``report`` (write the section)."""
    if len(sys.argv) > 2 and sys.argv[1] == "timed":
        if "--" not in sys.argv:
            sys.exit("usage: quickstart_section.py timed TIME_FILE -- CMD...")
        split = sys.argv.index("--")
        sys.exit(timed(Path(sys.argv[2]), sys.argv[split + 1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    rep = sub.add_parser("report", help="parse a quickstart run into a results section")
    rep.add_argument("--log", required=True)
    rep.add_argument("--time", required=True)
    rep.add_argument("--timer", default="/usr/bin/time -v")
    rep.add_argument("--rc", type=int, default=0)
    rep.add_argument("--out", type=Path, default=harness.RESULTS_DIR / f"{NAME}.md")
    rep.add_argument("--command", default="sophon-ray run sweeps/quickstart.yaml")
    rep.add_argument("--smoke", action="store_true")
    report(parser.parse_args())


if __name__ == "__main__":
    main()
