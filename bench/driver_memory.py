"""What grows in the attack stage's driver with the number of trials: Tune (its trials and results), the MLflow
callback and outbox (per-trial state), the progress counts. A profile, not a benchmark section.

Runs ``--trials`` no-op Tune trials (each reports one last result, as an attack trial does, and mails one epoch row)
through the real driver-side machinery (``tune_driver._fit`` with ``make_callback`` on an :class:`Outbox` and
``make_progress_callback``) with a tracker that writes nothing (the MLflow store is not what is measured here), as
one Tune run or in Tune runs of ``--chunk``; prints the driver's RSS (current and peak) before and after, per trial,
and with ``--trace`` the top allocation sites still alive at the end (tracemalloc, by file and line).

Usage: ``nice -n 5 .venv/bin/python bench/driver_memory.py --trials 2000 [--chunk 500] [--trace]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

MIB = 2**20


def rss() -> tuple[float, float]:
    """(current RSS, peak RSS = VmHWM) of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class NullTracker:
    """The outbox's tracker, writing nothing (every run is new, nothing logged before)."""

    uri = "null://"

    def open_child(self, parent: str, sweep: str, role: str, key: str, name: str, params: dict,
                   defer_params: bool = False, **options: Any) -> tuple[str, bool, dict]:
        return f"run-{key}", True, dict(params) if defer_params else {}

    def keyed_runs(self, sweep: str, role: str) -> dict:
        return {}

    def log_rows(self, run_id: str, rows: Any, params: Any = None, tags: Any = None) -> None:
        pass

    def logged_steps(self, run_id: str, metric: str) -> set[int]:
        return set()

    def log_bytes(self, run_id: str, name: str, data: bytes) -> None:
        pass

    def finish(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None) -> None:
        pass


def noop_trial(config: dict, trials: dict, mail: Any) -> None:
    """Mail one epoch row and report the last result, as an attack trial's end does."""
    from ray import tune

    from sophon_ray.run.trials_worker import LAST_REPORT, mail_sender

    mail_sender(mail)([{"epoch": 0, "restricted_acc": 10.0}, {"epoch": 1, "restricted_acc": 20.0}], {})
    tune.report({LAST_REPORT: True, "done": True, "restricted_acc": 20.0, "restricted_acc_final": 20.0,
                 "restricted_acc_best": 20.0, "original_acc_final": 90.0})


def end_probe(seen: list[dict]) -> Any:
    """A Tune callback that records, as each Tune run ends (its trials still alive), the RSS and, when tracing, a
    tracemalloc snapshot (the last one kept)."""
    from ray import tune

    class EndProbe(tune.Callback):
        def on_experiment_end(self, trials: list, **info: Any) -> None:
            now = {"trials": len(trials), "rss_mib": rss()[0]}
            if tracemalloc.is_tracing():
                now["snapshot"] = tracemalloc.take_snapshot()
                now["traced_mib"] = tracemalloc.get_traced_memory()[0] / MIB
                for earlier in seen:
                    earlier.pop("snapshot", None)
            seen.append(now)

    return EndProbe()


def tune_runs(trials: list, chunk: int, storage: str, outbox: Any, progress: Any, seen: list[dict],
              name: str = "mem", trim: bool = True) -> None:
    """The trials as Tune runs of at most ``chunk`` (each with its own MLflow callback, as the attack stage does)."""
    from ray import tune

    from sophon_ray.run.tune_driver import _fit, _run_config, make_callback, make_progress_callback, release_memory
    from sophon_ray.run.trials_worker import open_mail

    for number, start in enumerate(range(0, len(trials), chunk)):
        part = trials[start:start + chunk]
        table, mail = {t.key: t for t in part}, open_mail()
        callbacks = [make_callback(outbox.tracker, "parent", "sweep", outbox), make_progress_callback(progress),
                     end_probe(seen)]
        tuner = tune.Tuner(tune.with_resources(tune.with_parameters(noop_trial, trials=table, mail=mail),
                                               {"cpu": 1}),
                           param_space={"key": tune.grid_search(list(table))},
                           tune_config=tune.TuneConfig(reuse_actors=True,
                                                       trial_dirname_creator=lambda t: f"t-{t.trial_id}"),
                           run_config=_run_config(f"{name}-{number}", storage, callbacks, 0, 0))
        grid = _fit(tuner, callbacks, mail, table)
        assert grid.num_terminated == len(part), (grid.num_terminated, len(part))
        del grid, tuner, callbacks, table
        if trim:
            release_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=0, help="Tune trials per Tune run (0: all in one)")
    parser.add_argument("--no-trim", action="store_true", help="no release_memory() after each Tune run")
    parser.add_argument("--trace", action="store_true", help="tracemalloc: the top allocation sites alive at the end")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sophon_ray.console.progress import AttackProgress
    from sophon_ray.run.outbox import Outbox
    from sophon_ray.run.plan import plan_trials
    from sophon_ray.run.validate import parse_spec

    spec = parse_spec({"attack": {"subjects": ["normal"], "evaluation": {
        "strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3], "epochs": [1],
        "seed": list(range(args.trials))}}})
    trials = plan_trials(spec, [])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="sb-drivermem-")
    outbox = Outbox(NullTracker()).start()
    progress = AttackProgress(len(trials))
    tune_runs(trials[:20], 20, storage, Outbox(NullTracker()).start(), AttackProgress(20), [], "warm-up")
    gc.collect()
    base = rss()
    if args.trace:
        tracemalloc.start(8)
    started, seen = time.perf_counter(), []
    tune_runs(trials, args.chunk or len(trials), storage, outbox, progress, seen, trim=not args.no_trim)
    wall = time.perf_counter() - started
    outbox.drain(60)
    gc.collect()
    end = rss()
    out = {"trials": args.trials, "chunk": args.chunk or args.trials, "wall_s": round(wall, 1),
           "trials_per_s": round(args.trials / wall, 1), "rss_before_mib": round(base[0]),
           "rss_after_mib": round(end[0]), "peak_rss_mib": round(end[1]),
           "peak_growth_kib_per_trial": round((end[1] - base[1]) * 1024 / args.trials, 1),
           "kept_kib_per_trial": round((end[0] - base[0]) * 1024 / args.trials, 1),
           "outbox_trial_states": len(outbox._trials), "outbox_completed": len(outbox.completed)}
    out["rss_at_each_run_end_mib"] = [round(e["rss_mib"]) for e in seen]
    if args.trace:
        last = seen[-1]
        out["traced_at_last_run_end_mib"] = round(last["traced_mib"], 1)
        out["traced_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / MIB, 1)
        out["traced_after_mib"] = round(tracemalloc.get_traced_memory()[0] / MIB, 1)
        out["top_alive_at_last_run_end"] = [f"{s.size / 1024:.0f} KiB {s.count} blocks {s.traceback[0]}"
                                            for s in last["snapshot"].statistics("lineno")[:20]]
        out["top_files_at_last_run_end"] = [f"{s.size / 1024:.0f} KiB {s.traceback[0].filename}"
                                            for s in last["snapshot"].statistics("filename")[:12]]
    print(json.dumps(out, indent=1))
    ray.shutdown()
    shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
