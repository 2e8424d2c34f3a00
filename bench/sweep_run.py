"""What ``soak.py`` and ``scale.py`` share: a real ``sophon-ray run`` in its own process session (so only *its*
Ray trial processes are ever touched), its driver's memory sampled while it runs, and the MLflow ledger checked
afterwards (one FINISHED run per trial key, every epoch once).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

import harness
from quickstart_section import parse_log

MIB = 2**20
OUTBOX = re.compile(r"MLflow outbox: (?P<ops>\d+) operation\(s\) delivered, (?P<failures>\d+) failed write\(s\) "
                    r"retried, (?P<busy>[\d.]+) s busy, peak queue (?P<peak>\d+)")


def tiny_spec(name: str, out: Path, uri: str, seeds: int, subjects: list[str], epochs: int = 1,
              protect: bool = True) -> dict[str, Any]:
    """A sweep of ``len(subjects) x seeds`` tiny attack trials (convnet, 8 px shapes -> shapes_m, 128 restricted
    training images, 1 recipe, ``epochs`` epochs); one 4-iteration protection when ``protect``."""
    spec: dict[str, Any] = {
        "name": name, "output_dir": str(out), "model": {"arch": "convnet", "num_classes": 10},
        "original": {"dataset": "shapes", "image_size": 8, "channels": 3, "train_size": 400, "test_size": 100},
        "restricted": [{"dataset": "shapes_m", "image_size": 8, "channels": 3, "train_size": 400, "test_size": 64}],
        "pretrain": {"epochs": 1},
        "protect": [{"name": "v", "iterations": 4, "inner_steps": 2, "eval_every": 2, "probe_every": 2,
                     "probe_epochs": 1}] if protect else [],
        "attack": {"subjects": subjects,
                   "evaluation": {"strategy": ["direct-all"], "optimizer": ["adam"], "lr": [1e-3], "batch_size": [32],
                                  "data_fraction": [1.0], "epochs": [epochs], "seed": list(range(seeds))}},
        "tracking": {"uri": uri},
    }
    return spec


def write_spec(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a throwaway local sweep: no telemetry, loopback Ray without auth, this venv's Python."""
    harness.quiet_environment()
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", **(extra or {})}
    e.pop("RAY_ADDRESS", None)
    return e


@dataclass
class SweepResult:
    """One ``sophon-ray run``: exit status, wall, the driver's peak RSS, its console output and log."""

    rc: int
    wall_s: float
    driver_peak_rss_mib: float
    stdout: str
    log: str
    done: dict[str, Any] = field(default_factory=dict)     # the "done in ..." line, parsed
    outbox: dict[str, float] = field(default_factory=dict)  # the driver's "MLflow outbox: ..." line, parsed
    samples: int = 0


def _peak_rss(proc: psutil.Process) -> int:
    """The kernel's high-water mark of the process's RSS (VmHWM), bytes; its current RSS where unavailable."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def run_sweep(spec: Path, workdir: Path, args: list[str] = (), nice: int = 0, timeout_s: float = 7200,
              every_s: float = 1.0, on_tick: Callable[[int], None] | None = None,
              extra_env: dict[str, str] | None = None) -> SweepResult:
    """``sophon-ray run SPEC ARGS`` in a new process session under ``nice``; every ``every_s`` seconds the
    driver's peak RSS is read and ``on_tick(session id)`` is called (the soak's killer)."""
    log_file = workdir / "stdout.log"
    command = [sys.executable, "-m", "sophon_ray.cli", "run", str(spec), *args]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    start = time.perf_counter()
    with log_file.open("w") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=run_env(extra_env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
    driver = psutil.Process(proc.pid)
    peak, samples = 0, 0
    while proc.poll() is None:
        if time.perf_counter() - start > timeout_s:
            os.killpg(proc.pid, 9)
            raise TimeoutError(f"sweep {spec} ran past {timeout_s} s; see {log_file}")
        try:
            peak = max(peak, _peak_rss(driver))
            samples += 1
        except psutil.Error:
            pass
        if on_tick is not None:
            on_tick(proc.pid)
        time.sleep(every_s)
    wall = time.perf_counter() - start
    stdout = log_file.read_text()
    logs = sorted((workdir / "out" / "logs").glob("sophon-ray*.log")) if (workdir / "out").is_dir() else []
    log_text = "\n".join(p.read_text() for p in logs)
    outbox = outbox_totals(log_text)
    return SweepResult(proc.returncode, wall, peak / MIB, stdout, log_text, parse_log(stdout), outbox, samples)


def outbox_totals(log_text: str) -> dict[str, float]:
    """The run's MLflow outboxes together (one per stage that writes, each logs one ``MLflow outbox:`` line):
    operations delivered, failed writes retried and busy seconds summed, the largest peak queue; {} when none."""
    found = [dict(zip(("ops", "failures", "busy_s", "peak_queue"), map(float, row)))
             for row in OUTBOX.findall(log_text)]
    if not found:
        return {}
    return {**{k: sum(f[k] for f in found) for k in ("ops", "failures", "busy_s")},
            "peak_queue": max(f["peak_queue"] for f in found)}


def session_trial_processes(session: int) -> list[psutil.Process]:
    """Ray Tune trial processes (``ImplicitFunc`` in the title) of the sweep started in process session
    ``session``: never another sweep's on the same machine."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "ImplicitFunc" in " ".join(p.info["cmdline"] or []) and os.getsid(p.pid) == session:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


@dataclass
class Ledger:
    """The sweep's attack runs in MLflow: how many, distinct keys, by status, duplicates, history problems."""

    runs: int
    keys: int
    status: dict[str, int]
    duplicate_keys: int
    bad_histories: list[str]
    checked_histories: int


def ledger(uri: str, experiment: str, epochs: int, histories: bool = True) -> Ledger:
    """Read every attack run (search_runs pages) and, with ``histories``, each one's ``restricted_acc`` history:
    exactly the steps 0..epochs, each once."""
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs, token = [], None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], "tags.`sophon.role` = 'attack'", max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    keys = Counter(r.data.tags.get("sophon.key") for r in runs)
    bad = []
    if histories:
        for r in runs:
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "restricted_acc"))
            if steps != list(range(epochs + 1)):
                bad.append(f"{r.data.tags.get('sophon.key')}: {steps}")
    return Ledger(len(runs), len(keys), dict(Counter(r.info.status for r in runs)),
                  sum(1 for n in keys.values() if n > 1), bad, len(runs) if histories else 0)


# ------------------------------------------------------------------ faults (recovery.py): sessions, server, commands
def session_processes(session: int, name: str = "") -> list[psutil.Process]:
    """The processes of process session ``session`` whose command line holds ``name``: a sweep started by
    :func:`run_sweep` and the local Ray instance it started (never another sweep's on the same machine)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == session and name in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def kill_session(session: int, rounds: int = 5) -> int:
    """SIGKILL every process of ``session`` and wait for them to go; again while any is left (up to ``rounds``
    times: a raylet can start a worker between the scan and its own death). Returns how many were killed. This
    process's own children (the driver :func:`run_sweep` started) are killed but not waited for here: reaping one
    would take its exit status from its ``Popen``, whose ``poll`` would then say 0 instead of -9."""
    killed = 0
    for _ in range(rounds):
        victims = session_processes(session)
        if not victims:
            break
        mine = {c.pid for c in psutil.Process().children()}
        for p in victims:
            try:
                p.kill()
                killed += 1
            except psutil.Error:
                pass
        psutil.wait_procs([p for p in victims if p.pid not in mine], timeout=30)
        if all(p.pid in mine for p in victims):
            break
    return killed


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, port: int, timeout_s: float = 120) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``workdir/server.db`` (the same database on every restart),
    artifacts in ``workdir/artifacts``, one worker, MLflow's job execution off (as ``sophon-ray ui`` runs it), in
    its own process session; returns once ``/health`` answers (the log: ``workdir/server.log``)."""
    import urllib.request  # noqa: PLC0415

    from sophon_ray.cli.ui import JOB_EXECUTION_OFF  # noqa: PLC0415

    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{workdir}/server.db", "--artifacts-destination",
         str(workdir / "artifacts"), "--workers", "1"],
        env={**run_env(), **JOB_EXECUTION_OFF}, stdout=(workdir / "server.log").open("a"), stderr=subprocess.STDOUT,
        start_new_session=True)
    start = time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            if server.poll() is not None or time.perf_counter() - start > timeout_s:
                kill_server(server)
                raise RuntimeError(f"mlflow server on port {port} did not start in {timeout_s:.0f} s; see "
                                   f"{workdir / 'server.log'}") from None
            time.sleep(0.5)


def kill_server(server: subprocess.Popen) -> None:
    """SIGKILL the server's process group (its workers too: no clean shutdown); nothing when it is gone."""
    try:
        os.killpg(server.pid, 9)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


def run_command(words: list[str], workdir: Path, extra_env: dict[str, str] | None = None,
                timeout_s: float = 600) -> tuple[float, int, str]:
    """``sophon-ray WORDS`` as a user runs it (e.g. ``sync SPEC``): (wall s, exit status, its output)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sophon_ray.cli", *words], cwd=workdir, env=run_env(extra_env),
                          capture_output=True, text=True, timeout=timeout_s)
    return time.perf_counter() - start, done.returncode, done.stdout + done.stderr


def run_statuses(uri: str, experiment: str) -> dict[str, dict[str, int]]:
    """Every run of the experiment, counted by role tag (``sweep`` is the parent run, ``attack``, ``protect``,
    ...) and status: a finished sweep has one FINISHED ``sweep`` run and nothing RUNNING."""
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    counts: dict[str, Counter] = {}
    token = None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            counts.setdefault(r.data.tags.get("sophon.role", "?"), Counter())[r.info.status] += 1
        token = page.token
        if not token:
            break
    return {role: dict(c) for role, c in counts.items()}
