"""A sweep's MLflow writes, delivered without ever blocking Ray Tune or the pipeline and never lost or duplicated.

Every run that carries a result is written through an outbox: the attack grid's and the searches' trials (the Tune
callback), the pretrain and protect runs, the defender's candidates, the search and defend runs' summaries, the
parent run's stage times, report files and its finish. The caller only *enqueues* operations (open a run by its key,
or attach to one that exists; log rows, set a tag, add a file, finish), each first appended to the write-ahead
:class:`~sophon_ray.run.journal.Journal`; "trial" below means any such keyed run. Delivery threads (:func:`writers_for`) send them: a
thread takes a round of up to ``ROUND`` of the oldest trials no other thread holds and delivers each trial's
operations in order, so a trial's writes are never reordered or split between threads. A short trial costs three
store calls (create its run, one ``log_batch`` of params, rows and tags, terminate): runs are not searched for one
by one; the sweep's runs are read by key once (:meth:`Tracker.keyed_runs`) and the outbox, the sweep's one writer,
keeps that map. A failed write stays queued and is retried with exponential backoff (``BACKOFF_START_S`` doubling
to ``BACKOFF_CAP_S``), so a server that dies and comes back loses nothing; once a trial's queued operations are
delivered an ``ack`` line follows in the journal (one append per round). What a store that never comes back did
not get stays unacknowledged there for ``sophon-ray sync SPEC`` or ``sophon-ray run SPEC --resume``.

Replay is idempotent: operations are keyed by trial key and metric step; after any failed write the trial's run
is looked up by its ``sophon.key`` tag (:meth:`Tracker.open_child`) and its logged points are read back before
the write is repeated, so a write that reached the store before its answer was lost is not made twice.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sophon_ray.run.delivery import BACKOFF_CAP_S, BACKOFF_START_S, backoff, fsync_seconds, writers_for
from sophon_ray.run.journal import JOURNAL, Journal, Op

if TYPE_CHECKING:
    from sophon_ray.run.tracking import ChildRun, Tracker

__all__ = ["JOURNAL", "Journal", "Op", "Outbox"]

log = logging.getLogger(__name__)

DEFAULT_ROLE = "attack"                   # a journaled open without a role (the grid's and the searches' trials)
ROUND = 16                                # trials one delivery thread takes at once (their acks: one append)


class OrphanOperation(ValueError):
    """An operation of a trial whose run was never opened: it can never be delivered."""


@dataclass
class Stats:
    """What the delivery threads did: operations delivered, failed attempts (each retried), thread-seconds busy
    (summed over the threads), delivery rounds."""

    delivered: int = 0
    failures: int = 0
    busy_s: float = 0.0
    last_error: str = ""
    peak_queue: int = 0
    runs_opened: int = 0
    finished: int = 0
    rounds: int = 0


@dataclass
class _TrialState:
    run_id: str | None = None
    sweep: str = ""                                      # the sweep of its open (whose known runs it is in)
    role: str = ""                                       # ... and its role
    fresh: bool = False                                  # created by this outbox: nothing logged before it
    points: dict[str, set[int]] = field(default_factory=dict)  # metric -> steps known to be in the store
    dirty: bool = False                                  # a write failed: re-read before writing again
    reread: bool = False                                 # the store was re-read since (so nothing is "fresh")
    params: dict[str, str] = field(default_factory=dict)  # the run's params not logged yet (go with the next batch)


class Outbox:
    """Queue + journal + delivery threads for one tracker. ``start()`` the threads, enqueue with :meth:`open`,
    :meth:`rows`, :meth:`tag`, :meth:`finish` (they never block on the store), :meth:`drain` at the end (it waits
    while deliveries progress, and gives up after ``$SOPHON_TRACKING_WAIT_S`` seconds without one), then
    :meth:`close`. ``journal=None`` keeps operations in memory only; a path gets a :class:`Journal` with
    :func:`fsync_seconds`' policy. ``writers`` delivery threads (default :func:`writers_for` the store) each take
    a round of up to ``ROUND`` trials that no other thread holds, so a trial's operations stay in order on one
    thread, and acknowledge the round's trials with one journal append."""

    def __init__(self, tracker: Tracker, journal: Path | Journal | None = None, role: str = DEFAULT_ROLE,
                 delays: tuple[float, float] = (BACKOFF_START_S, BACKOFF_CAP_S), writers: int | None = None) -> None:
        self.tracker, self.role, self.delays = tracker, role, delays
        self.journal = Journal(journal, fsync_seconds()) if isinstance(journal, Path) else journal
        self.writers = writers or (writers_for(tracker.uri) if tracker is not None else 1)
        self.stats = Stats()
        self.completed: set[str] = set()    # trials whose FINISHED status is enqueued (delivered or not)
        self.opened: set[str] = set()       # trials whose run has an open enqueued (so later operations can land)
        self._queue: dict[str, list[Op]] = {}  # per trial its operations in order; the oldest trial first
        self._ops = 0                        # operations queued
        self._busy: set[str] = set()         # trials a delivery thread holds now
        self._trials: dict[str, _TrialState] = {}
        self._known: dict[tuple[str, str], dict[str, ChildRun]] = {}  # per (sweep, role): its runs by key
        self._known_lock = threading.Lock()
        self._cond = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []

    # Tune pickles its callbacks (and so this) into its experiment state; sophon-ray never restores Tune
    # experiments (MLflow and the journal are the ledger), so what is pickled is an empty, inert outbox.
    def __getstate__(self) -> dict[str, Any]:
        return {"tracker": None, "role": self.role, "delays": self.delays, "journal": None, "writers": self.writers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"], None, state["role"], state["delays"], state.get("writers"))  # type: ignore[misc]

    # ------------------------------------------------------------------------------ enqueue (caller's thread)
    def open(self, key: str, parent: str, sweep: str, name: str, params: Mapping[str, Any],
             role: str | None = None) -> None:
        """Find (by ``key``) or create the run: a child of ``parent`` with this outbox's role, or ``role``."""
        self._put([Op(key, "open", {"parent": parent, "sweep": sweep, "name": name,
                                    "params": {k: str(v) for k, v in params.items()},
                                    **({"role": role or self.role} if (role or self.role) != DEFAULT_ROLE else {})})])

    def attach(self, key: str, run_id: str) -> None:
        """Later operations of ``key`` go to the existing run ``run_id`` (one created outside the outbox, e.g. the
        sweep's parent run, which every stage needs before it starts)."""
        self._put([Op(key, "open", {"run_id": run_id})])

    def rows(self, key: str, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        if rows:
            self._put([Op(key, "rows", {"rows": [[int(s), {k: float(v) for k, v in r.items()}] for s, r in rows]})])

    def tag(self, key: str, name: str, value: str) -> None:
        self._put([Op(key, "tag", {"tag": name, "value": str(value)})])

    def artifact(self, key: str, name: str, data: bytes) -> None:
        """A file of the trial's run (``name`` relative to its artifact root, e.g. ``samples/after.png``)."""
        self._put([Op(key, "artifact", {"name": name, "base64": base64.b64encode(data).decode("ascii")})])

    def file(self, key: str, path: Path, folder: str | None = None) -> None:
        """A file on disk as an artifact of the run (under ``folder``), read when it is delivered: for files that
        stay where they are (checkpoints, report figures); writing it again replaces it."""
        self._put([Op(key, "file", {"path": str(Path(path).resolve()), **({"folder": folder} if folder else {})})])

    def finish(self, key: str, status: str) -> None:
        """The run's end, stamped now: a replay of a finish that reached the store before its ack sets the same
        end time again (the run is unchanged, as for every other operation)."""
        self._put([Op(key, "finish", {"status": status, "end_time": int(time.time() * 1000)})])

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
        with self._cond:
            if write and self.journal is not None:  # written ahead (a crash or an outage loses nothing), and
                self.journal.append(op.line() for op in ops)  # under the lock: never after the trial's ack
            for op in ops:
                self._queue.setdefault(op.key, []).append(op)
                if op.kind == "open":
                    self.opened.add(op.key)
                if op.kind == "finish":
                    (self.completed.add if op.data["status"] == "FINISHED" else self.completed.discard)(op.key)
            self._ops += len(ops)
            self.stats.peak_queue = max(self.stats.peak_queue, self._ops)
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------ state
    def pending_keys(self) -> set[str]:
        """Trials with operations not delivered yet."""
        with self._cond:
            return set(self._queue)

    def queued(self) -> list[Op]:
        """The operations not delivered yet, each trial's in order (an outbox never started delivers nothing)."""
        with self._cond:
            return [op for ops in self._queue.values() for op in ops]

    def pending_ops(self) -> int:
        with self._cond:
            return self._ops

    # ------------------------------------------------------------------------------ the delivery threads
    def start(self) -> Outbox:
        if not self._threads:
            self._stop = False
            self._threads = [threading.Thread(target=self._loop, name=f"mlflow-outbox-{i}", daemon=True)
                             for i in range(self.writers)]
            for thread in self._threads:
                thread.start()
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
        """Stop the threads (after the rounds in flight, at most ``join_s`` seconds in all) and close the journal
        (fsyncing what is not on disk yet); undelivered operations stay in the journal."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = time.monotonic() + join_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        if self.journal is not None:
            with self._cond:
                self.journal.close()

    def _loop(self) -> None:
        delays = backoff(*self.delays)
        while True:
            with self._cond:
                while not self._stop and all(key in self._busy for key in self._queue):  # none free
                    self._cond.wait()
                if self._stop:
                    return
                work = self._take()
            started = time.perf_counter()
            done, error = self._round(work)
            with self._cond:
                self.stats.busy_s += time.perf_counter() - started
            self._release(work, done)
            if error is None:
                delays = backoff(*self.delays)
                continue
            self._failed(*error)
            with self._cond:
                self._cond.wait_for(lambda: self._stop, timeout=next(delays))

    def _take(self) -> list[tuple[str, list[Op]]]:
        """(Under the lock.) The oldest trials no other thread holds, each with its queued operations: up to
        ``ROUND``, and a fair share of them when the other threads are idle too."""
        want = max(1, min(ROUND, (len(self._queue) - len(self._busy)) // self.writers))
        work = []
        for key, ops in self._queue.items():
            if key not in self._busy:
                work.append((key, list(ops)))
                if len(work) == want:
                    break
        self._busy.update(key for key, _ in work)
        return work

    def _round(self, work: list[tuple[str, list[Op]]]) -> tuple[list[str], tuple[str, Exception] | None]:
        """Deliver the trials in order until one fails: (the trials delivered, (key, error) of the failure)."""
        done = []
        for key, ops in work:
            try:
                self._deliver(ops)
            except OrphanOperation as err:  # can never succeed: retrying would block every trial behind it
                log.error("dropped %d MLflow operation(s): %s", len(ops), err)
            except Exception as err:  # noqa: BLE001 - any store error: keep the ops, back off, try again
                return done, (key, err)
            self._delivered(key, ops)
            done.append(key)
        return done, None

    def _delivered(self, key: str, ops: list[Op]) -> None:
        """Drop a trial's delivered operations (those enqueued while it was delivered stay, in order)."""
        with self._cond:
            left = self._queue[key][len(ops):]
            if left:
                self._queue[key] = left
            else:
                del self._queue[key]
                if ops[-1].kind == "finish":  # a finished trial's state is not kept (a driver's memory is bounded)
                    self._trials.pop(key, None)
            self._ops -= len(ops)
            self.stats.delivered += len(ops)
            self._cond.notify_all()

    def _release(self, work: list[tuple[str, list[Op]]], done: list[str]) -> None:
        """Acknowledge the round's delivered trials that have nothing queued now (one journal append, under the
        lock that enqueueing holds, so no operation journaled since is acknowledged) and free the round's trials."""
        with self._cond:
            acks = [json.dumps({"key": key, "op": "ack"}) + "\n" for key in done if key not in self._queue]
            if acks and self.journal is not None:
                self.journal.append(acks)
            self.stats.rounds += 1
            self._busy.difference_update(key for key, _ in work)
            self._cond.notify_all()

    def _failed(self, key: str, err: Exception) -> None:
        state = self._trials.setdefault(key, _TrialState())
        state.dirty = True  # the write may have reached the store before the error: read back before retrying
        with self._cond:
            self.stats.failures += 1
            self.stats.last_error = f"{type(err).__name__}: {str(err)[:200]}"
            failures = self.stats.failures
        if failures == 1 or failures % 20 == 0:
            log.warning("MLflow write for trial %s failed (%s); %d operation(s) queued, retrying with backoff "
                        "(failure %d)", key, self.stats.last_error, self.pending_ops(), failures)

    # ------------------------------------------------------------------------- one trial's operations, idempotent
    def deliver_now(self, ops: list[Op]) -> None:
        """Deliver one trial's operations in this thread (tests and profiling; the threads use the same code)."""
        self._deliver(ops)

    def _deliver(self, ops: list[Op]) -> None:
        """One trial's operations in order, each run of consecutive rows and tags (and the params of the open
        before them, which wait for them when the open comes alone) as one ``log_batch``: per trial, create + one
        batch + terminate (the run is looked up by its key only after a failed write). A FINISHED run always has its
        params: they go with the finish at the latest, and a replay's open reads what the store lacks."""
        state = self._trials.setdefault(ops[0].key, _TrialState())
        doubt = state.dirty
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
                self._open(state, op, search=doubt)
            elif op.kind == "artifact":
                self._log(state, [])  # params not logged yet
                self.tracker.log_bytes(self._run_id(state, op), op.data["name"], base64.b64decode(op.data["base64"]))
            elif op.kind == "file":
                self._log(state, [])
                if Path(op.data["path"]).is_file():
                    self.tracker.log_artifact(self._run_id(state, op), op.data["path"], op.data.get("folder"))
                else:  # the run's other operations still go
                    log.error("run %s: file %s was not logged: it is gone (deleted since it was journaled); rerun "
                              "the stage that wrote it", op.key, op.data["path"])
            elif op.kind == "finish":
                self._log(state, [])  # params not logged yet
                self.tracker.finish(self._run_id(state, op), op.data["status"], op.data.get("end_time"))
                self._finished(state, op)
            else:
                raise ValueError(f"journal operation {op.kind!r} of trial {op.key} is unknown (open, rows, tag, "
                                 "artifact, file, finish)")
        if group:  # an open's params alone wait for the trial's next batch (or its finish): one call fewer
            self._log(state, group)

    def _known_runs(self, sweep: str, role: str) -> dict[str, ChildRun]:
        """The sweep's runs of ``role`` by key: read from the store once (:meth:`Tracker.keyed_runs`), then kept
        by this outbox, the sweep's one writer."""
        with self._known_lock:
            if (sweep, role) not in self._known:
                self._known[sweep, role] = self.tracker.keyed_runs(sweep, role)
            return self._known[sweep, role]

    def _open(self, state: _TrialState, op: Op, search: bool) -> None:
        """Find or create the trial's run: from the known runs, or by a search of its key tag when a write of it
        failed before (its run may exist although this outbox never saw the answer)."""
        d = op.data
        if "run_id" in d:  # attached to a run that exists: what it holds is read back, never assumed
            if state.run_id != d["run_id"]:
                state.run_id, state.fresh, state.points = d["run_id"], False, {}
            state.params = {}
            return
        role = d.get("role", DEFAULT_ROLE)
        run_id, created, missing = self.tracker.open_child(d["parent"], d["sweep"], role, op.key, d["name"],
                                                           d["params"], defer_params=True,
                                                           known=self._known_runs(d["sweep"], role), search=search)
        if state.run_id != run_id:
            state.run_id, state.fresh, state.points = run_id, created and not state.reread, {}
        state.params, state.sweep, state.role = missing, d["sweep"], role
        with self._cond:
            self.stats.runs_opened += 1

    def _finished(self, state: _TrialState, op: Op) -> None:
        known = self._known.get((state.sweep, state.role), {})
        if op.key in known:
            known[op.key] = replace(known[op.key], status=op.data["status"])
        with self._cond:
            self.stats.finished += 1

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
