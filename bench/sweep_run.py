"""What ``soak.py`` and ``scale.py`` share: a real ``sophon-ray run`` in its own process session (so only *its*
Ray trial processes are ever touched), its driver's memory sampled while it runs, and the MLflow ledger checked
afterwards (one FINISHED run per trial key, every epoch once).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
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
    found = OUTBOX.findall(log_text)
    outbox = {k: float(v) for k, v in zip(("ops", "failures", "busy_s", "peak_queue"), found[-1])} if found else {}
    return SweepResult(proc.returncode, wall, peak / MIB, stdout, log_text, parse_log(stdout), outbox, samples)


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
