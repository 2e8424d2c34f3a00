"""The attack stage's MLflow writes, delivered without ever blocking Ray Tune and never lost or duplicated.

The Tune callback only *enqueues* operations (open a trial's run, log rows, set a tag, finish); a delivery
thread sends them to the store in order, one at a time. A write that fails stays at the head of the queue and is
retried with exponential backoff (``BACKOFF_START_S`` doubling to ``BACKOFF_CAP_S``) until the store answers, so
a tracking server that dies and comes back loses nothing. Every operation is first appended to a **journal**
(``<output_dir>/tracking-journal.jsonl``, JSON lines), and an ``ack`` line follows once all of a trial's queued
operations are delivered; a server that never comes back leaves the trial's operations unacknowledged there, and
``sophon-ray sync SPEC`` or ``sophon-ray run SPEC --resume`` delivers them later.

Replay is idempotent: operations are keyed by trial key (runs are found again by their ``sophon.key`` tag,
:meth:`Tracker.open_child`) and metric step; after any failed write the trial's logged points are read back from
the store before the write is repeated, so a write that reached the store before its answer was lost is not
logged twice.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sophon_ray.run.tracking import Tracker

log = logging.getLogger(__name__)

JOURNAL = "tracking-journal.jsonl"
WAIT_ENV = "SOPHON_TRACKING_WAIT_S"       # how long the end of a stage waits for a store that delivers nothing
DEFAULT_WAIT_S = 120.0
BACKOFF_START_S, BACKOFF_CAP_S = 0.5, 15.0
# MLflow's own HTTP client retries a refused connection for minutes (7 retries, backoff factor 2) inside one call;
# while the outbox delivers, a failed call should come back fast so that the outbox's backoff decides.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def wait_seconds() -> float:
    """$SOPHON_TRACKING_WAIT_S, else ``DEFAULT_WAIT_S``; raises TrackingError naming the variable when it is bad."""
    from sophon_ray.run.tracking import TrackingError  # noqa: PLC0415

    text = os.environ.get(WAIT_ENV)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise TrackingError(f"{WAIT_ENV}={text!r} is not a number of seconds >= 0; unset it (default "
                         f"{DEFAULT_WAIT_S:g}) or set e.g. {WAIT_ENV}=300")
    return value


def http_env() -> dict[str, str]:
    """``HTTP_ENV`` without the variables the user set (theirs win)."""
    return {k: v for k, v in HTTP_ENV.items() if k not in os.environ}


def backoff(start: float = BACKOFF_START_S, cap: float = BACKOFF_CAP_S) -> Iterator[float]:
    """Delays between retries: ``start``, doubling, at most ``cap``."""
    delay = start
    while True:
        yield delay
        delay = min(cap, delay * 2)


@dataclass(frozen=True)
class Op:
    """One pending MLflow operation of one trial: ``kind`` open | rows | tag | artifact | finish, its data as JSON
    (an artifact's bytes base64-encoded)."""

    key: str
    kind: str
    data: Mapping[str, Any]

    def line(self) -> str:
        return json.dumps({"key": self.key, "op": self.kind, **self.data}, separators=(",", ":")) + "\n"


class Journal:
    """Append-only JSON lines: every operation before it is sent, ``{"op": "ack"}`` once a trial's queued
    operations were all delivered. Thread-safe appends; a torn last line (a killed driver) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, lines: Iterable[str]) -> None:
        text = "".join(lines)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (a write cut short?); skipped", self.path, number)
        return out

    def pending(self) -> list[Op]:
        """Operations not acknowledged yet, in journal order; each trial's latest ``open`` first (its run may
        have been opened, and acknowledged, before the operations that are still pending)."""
        last_open: dict[str, Op] = {}
        waiting: dict[str, list[Op]] = {}
        for record in self.records():
            key, kind = record.pop("key"), record.pop("op")
            if kind == "ack":
                waiting.pop(key, None)
                continue
            op = Op(key, kind, record)
            if kind == "open":
                last_open[key] = op
            waiting.setdefault(key, []).append(op)
        ops = []
        for key, todo in waiting.items():
            if todo[0].kind != "open" and key in last_open:
                ops.append(last_open[key])
            ops.extend(todo)
        return ops


class OrphanOperation(ValueError):
    """An operation of a trial whose run was never opened: it can never be delivered."""


@dataclass
class Stats:
    """What the delivery thread did: operations delivered, failed attempts (each retried), seconds busy."""

    delivered: int = 0
    failures: int = 0
    busy_s: float = 0.0
    last_error: str = ""
    peak_queue: int = 0
    runs_opened: int = 0
    finished: int = 0


@dataclass
class _TrialState:
    run_id: str | None = None
    fresh: bool = False                                  # created by this outbox: nothing logged before it
    points: dict[str, set[int]] = field(default_factory=dict)  # metric -> steps known to be in the store
    dirty: bool = False                                  # a write failed: re-read before writing again
    reread: bool = False                                 # the store was re-read since (so nothing is "fresh")
    params: dict[str, str] = field(default_factory=dict)  # the run's params not logged yet (go with the next batch)


class Outbox:
    """Queue + journal + delivery thread for one tracker. ``start()`` the thread, enqueue with :meth:`open`,
    :meth:`rows`, :meth:`tag`, :meth:`finish` (they never block on the store), :meth:`drain` at the end (it waits
    while deliveries progress, and gives up after ``$SOPHON_TRACKING_WAIT_S`` seconds without one), then
    :meth:`close`. ``journal=None`` keeps operations in memory only."""

    def __init__(self, tracker: Tracker, journal: Path | None = None, role: str = "attack",
                 delays: tuple[float, float] = (BACKOFF_START_S, BACKOFF_CAP_S)) -> None:
        self.tracker, self.role, self.delays = tracker, role, delays
        self.journal = Journal(journal) if journal is not None else None
        self.stats = Stats()
        self.completed: set[str] = set()    # trials whose FINISHED status is enqueued (delivered or not)
        self.opened: set[str] = set()       # trials whose run has an open enqueued (so later operations can land)
        self._queue: deque[Op] = deque()
        self._queued: Counter[str] = Counter()
        self._trials: dict[str, _TrialState] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # Tune pickles its callbacks (and so this) into its experiment state; sophon-ray never restores Tune
    # experiments (MLflow and the journal are the ledger), so what is pickled is an empty, inert outbox.
    def __getstate__(self) -> dict[str, Any]:
        return {"tracker": None, "role": self.role, "delays": self.delays, "journal": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"], None, state["role"], state["delays"])  # type: ignore[misc]

    # ------------------------------------------------------------------------------ enqueue (caller's thread)
    def open(self, key: str, parent: str, sweep: str, name: str, params: Mapping[str, Any]) -> None:
        self._put([Op(key, "open", {"parent": parent, "sweep": sweep, "name": name,
                                    "params": {k: str(v) for k, v in params.items()}})])

    def rows(self, key: str, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        if rows:
            self._put([Op(key, "rows", {"rows": [[int(s), {k: float(v) for k, v in r.items()}] for s, r in rows]})])

    def tag(self, key: str, name: str, value: str) -> None:
        self._put([Op(key, "tag", {"tag": name, "value": str(value)})])

    def artifact(self, key: str, name: str, data: bytes) -> None:
        """A file of the trial's run (``name`` relative to its artifact root, e.g. ``samples/after.png``)."""
        self._put([Op(key, "artifact", {"name": name, "base64": base64.b64encode(data).decode("ascii")})])

    def finish(self, key: str, status: str) -> None:
        self._put([Op(key, "finish", {"status": status})])

    def load_journal(self) -> int:
        """Queue the journal's unacknowledged operations (an earlier run's), ahead of new ones; returns how many
        trials they belong to."""
        if self.journal is None:
            return 0
        ops = self.journal.pending()
        self._put(ops, write=False)
        return len({op.key for op in ops})

    def _put(self, ops: list[Op], write: bool = True) -> None:
        if not ops:
            return
        if write and self.journal is not None:
            self.journal.append(op.line() for op in ops)  # written ahead: a crash or an outage loses nothing
        with self._cond:
            for op in ops:
                self._queue.append(op)
                self._queued[op.key] += 1
                if op.kind == "open":
                    self.opened.add(op.key)
                if op.kind == "finish":
                    (self.completed.add if op.data["status"] == "FINISHED" else self.completed.discard)(op.key)
            self.stats.peak_queue = max(self.stats.peak_queue, len(self._queue))
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------ state
    def pending_keys(self) -> set[str]:
        """Trials with operations not delivered yet."""
        with self._cond:
            return {op.key for op in self._queue}

    def pending_ops(self) -> int:
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------------------ the delivery thread
    def start(self) -> Outbox:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="mlflow-outbox", daemon=True)
            self._thread.start()
        return self

    def drain(self, stall_s: float) -> bool:
        """Wait until every queued operation is delivered; give up (False) once ``stall_s`` seconds pass without
        one being delivered (a store that does not answer, not one that is merely busy with a long queue)."""
        with self._cond:
            seen, since = self.stats.delivered, time.monotonic()
            while self._queue:
                if self.stats.delivered != seen:
                    seen, since = self.stats.delivered, time.monotonic()
                left = since + stall_s - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def close(self, join_s: float = 15.0) -> None:
        """Stop the thread (after the write in flight, at most ``join_s`` seconds); undelivered operations stay
        in the journal."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(join_s)
            self._thread = None

    def _loop(self) -> None:
        delays = backoff(*self.delays)
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                key = self._queue[0].key  # the oldest trial's queued operations, all of them, in their order
                ops = [op for op in self._queue if op.key == key]
            started = time.perf_counter()
            try:
                self._deliver(ops)
            except OrphanOperation as err:  # can never succeed: retrying would block every trial behind it
                log.error("dropped %d MLflow operation(s): %s", len(ops), err)
            except Exception as err:  # noqa: BLE001 - any store error: keep the ops, back off, try again
                self.stats.busy_s += time.perf_counter() - started
                self._failed(key, err)
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, timeout=next(delays))
                continue
            self.stats.busy_s += time.perf_counter() - started
            delays = backoff(*self.delays)
            self._delivered(key, ops)

    def _failed(self, key: str, err: Exception) -> None:
        state = self._trials.setdefault(key, _TrialState())
        state.dirty = True  # the write may have reached the store before the error: read back before retrying
        self.stats.failures += 1
        self.stats.last_error = f"{type(err).__name__}: {str(err)[:200]}"
        if self.stats.failures == 1 or self.stats.failures % 20 == 0:
            log.warning("MLflow write for trial %s failed (%s); %d operation(s) queued, retrying with backoff "
                        "(failure %d)", key, self.stats.last_error, self.pending_ops(), self.stats.failures)

    def _delivered(self, key: str, ops: list[Op]) -> None:
        sent = {id(op) for op in ops}
        with self._cond:
            self._queue = deque(op for op in self._queue if id(op) not in sent)
            self._queued[key] -= len(ops)
            done = self._queued[key] == 0
            if done:
                del self._queued[key]
            self.stats.delivered += len(ops)
            self._cond.notify_all()
        if done and self.journal is not None:
            self.journal.append([json.dumps({"key": key, "op": "ack"}) + "\n"])

    # ------------------------------------------------------------------------- one trial's operations, idempotent
    def deliver_now(self, ops: list[Op]) -> None:
        """Deliver one trial's operations in this thread (tests and profiling; the thread uses the same code)."""
        self._deliver(ops)

    def _deliver(self, ops: list[Op]) -> None:
        """One trial's operations in order, each run of consecutive rows and tags (and the params of the open
        before them) as one ``log_batch``: per short trial, find + create + one batch + terminate."""
        state = self._trials.setdefault(ops[0].key, _TrialState())
        if state.dirty:  # what a failed write left in the store is read back, never guessed
            state.fresh, state.points, state.dirty, state.reread = False, {}, False, True
        group: list[Op] = []
        for op in ops:
            if op.kind in ("rows", "tag"):
                group.append(op)
                continue
            self._log(state, group)
            group = []
            if op.kind == "open":
                self._open(state, op)
            elif op.kind == "artifact":
                self._log(state, [])  # params not logged yet
                self.tracker.log_bytes(self._run_id(state, op), op.data["name"], base64.b64decode(op.data["base64"]))
            elif op.kind == "finish":
                self._log(state, [])  # params not logged yet
                self.tracker.finish(self._run_id(state, op), op.data["status"])
                self.stats.finished += 1
            else:
                raise ValueError(f"journal operation {op.kind!r} of trial {op.key} is unknown (open, rows, tag, "
                                 "artifact, finish)")
        self._log(state, group)

    def _open(self, state: _TrialState, op: Op) -> None:
        d = op.data
        run_id, created, missing = self.tracker.open_child(d["parent"], d["sweep"], self.role, op.key, d["name"],
                                                           d["params"], defer_params=True)
        if state.run_id != run_id:
            state.run_id, state.fresh, state.points = run_id, created and not state.reread, {}
        state.params = missing
        self.stats.runs_opened += 1

    @staticmethod
    def _run_id(state: _TrialState, op: Op) -> str:
        if state.run_id is None:
            raise OrphanOperation(f"trial {op.key}: operation {op.kind!r} comes before its run was opened (a journal "
                                  "edited by hand?); the trial is rerun by --resume if it did not finish")
        return state.run_id

    def _log(self, state: _TrialState, group: list[Op]) -> None:
        """The group's rows (each metric step not in the store yet), tags and the open's params in one batch."""
        if not group and not state.params:
            return
        run_id = self._run_id(state, group[0]) if group else state.run_id
        rows: list[tuple[int, dict[str, float]]] = []
        tags: dict[str, str] = {}
        for op in group:
            if op.kind == "tag":
                tags[op.data["tag"]] = op.data["value"]
                continue
            for step, row in op.data["rows"]:
                todo = {k: v for k, v in row.items() if int(step) not in self._points(state, k)}
                if todo:
                    rows.append((int(step), todo))
        self.tracker.log_rows(run_id, rows, params=state.params, tags=tags)
        state.params = {}
        for step, row in rows:
            for k in row:
                self._points(state, k).add(step)

    def _points(self, state: _TrialState, metric: str) -> set[int]:
        if metric not in state.points:
            state.points[metric] = set() if state.fresh else self.tracker.logged_steps(state.run_id, metric)
        return state.points[metric]
