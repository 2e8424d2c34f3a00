"""Live progress of the sweep's stages, as the console shows it (``sophon_ray.console.terminal``).

Training (pretraining and protection) runs inside Ray Train workers, whose results the driver only sees at the
end; so rank 0 of every job sends its latest state (step, total, seconds so far, latest metrics) to a small Ray
actor, :class:`ProgressBoard`, at most every ``SEND_EVERY_S`` seconds and once when the job is done, and the
driver's display polls the board (:class:`TrainProgress`). Attack trials are counted from Ray Tune's callback
hooks in the driver (:class:`AttackProgress`, fed by ``tune_driver.make_progress_callback``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sophon_ray.modes import MODES
from sophon_ray.console.terminal import Line, eta_seconds, format_duration

_METRICS = [MODES.get(m).metric for m in MODES.names()]

log = logging.getLogger(__name__)
SEND_EVERY_S = 1.0
SEND_TIMEOUT_S = 10.0
# metrics shown per stage, in this order: (name in the worker's rows, label on the console, format)
# (each mode's score: accuracy in classification, denoising skill in generation; a row holds one of them)
SHOWN = {"pretrain": (("train_loss", "loss", ".3f"),
                      *((m.val, f"val {m.short}", ".1f") for m in _METRICS)),
         "protect": (("fts_loss", "fts_loss", ".3f"), ("ntr_loss", "ntr_loss", ".3f"),
                     *((m.original, m.original, ".1f") for m in _METRICS),
                     *((m.key("probe"), m.key("probe"), ".1f") for m in _METRICS))}
UNIT = {"pretrain": "epoch", "protect": "iteration"}


class ProgressBoard:
    """The latest state of every training job, by label (a Ray actor: workers write, the driver reads)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def update(self, label: str, state: dict[str, Any]) -> None:
        """Replace the state of job ``label``."""
        self.jobs[label] = state

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every job's latest state."""
        return dict(self.jobs)


def start_board() -> Any:
    """A :class:`ProgressBoard` actor (no CPU reserved, so it never waits for the training workers' CPUs)."""
    import ray  # noqa: PLC0415

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


def stop_board(board: Any) -> None:
    """End the board actor (it holds nothing anyone needs after the stage)."""
    import ray  # noqa: PLC0415

    try:
        ray.kill(board)
    except Exception as err:  # noqa: BLE001 - already gone with its worker: nothing to free
        log.debug("progress board already gone: %s", err)


class ProgressSender:
    """The worker side: called as a metric sink ``(step, row)``; keeps the latest value of every SHOWN metric
    and sends the state to the board at most every ``every_s`` seconds (blocking, at most ``SEND_TIMEOUT_S``).

    ``board=None`` sends nothing. A board that cannot be reached is logged once and then left alone: progress
    display must never fail a protection.
    """

    def __init__(self, board: Any, label: str, stage: str, total: int, every_s: float = SEND_EVERY_S) -> None:
        self.board, self.label, self.stage, self.total, self.every_s = board, label, stage, total, every_s
        self.start = time.perf_counter()
        self.last_sent = float("-inf")
        self.state: dict[str, Any] = {"stage": stage, "step": 0, "total": total, "seconds": 0.0, "done": False,
                                      "metrics": {}}

    def __call__(self, step: int, row: Mapping[str, float]) -> None:
        shown = {name for name, _, _ in SHOWN.get(self.stage, ())}
        self.state["step"] = max(self.state["step"], int(step))
        self.state["metrics"].update({k: float(v) for k, v in row.items() if k in shown})
        if time.perf_counter() - self.last_sent >= self.every_s:
            self.send()

    def finish(self, **final: Any) -> None:
        """Send the job's last state, marked done (``final`` adds metrics, e.g. the selected state's accuracy)."""
        self.state["metrics"].update(final)
        self.state["done"] = True
        self.send()

    def send(self) -> None:
        if self.board is None:
            return
        import ray  # noqa: PLC0415

        self.state["seconds"] = time.perf_counter() - self.start
        self.last_sent = time.perf_counter()
        try:
            ray.get(self.board.update.remote(self.label, {**self.state, "metrics": dict(self.state["metrics"])}),
                    timeout=SEND_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the display is optional; training is not
            log.warning("progress board unreachable (%s: %s); no more progress from %s", type(err).__name__, err,
                        self.label)
            self.board = None


def job_line(label: str, state: Mapping[str, Any] | None) -> str:
    """One job's state as a line, e.g. ``protect ice-s0: iteration 120/400 | fts_loss 2.310 | ... | ETA 1m20s``."""
    if state is None:
        return f"{label}: waiting"
    stage, step, total = state["stage"], int(state["step"]), int(state["total"])
    metrics = state.get("metrics", {})
    shown = [f"{name_shown} {metrics[name]:{fmt}}" for name, name_shown, fmt in SHOWN.get(stage, ())
             if isinstance(metrics.get(name), (int, float))]
    head = f"{stage} {label}: {UNIT.get(stage, 'step')} {step}/{total}"
    if state.get("done"):
        tail = f"done in {format_duration(state['seconds'])}"
    elif step >= total:
        tail = "finishing (probe and test evaluation)" if stage == "protect" else "finishing"
    else:
        tail = f"ETA {format_duration(eta_seconds(step, total, state['seconds']))}"
    return " | ".join([head, *shown, tail])


@dataclass(frozen=True)
class TrainJob:
    """What the display knows of a training job before it starts: its label, stage and step count."""

    label: str
    stage: str
    total: int


class TrainProgress:
    """The training stage's display source: every job's line, from the board's latest snapshot.

    ``poll`` returns the snapshot (the board's ``snapshot``); a failed poll keeps the previous one."""

    def __init__(self, jobs: list[TrainJob], poll: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.jobs, self.poll = jobs, poll
        self.latest: Mapping[str, Mapping[str, Any]] = {}

    def status(self) -> dict[str, Line]:
        """Started jobs' lines by label, final when done (``waiting for Ray Train workers`` before any started)."""
        try:
            self.latest = self.poll()
        except Exception as err:  # noqa: BLE001 - keep showing the last known state
            log.debug("progress poll failed: %s", err)
        started = [job for job in self.jobs if job.label in self.latest]
        if not started:
            return {"": Line(f"waiting for Ray Train workers ({len(self.jobs)} job(s))")}
        return {job.label: Line(job_line(job.label, self.latest[job.label]), bool(self.latest[job.label].get("done")))
                for job in started}


def board_poll(board: Any, timeout: float = 5.0) -> Callable[[], dict[str, dict[str, Any]]]:
    """A ``poll`` for :class:`TrainProgress` that reads ``board`` (a :class:`ProgressBoard` actor)."""
    import ray  # noqa: PLC0415

    return lambda: ray.get(board.snapshot.remote(), timeout=timeout)


class AttackProgress:
    """Attack trials done / running / failed / retried and the ETA, counted from Tune's callback hooks.

    Tune calls the hooks from the driver's main thread while the display reads from its own: a lock guards the
    counts. ETA: the average pace since the first trial started, over the trials not done yet.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.clock = total, clock
        self.running: set[str] = set()
        self.done = self.failed = self.retried = 0
        self.first_start: float | None = None
        self.end: float | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Without the lock: Tune pickles its callbacks (and so this) into the experiment's saved state."""
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def started(self, trial_id: str) -> None:
        with self._lock:
            self.running.add(trial_id)
            if self.first_start is None:
                self.first_start = self.clock()

    def completed(self, trial_id: str) -> None:
        with self._lock:
            self.running.discard(trial_id)
            self.done += 1
            self._maybe_end()

    def errored(self, trial_id: str) -> None:
        """A trial Tune gave up on (its retries are spent)."""
        with self._lock:
            self.running.discard(trial_id)
            self.failed += 1
            self._maybe_end()

    def recovered(self, trial_id: str) -> None:
        """A trial failed and Tune queued it again."""
        with self._lock:
            self.running.discard(trial_id)
            self.retried += 1

    def _maybe_end(self) -> None:
        if self.done + self.failed >= self.total:
            self.end = self.clock()

    def eta(self) -> float | None:
        """Seconds left: the pace of finished trials (done and failed) since the first start."""
        if self.first_start is None:
            return None
        elapsed = (self.end or self.clock()) - self.first_start
        return eta_seconds(self.done + self.failed, self.total, elapsed)

    def line(self) -> str:
        """e.g. ``attack trials: 40/162 done | 2 running | 0 failed | 1 retried | ETA 2m10s``."""
        with self._lock:
            finished = self.done + self.failed
            parts = [f"attack trials: {self.done}/{self.total} done", f"{len(self.running)} running",
                     f"{self.failed} failed"]
            if self.retried:
                parts.append(f"{self.retried} retried")
            if finished >= self.total and self.first_start is not None:
                parts.append(f"took {format_duration((self.end or self.clock()) - self.first_start)}")
            elif self.first_start is None:
                parts.append("waiting for Ray Tune")
            elif finished == 0:
                parts.append("ETA after the first trial")
            else:
                parts.append(f"ETA {format_duration(self.eta())}")
        return " | ".join(parts)

    def status(self) -> dict[str, Line]:
        """One line for the whole grid, final once every trial finished or failed."""
        final = self.end is not None  # read first: a line read before the end is then shown again, final
        return {"attack": Line(self.line(), final)}
