"""What a user sees while a sweep runs: stage lines, one live progress display per stage, and the logs of Ray,
Tune, MLflow and the driver in ``<output_dir>/logs/`` instead of the console.

On a terminal the progress display is one line rewritten in place with a carriage return (no escape codes);
when stdout is not a terminal (CI logs, pipes, files) or with ``--verbose`` it is plain lines: one when a job
finishes, and for the running jobs whose state changed one at the stage's start and then at a pace that slows
as the stage goes on (every ``MIN_GAP_S`` seconds at first, at most every ``MAX_GAP_S``), never a carriage
return or an escape code. Imports neither Ray nor torch.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple, Protocol

LOG_FILE = "sophon-ray.log"
TICK_S = 1.0            # how often a live display is refreshed (terminal) or considered for a line (plain)
MIN_GAP_S = 15.0        # plain output: the least time between two periodic progress lines of a stage ...
MAX_GAP_S = 120.0       # ... and the most, reached as the stage goes on (the gap is a fifth of its age)
OWN_LOGGERS = ("sophon_ray", "analysis", "__main__")
# set while a run is quiet: MLflow prints two "View run ... at" lines per finished run against a tracking server
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h07m``; ``?`` for None, negative or non-finite values."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the average pace so far: ``elapsed * (total - done) / done``; 0 when done >= total,
    None when nothing is done yet (no pace to extrapolate)."""
    if done >= total:
        return 0.0
    if done <= 0 or elapsed < 0:
        return None
    return elapsed * (total - done) / done


def plain(text: str) -> str:
    """``text`` with every control character (carriage return, escape, newline, ...) replaced by a space."""
    return _CONTROL.sub(" ", text)


def plain_gap(age: float) -> float:
    """Seconds between two periodic plain progress lines of a stage that has run ``age`` seconds."""
    return min(MAX_GAP_S, max(MIN_GAP_S, age / 5))


class Line(NamedTuple):
    """One job's state as a display line; ``final`` once the job is over (its line will not change again)."""

    text: str
    final: bool = False


class Source(Protocol):
    """What a progress display shows: a line per job, under stable keys (e.g. the job's label)."""

    def status(self) -> Mapping[str, Line]:
        """Job key -> its current line."""


class Console:
    """Writes stage lines and progress displays to one stream (default: stdout), from any thread.

    ``live`` (default: the stream is a terminal and not ``verbose``) selects the single line rewritten with
    ``\\r``; otherwise every display line is a plain line.
    """

    def __init__(self, stream: IO[str] | None = None, verbose: bool = False, live: bool | None = None,
                 width: int | None = None) -> None:
        self.stream = stream or sys.stdout
        self.verbose = verbose
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty()) and not verbose
        self.live = live
        self.width = width
        self._lock = threading.RLock()
        self._shown = ""          # the live line's text (terminal mode), "" when none
        self._drawn = 0           # how many columns the live line covers on screen

    def say(self, text: str) -> None:
        """Print ``text`` as permanent line(s), above the live line when there is one."""
        with self._lock:
            shown = self._shown
            self._clear()
            self.stream.write(text + "\n")
            if shown:
                self._draw(shown)
            self.stream.flush()

    def _columns(self) -> int:
        return self.width or shutil.get_terminal_size(fallback=(100, 24)).columns

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._shown, self._drawn = "", 0

    def _draw(self, text: str) -> None:
        text = plain(text)[: max(10, self._columns() - 1)]
        pad = max(0, self._drawn - len(text))  # blank out the rest of a longer previous line
        self.stream.write("\r" + text + " " * pad)
        self._shown, self._drawn = text, len(text) + pad

    def show(self, text: str) -> None:
        """Terminal mode: replace the live line with ``text``; plain mode: print it as a line."""
        with self._lock:
            if self.live:
                self._draw(text)
            else:
                self.stream.write(plain(text) + "\n")
            self.stream.flush()

    def clear_live(self) -> None:
        """Take the live line off the screen."""
        with self._lock:
            self._clear()
            self.stream.flush()

    def settle(self) -> None:
        """End the live line (it stays on screen as a permanent line)."""
        with self._lock:
            if self._shown:
                self.stream.write("\n")
                self._shown, self._drawn = "", 0
                self.stream.flush()

    @contextmanager
    def progress(self, source: Source, prefix: str = "", tick_s: float = TICK_S) -> Iterator[None]:
        """Show ``source``'s status until the block ends, refreshed every ``tick_s`` seconds by a daemon thread;
        at the end (also on an error) its final state stays on screen."""
        display = _Display(self, source, prefix)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(tick_s):
                display.tick()

        display.tick()
        thread = threading.Thread(target=loop, name="sophon-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10 * tick_s)
            display.tick(final=True)
            self.settle()


@dataclass
class _Display:
    """One stage's display: what was last printed per job and when (plain mode).

    A finished job's line is printed once as a permanent line, at once, in both modes. The running jobs share
    the live line (terminal) or get a plain line each when their text changed and a line is due: at the first
    tick, then every ``plain_gap`` seconds, and at the end."""

    console: Console
    source: Source
    prefix: str
    started: float = field(default_factory=time.monotonic)
    last_line: float = -1.0
    printed: dict[str, str] = field(default_factory=dict)
    failed: bool = False

    def _status(self) -> dict[str, Line]:
        try:
            return {key: Line(plain(line.text), line.final) for key, line in self.source.status().items()}
        except Exception as err:  # noqa: BLE001 - a display must never stop the sweep
            if not self.failed:  # once: a broken source would otherwise log every tick
                logging.getLogger(__name__).warning("progress display: %s: %s", type(err).__name__, err)
            self.failed = True
            return {}

    def tick(self, final: bool = False) -> None:
        """Print finished jobs' lines; then refresh the live line (terminal) or print the running jobs' changed
        lines when due or ``final`` (plain)."""
        status = self._status()
        head = f"{self.prefix} " if self.prefix else ""
        for key, line in status.items():
            if line.final and self.printed.get(key) != line.text:
                self.console.say(head + line.text)
                self.printed[key] = line.text
        running = {key: line.text for key, line in status.items() if not line.final}
        if self.console.live:
            if running:
                self.console.show(head + " || ".join(running.values()))
            else:
                self.console.clear_live()
            return
        now = time.monotonic()
        due = final or self.last_line < 0 or now - self.last_line >= plain_gap(now - self.started)
        changed = {key: text for key, text in running.items() if self.printed.get(key) != text}
        if due and changed:
            for text in changed.values():
                self.console.show(head + text)
            self.printed.update(changed)
            self.last_line = now


# ------------------------------------------------------------------------------------------------ log files


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to a console stream: a stream handler with a stream, not a file handler (Ray's,
    MLflow's and torch's stderr handlers; not torch's lazy trace handler, whose stream is None until used)."""
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) is not None)


class _OwnWarnings(logging.Filter):
    """Lets through only warnings and errors of this project's own loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = any(record.name == n or record.name.startswith(n + ".") for n in OWN_LOGGERS)
        return own and record.levelno >= logging.WARNING


class _LogFile(logging.FileHandler):
    """The log file: one format whatever ``setFormatter`` is given (``ray.init`` sets its own on every handler of
    the ``ray`` logger), without ANSI colour codes (Ray colours some of its messages)."""

    FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", self.FORMAT.format(record))


class StreamToLog(io.TextIOBase):
    """A stand-in for ``sys.stdout`` / ``sys.stderr``: every whole line written to it becomes an INFO record of
    ``logger``, without ANSI colour codes. ``fileno`` is the real stream's (what C code writes below Python is not
    caught); a handler that writes back into this stream while it logs writes to the real stream instead."""

    def __init__(self, logger: logging.Logger, real: IO[str]) -> None:
        super().__init__()
        self.logger, self.real = logger, real
        self._pending = ""
        self._lock = threading.Lock()
        self._inside = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    def write(self, text: str) -> int:
        if getattr(self._inside, "active", False):
            return self.real.write(text)
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
        self._log(lines)
        return len(text)

    def flush(self) -> None:
        """Log a pending partial line."""
        with self._lock:
            lines, self._pending = [self._pending], ""
        self._log(lines)

    def _log(self, lines: list[str]) -> None:
        self._inside.active = True
        try:
            for line in lines:
                line = _ANSI.sub("", line).rstrip()
                if line.strip():
                    self.logger.info(line)
        finally:
            self._inside.active = False


class LogCapture:
    """Every log record of the process goes to ``<log_dir>/sophon-ray.log``; when not ``verbose`` the console
    keeps only this project's own warnings and errors (Ray's, Tune's, MLflow's and Python warnings go to the file
    only), and whatever is printed to ``sys.stdout`` / ``sys.stderr`` (Tune's tables, the raylet's messages)
    goes to the file too, as records of the ``stdout`` / ``stderr`` loggers: create the :class:`Console` before
    the capture, so that it keeps the real stdout. :meth:`reroute` takes over handlers that libraries add later
    (call it after importing them); :meth:`close` restores everything as it was."""

    def __init__(self, log_dir: Path, verbose: bool) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.path = log_dir / LOG_FILE
        self.verbose = verbose
        self.file = _LogFile(self.path, encoding="utf-8")
        self.file.setLevel(logging.DEBUG if verbose else logging.INFO)
        self._undo: list[Callable[[], None]] = []
        self._stand_ins: list[StreamToLog] = []
        self._filter = _OwnWarnings()
        root = logging.getLogger()
        level = root.level
        root.setLevel(min(level or logging.WARNING, self.file.level))
        root.addHandler(self.file)
        self._undo.append(lambda: (root.removeHandler(self.file), root.setLevel(level)))
        logging.captureWarnings(True)
        self._undo.append(lambda: logging.captureWarnings(False))
        if not verbose:
            self._redirect("stdout")
            self._redirect("stderr")
        self.reroute()

    def _redirect(self, name: str) -> None:
        real = getattr(sys, name)
        stand_in = StreamToLog(logging.getLogger(name), real)
        setattr(sys, name, stand_in)
        self._stand_ins.append(stand_in)
        self._undo.append(lambda: setattr(sys, name, real))

    def reroute(self) -> None:
        """Give every logger that does not propagate (Ray's, MLflow's) the log file too; when not verbose,
        take their console handlers away and filter the root logger's console handlers to our own warnings."""
        root = logging.getLogger()
        loggers = [logging.getLogger(name) for name, obj in list(logging.root.manager.loggerDict.items())
                   if isinstance(obj, logging.Logger)]
        if not self.verbose:
            for handler in root.handlers:
                if _is_console(handler) and self._filter not in handler.filters:
                    handler.addFilter(self._filter)
                    self._undo.append(lambda h=handler: h.removeFilter(self._filter))
        for logger in loggers:
            if not self.verbose:
                for handler in [h for h in logger.handlers if _is_console(h)]:
                    logger.removeHandler(handler)
                    self._undo.append(lambda lg=logger, h=handler: lg.addHandler(h))
            if not logger.propagate and self.file not in logger.handlers:
                logger.addHandler(self.file)
                self._undo.append(lambda lg=logger: lg.removeHandler(self.file))

    def close(self) -> None:
        """Log what is left of a printed partial line, undo everything, newest first, and close the file."""
        for stand_in in self._stand_ins:
            stand_in.flush()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.file.close()


def link_ray_logs(log_dir: Path, ray_logs: Path | None) -> Path | None:
    """Point ``<log_dir>/ray`` at Ray's session log folder (worker, raylet, Train and Tune logs); returns the
    link, or None when there is no folder to link or the file system refuses links."""
    if ray_logs is None or not ray_logs.is_dir():
        return None
    link = log_dir / "ray"
    try:
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            return None  # a real folder someone put there: leave it alone
        link.symlink_to(ray_logs, target_is_directory=True)
    except OSError:
        return None
    return link


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set these environment variables for the block, then restore each one as it was (or unset it)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
