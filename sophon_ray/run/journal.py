"""The outbox's write-ahead journal: JSON lines, one per MLflow operation before it is sent, an ``ack`` line per
trial once its operations are delivered (:mod:`sophon_ray.run.outbox`).

Durability (``$SOPHON_JOURNAL_FSYNC``, :func:`sophon_ray.run.delivery.fsync_seconds`): every journal append reaches the OS
before the enqueue returns, so a killed driver loses nothing. Against a power cut or a kernel crash the journal is fsynced
in groups, within ``delivery.DEFAULT_FSYNC_S`` (0.2) seconds of an append (a flusher thread; ``every`` fsyncs each append
before it returns, ``off`` never). What a power cut can lose is therefore the operations enqueued in the last
``DEFAULT_FSYNC_S`` seconds that were not yet delivered: those trials are not FINISHED in MLflow, and
``--resume`` reruns them (their runs are found by key and reused); an ack lost the same way only makes a replay
deliver again what is already stored, which logs nothing twice. A SQLite store commits with ``synchronous=FULL``
(:func:`~sophon_ray.run.tracking.use_wal`), so a delivered write is on disk before its ack is written. Measured
(``bench/writer.py``, paired against no fsync, 2 busy cores): ``every`` cost 26% of the trials/s into SQLite and
14 ms per trial in the caller (5 appends), the 0.2 s groups 6% (within the noise) and 0.3 ms.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL = "tracking-journal.jsonl"    # in the sweep's output folder


@dataclass(frozen=True)
class Op:
    """One pending MLflow operation of one trial: ``kind`` open | rows | tag | artifact | finish, its data as JSON
    (an artifact's bytes base64-encoded)."""

    key: str
    kind: str
    data: Mapping[str, Any]

    def line(self) -> str:
        return json.dumps({"key": self.key, "op": self.kind, **self.data}, separators=(",", ":")) + "\n"


def ends_torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (a driver killed mid-append): appended to as it is, the
    next line would join that fragment and both be skipped as one line that is not JSON."""
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class Journal:
    """Append-only JSON lines: every operation before it is sent, ``{"op": "ack"}`` once a trial's queued
    operations were all delivered. Thread-safe appends; a torn last line (a killed driver) is ignored.

    Durability (``fsync_s``): every append is written to the OS before it returns (a killed driver loses
    nothing); ``fsync_s=0`` also fsyncs it before returning, ``fsync_s=T`` has a flusher thread fsync within ``T``
    seconds of an append (one fsync for everything appended meanwhile), ``None`` never fsyncs. The file's folder
    is fsynced once when the file is created, so the file itself survives a power cut."""

    def __init__(self, path: Path, fsync_s: float | None = None) -> None:
        self.path, self.fsync_s = path, fsync_s
        self.syncs = 0                      # fsyncs done (the flusher's and the appends' own)
        self._lock = threading.Condition()
        self._file: Any = None
        self._dirty = False                 # appended, not fsynced yet
        self._flusher: threading.Thread | None = None
        self._closed = False

    def append(self, lines: Iterable[str]) -> None:
        text = "".join(lines)
        with self._lock:
            if self._file is None:
                self._open()
            self._file.write(text)
            self._file.flush()
            if self.fsync_s is None:
                return
            if self.fsync_s == 0:
                self._sync()
                return
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="journal-fsync", daemon=True)
                self._flusher.start()
            if not self._dirty:  # the flusher waits for this; later appends join the same fsync
                self._dirty = True
                self._lock.notify_all()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        torn = not new and ends_torn(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._closed = False
        if torn:  # a killed driver's last line stays alone (skipped): the next append starts its own line
            self._file.write("\n")
        if new and self.fsync_s is not None:  # the new file's directory entry, else a power cut can lose the file
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._dirty = False
        self.syncs += 1

    def _flush_loop(self) -> None:
        """Group commit: wait for an append, let ``fsync_s`` seconds of appends gather, fsync them at once."""
        with self._lock:
            while not self._closed:
                if not self._dirty:
                    self._lock.wait()
                    continue
                deadline = time.monotonic() + float(self.fsync_s or 0)
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._lock.wait(left)
                if self._dirty and self._file is not None:
                    self._sync()

    def close(self) -> None:
        """Fsync what is not on disk yet (when fsyncing at all), close the file and stop the flusher."""
        with self._lock:
            if self._file is not None:
                if self._dirty:
                    self._sync()
                self._file.close()
                self._file = None
            self._closed = True
            self._lock.notify_all()
        if self._flusher is not None:
            self._flusher.join(5)
            self._flusher = None

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
