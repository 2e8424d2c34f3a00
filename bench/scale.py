"""Scale: one sweep of ``--trials`` tiny attack trials (1 epoch, 8 px, convnet) through ``sophon-ray run`` on this
machine's cores, then ``sophon-ray report`` on its runs and the MLflow UI's experiment-page call against an
``mlflow server`` on the same store.

Measured: the sweep's wall and trials/s, the driver's RSS while the attack grid runs (sampled every second: the
Tune runs of ``$SOPHON_TUNE_CHUNK`` trials each, MLflow callback, outbox) and its peak over the whole process (the
kernel's VmHWM: also the in-driver report stage), the MLflow outbox's write capacity (trials delivered per second of
its thread's busy time, from the driver's log) and its actual rate, ``sophon-ray report SPEC`` wall (goal <= 60 s
at 5,000 runs), and ``POST /ajax-api/2.0/mlflow/runs/search`` (max_results 100: the runs table of the UI's
experiment page; median of 5) against ``mlflow server`` on the sweep's SQLite store; then every trial is checked in
MLflow (one FINISHED run per key, every epoch once).

The driver's goal (issue 25): its peak RSS during the attack grid at N trials <= 1.2x its peak at 1,000.
``--compare`` takes earlier runs' JSON (other sizes, e.g. the 1,000-trial run): the section then has one row per
size, each size's ratio to the smallest, and with three sizes or more the least-squares line through them (MiB per
1,000 trials) extrapolated to 20,000 trials.

Usage: ``nice -n 10 .venv/bin/python bench/scale.py --trials 1000 --out bench/results/scale/scale-1000.md``, then
``... --trials 5000 --out bench/results/scale/scale-5000.md --compare bench/results/scale/scale-1000.json``, then the
largest size into the collected section (default ``--out``) with ``--compare`` of both (about an hour on 2 shared
cores; estimate first with ``--trials 500``); ``--smoke``: 20 trials. ``bench/results/scale/`` keeps the smaller
sizes' raw sections out of BENCHMARKS.md (the largest size's section has the by-size table).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

import harness
import sweep_run

from sophon_ray.cli.ui import JOB_EXECUTION_OFF
from sophon_ray.run.tune_driver import chunk_size

NAME = "scale"
REPORT_GOAL_S = 60.0
UI_GOAL_S = 2.0  # the page's runs call; a page feels broken well before 2 s
RSS_GOAL = 1.2   # the driver's peak RSS during the attack grid, relative to its peak at BASE_TRIALS
BASE_TRIALS, TARGET_TRIALS = 1000, 20000
GRID_START, GRID_END = "[2/4] attack grid:", "[3/4] attack grid done"  # the attack stage's console lines


def parse_args() -> Any:
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5000, help="attack trials (protected + normal, half each)")
    parser.add_argument("--nice", type=int, default=10, help="nice level of the sweep (default 10: shared cores)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory and print its path")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="earlier scale.py JSON results (other --trials) to compare the driver's RSS with")
    args = parser.parse_args()
    if args.smoke:
        args.trials = 20
    return args


class GridRss:
    """``on_tick`` of :func:`sweep_run.run_sweep`: the driver's current RSS every tick while the attack grid runs
    (from the console's "[2/4] attack grid:" line to "[3/4] attack grid done", read from the sweep's stdout log),
    with the seconds since the grid started."""

    def __init__(self, log: Path) -> None:
        self.log, self.offset, self.text = log, 0, ""
        self.started: float | None = None
        self.ended = False
        self.samples: list[tuple[float, float]] = []   # (seconds into the grid, RSS MiB)

    def __call__(self, pid: int) -> None:
        if self.ended:
            return
        with self.log.open(encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            new = f.read()
            self.offset = f.tell()
        self.text = self.text[-200:] + new  # a marker can straddle two reads
        if self.started is None and GRID_START in self.text:
            self.started = time.perf_counter()
        if self.started is None:
            return
        self.ended = GRID_END in self.text
        try:
            self.samples.append((time.perf_counter() - self.started, psutil.Process(pid).memory_info().rss / 2**20))
        except psutil.Error:
            pass

    def peak(self) -> float:
        return max((r for _, r in self.samples), default=float("nan"))

    def at(self, share: float) -> float:
        """The RSS sampled at ``share`` (0..1) of the grid's wall."""
        if not self.samples:
            return float("nan")
        end = self.samples[-1][0]
        return min(self.samples, key=lambda s: abs(s[0] - share * end))[1]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def time_report(spec: Path, workdir: Path) -> tuple[float, int, str]:
    """``sophon-ray report SPEC`` as a user runs it: (wall s, exit status, output tail)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sophon_ray.cli", "report", str(spec)], cwd=workdir,
                          env=sweep_run.run_env(), capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, (done.stdout + done.stderr)[-1500:]


def ui_search_seconds(db: Path, experiment: str, workdir: Path, repeats: int = 5) -> dict[str, float]:
    """Start ``mlflow server`` on the SQLite store; time the UI's experiment-page runs call (median of
    ``repeats``, after one untimed call) and the server's start."""
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
                              env={**sweep_run.run_env(), **JOB_EXECUTION_OFF},
                              stdout=open(workdir / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError(f"mlflow server did not start; see {workdir / 'server.log'}") from None
                time.sleep(0.5)
        started = time.perf_counter() - start
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}") as r:
            experiment_id = json.load(r)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [experiment_id], "filter": "", "run_view_type": "ACTIVE_ONLY",
                           "max_results": 100, "order_by": ["attributes.start_time DESC"]}).encode()

        def call() -> float:
            request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/runs/search", data=body,
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as r:
                runs = json.load(r).get("runs", [])
            assert len(runs) == 100 or len(runs) > 0, "the search returned no runs"
            return time.perf_counter() - t0

        call()
        samples = [call() for _ in range(repeats)]
        return {"server_start_s": started, "search_s": statistics.median(samples), "search_max_s": max(samples),
                "store_search_s": store_search_seconds(f"sqlite:///{db}", experiment_id, repeats)}
    finally:
        server.kill()
        server.wait()


def store_search_seconds(uri: str, experiment_id: str, repeats: int) -> float:
    """The same search (100 newest runs) in this process straight on the store: the SQL part of the UI's call."""
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=uri)

    def call() -> float:
        t0 = time.perf_counter()
        client.search_runs([experiment_id], max_results=100, order_by=["attributes.start_time DESC"])
        return time.perf_counter() - t0

    call()
    return statistics.median(call() for _ in range(repeats))


def size_rows(args: Any, here: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's sizes record and the ``--compare`` runs', by trials (each: trials, chunk, grid peak RSS, RSS at
    10% / 90% of the grid, VmHWM, attack trials/s, report s)."""
    rows = {here["trials"]: here}
    for path in args.compare:
        data = json.loads(path.read_text())["data"]
        if "size" in data:
            rows.setdefault(data["size"]["trials"], data["size"])
    return [rows[k] for k in sorted(rows)]


def rss_goal(sec: harness.Section, sizes: list[dict[str, Any]], smoke: bool) -> None:
    """The driver's goal row (peak RSS during the grid vs at the smallest size; the goal's base is 1,000 trials),
    the by-size table and, with three sizes or more, the line through them extrapolated to 20,000 trials."""
    base, here = sizes[0], sizes[-1]
    ratio = here["grid_peak_mib"] / base["grid_peak_mib"]
    comparable = base["trials"] == BASE_TRIALS and here["trials"] > base["trials"]
    sec.goal(f"driver peak RSS during the attack grid at {here['trials']:,} trials / at {base['trials']:,}",
             f"<= {RSS_GOAL} (at {TARGET_TRIALS:,} / {BASE_TRIALS:,})",
             f"{ratio:.3f} ({here['grid_peak_mib']:.0f} / {base['grid_peak_mib']:.0f} MiB)" if len(sizes) > 1 else
             f"{here['grid_peak_mib']:.0f} MiB (one size: pass --compare for the ratio)",
             None if smoke or not comparable else ratio <= RSS_GOAL,
             "what the driver keeps per trial for the whole sweep (the plan, the outbox's per-trial state); Tune's "
             "per-trial state is bounded by the chunk")
    table = harness.Table("driver RSS by sweep size (sampled every second during the attack grid)",
                          ["trials", "Tune runs of at most", "grid peak RSS", "at 10% / 90% of the grid",
                           "process peak (VmHWM, incl. the report stage)", "attack trials/s", "report",
                           f"grid peak / at {base['trials']:,}"])
    for s in sizes:
        table.rows.append([f"{s['trials']:,}", f"{s['chunk']:,}", f"{s['grid_peak_mib']:.0f} MiB",
                           f"{s['grid_10_mib']:.0f} / {s['grid_90_mib']:.0f} MiB", f"{s['vmhwm_mib']:.0f} MiB",
                           f"{s['trials_per_s']:.2f}", f"{s['report_s']:.1f} s",
                           f"{s['grid_peak_mib'] / base['grid_peak_mib']:.3f}"])
    sec.tables.append(table)
    if len(sizes) >= 3:
        intercept, slope = fit_line([(s["trials"], s["grid_peak_mib"]) for s in sizes])
        at_target = intercept + slope * TARGET_TRIALS
        at_base = intercept + slope * BASE_TRIALS
        sec.notes.append(f"Least-squares line through the {len(sizes)} measured sizes: {intercept:.0f} MiB + "
                         f"{slope * 1000:.1f} MiB per 1,000 trials; extrapolated to {TARGET_TRIALS:,} trials: "
                         f"{at_target:.0f} MiB, {at_target / at_base:.3f}x the line's value at {BASE_TRIALS:,} "
                         f"(goal <= {RSS_GOAL}).")


def section(args: Any, result: sweep_run.SweepResult, report: tuple[float, int, str], ui: dict[str, float],
            book: sweep_run.Ledger, grid: GridRss) -> harness.Section:
    done, box = result.done, result.outbox
    attack_s = done.get("stages", {}).get("attack", float("nan"))
    trials = args.trials
    complete = book.runs == trials == book.keys and book.status.get("FINISHED", 0) == trials and not book.bad_histories
    smoke = " **SMOKE sizes: the numbers check the script only.**" if args.smoke else ""
    sec = harness.Section(NAME, f"Scale: {trials:,} tiny trials on {harness.machine()['nproc']} cores", (
        f"`nice -n {args.nice} sophon-ray run` of {trials:,} attack trials (subjects protected + normal, "
        f"{trials // 2:,} attack seeds of one recipe: convnet, 8 px shapes -> shapes_m, 400 restricted training "
        "images, batch 32, 1 epoch; cpus_per_trial 1, so 2 at once), SQLite MLflow store, then `sophon-ray report "
        "SPEC` and the UI's runs call against `mlflow server` on that store. One run: absolute figures, on cores "
        "shared with other work (load average in the header)." + smoke))
    sec.goal("sweep completes, every trial exactly once in MLflow (FINISHED, every epoch once)", "yes",
             f"{'yes' if complete else 'no'}: {book.runs} runs, {book.keys} keys, {book.status}, "
             f"{book.duplicate_keys} duplicated, {len(book.bad_histories)} bad histories",
             None if args.smoke else complete and result.rc == 0, "-")
    sec.goal(f"`sophon-ray report SPEC` on {trials:,} runs", f"<= {REPORT_GOAL_S:.0f} s", f"{report[0]:.1f} s",
             None if args.smoke else report[0] <= REPORT_GOAL_S and report[1] == 0,
             "reading the runs (search_runs pages of 1000) and their curves (one bulk query per 100 runs); "
             "drawing the figures")
    sec.goal("MLflow UI experiment page: `POST /ajax-api/2.0/mlflow/runs/search` max_results 100",
             f"<= {UI_GOAL_S:.0f} s", f"{ui['search_s']:.2f} s (max {ui['search_max_s']:.2f})",
             None if args.smoke else ui["search_s"] <= UI_GOAL_S,
             f"not the run count: the store's own query for those 100 runs takes {ui['store_search_s']:.2f} s in "
             "process; the rest is the server process (one worker) on busy cores")
    table = harness.Table("measured (one run)", ["item", "value"])
    busy = box.get("busy_s", float("nan"))
    table.rows += [
        ["exit status", str(result.rc)],
        ["sweep wall (process)", f"{result.wall_s:.0f} s"],
        ["stages (pipeline timers)", ", ".join(f"{k} {v:.0f} s" for k, v in done.get("stages", {}).items()) or "?"],
        ["attack stage throughput", f"{trials / attack_s:.2f} trials/s ({attack_s / trials * 2:.2f} s per trial "
         "per slot)"],
        ["driver peak RSS during the attack grid (sampled every second)", f"{grid.peak():.0f} MiB"],
        ["driver peak RSS (VmHWM, the whole process: also the in-driver report stage)",
         f"{result.driver_peak_rss_mib:.0f} MiB"],
        ["MLflow outbox: operations delivered / failed writes retried / peak queue",
         f"{box.get('ops', 0):.0f} / {box.get('failures', 0):.0f} / {box.get('peak_queue', 0):.0f}"],
        ["MLflow write capacity (trials delivered per second of the outbox thread's busy time)",
         f"{trials / busy:.1f} runs/s ({busy:.0f} s busy in all)" if busy == busy and busy > 0 else "?"],
        ["MLflow write rate achieved (runs/s over the attack stage)", f"{trials / attack_s:.2f} runs/s"],
        ["`sophon-ray report SPEC` wall (process, incl. imports) / exit", f"{report[0]:.1f} s / {report[1]}"],
        ["mlflow server start", f"{ui['server_start_s']:.1f} s"],
        ["UI runs call, median of 5 (max)", f"{ui['search_s'] * 1e3:.0f} ms ({ui['search_max_s'] * 1e3:.0f} ms)"],
        ["the same search in process on the SQLite store, median of 5", f"{ui['store_search_s'] * 1e3:.0f} ms"],
    ]
    sec.tables.append(table)
    size = {"trials": trials, "chunk": min(trials, chunk_size()), "grid_peak_mib": grid.peak(),
            "grid_10_mib": grid.at(0.1), "grid_90_mib": grid.at(0.9), "vmhwm_mib": result.driver_peak_rss_mib,
            "trials_per_s": trials / attack_s, "report_s": report[0]}
    rss_goal(sec, size_rows(args, size), args.smoke)
    sec.data = {"trials": trials, "rc": result.rc, "wall_s": result.wall_s, "pipeline": done, "outbox": box,
                "driver_peak_rss_mib": result.driver_peak_rss_mib, "report_s": report[0], "report_rc": report[1],
                "ui": ui, "ledger": book.__dict__, "size": size,
                "grid_rss_samples": [(round(t, 1), round(r)) for t, r in grid.samples]}
    return sec


def main() -> None:
    args = parse_args()
    harness.quiet_environment()
    work = Path(tempfile.mkdtemp(prefix="sb-scale-", dir="/tmp"))
    try:
        uri = f"sqlite:///{work}/mlflow.db"
        spec = sweep_run.write_spec(sweep_run.tiny_spec("scale", work / "out", uri, args.trials // 2,
                                                        ["protected", "normal"]), work / "scale.yaml")
        harness.say(f"{args.trials} trials in {work}")
        grid = GridRss(work / "stdout.log")
        result = sweep_run.run_sweep(spec, work, ["--max-trials", str(args.trials)], nice=args.nice, on_tick=grid)
        harness.say(f"sweep exit {result.rc} in {result.wall_s:.0f} s; driver peak {result.driver_peak_rss_mib:.0f} "
                    f"MiB, during the attack grid {grid.peak():.0f} MiB")
        if result.rc:
            print(result.stdout[-3000:], file=sys.stderr)
        report = time_report(spec, work)
        harness.say(f"report {report[0]:.1f} s (exit {report[1]})")
        ui = ui_search_seconds(work / "mlflow.db", "scale", work)
        harness.say(f"UI runs call {ui['search_s']:.2f} s")
        book = sweep_run.ledger(uri, "scale", epochs=1)
        harness.say(f"ledger: {book.runs} runs, {book.keys} keys, {book.status}, {len(book.bad_histories)} bad")
        md, js = section(args, result, report, ui, book, grid).write(Path(args.out))
        harness.say(f"wrote {md} and {js}")
    finally:
        if args.keep:
            harness.say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
