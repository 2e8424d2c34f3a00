"""SIGTERM and Ctrl-C in the driver: a clean stop, and a second one exits at once.

What a batch scheduler (SIGTERM) or a person (Ctrl-C, SIGINT) sends stops a sweep the same way: the first signal
raises :class:`Interrupted` in the main thread, wherever it is (a Tune or Train run, an MLflow call, a wait on
Ray); the stages' ``finally`` blocks end their work and deliver or journal what finished; the run says what
finished and the ``--resume`` command and exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM, what a shell
reports for a process that signal ended). A second signal while the run stops exits at once (``os._exit``, the
code of that signal): no more Python runs, so nothing is half-written by this process; the tracking journal is
append-only JSON lines, each append one ``write`` of whole lines, and a torn last line is skipped when read.

Ray replaces these handlers, so the run puts them back (:func:`claim`) after each library that sets its own:
``ray.init`` installs a SIGTERM handler that exits (on a node it started, after killing the node's processes under
the driver that still uses them: Ray's C++ stack dump and exit 134), Ray Train V2's ``fit`` a SIGINT handler that
aborts the run and exits the process with status 0 (``train_driver`` keeps it from being installed), Ray Tune's
``fit`` a SIGINT handler that ends the Tune run and returns as if it had finished (:data:`LIBRARY_HANDLERS_OFF`
turns it off). Imports neither Ray nor torch.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
# set while a run can be stopped: Ray Tune installs no SIGINT handler of its own (it would swallow Ctrl-C)
LIBRARY_HANDLERS_OFF = {"TUNE_DISABLE_SIGINT_HANDLER": "1"}
STOP_WAIT_S = 10.0  # how long a stopping run waits for an MLflow store that delivers nothing (the rest stays journaled)


def exit_code(signum: int) -> int:
    """The exit status of a run that ``signum`` stopped: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return NAMES.get(signum, signal.Signals(signum).name)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum`` (a KeyboardInterrupt, so that ``except Exception`` never swallows it).

    Raised by the handler in the main thread; the pipeline raises it again once the run has stopped cleanly, with
    ``outcome`` (:class:`~sophon_ray.run.context.Outcome`) saying what finished."""

    def __init__(self, signum: int, outcome: Any = None) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum
        self.outcome = outcome

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class Stopper:
    """The SIGINT and SIGTERM handler of one run: the first signal is recorded (:attr:`signum`) and raises
    :class:`Interrupted`; a later one exits the process at once. ``notice`` is told each (from the handler:
    it must not use Python's buffered streams, which the interrupted code may be writing)."""

    def __init__(self, notice: Callable[[str], None] | None = None) -> None:
        self.signum = 0
        self.notice = notice
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: object) -> None:  # noqa: ARG002 - a signal handler's signature
        if self.signum:
            self._tell(f"{signal_name(signum)} again: exiting now (status {exit_code(signum)}); what was not "
                       "delivered to MLflow stays in the tracking journal, and --resume continues the sweep")
            os._exit(exit_code(signum))
        self.signum = signum
        self._tell(f"{signal_name(signum)}: stopping the sweep cleanly (press Ctrl-C or send SIGTERM again to exit "
                   "at once)")
        raise Interrupted(signum)

    def _tell(self, text: str) -> None:
        if self.notice is not None:
            try:
                self.notice(text)
            except OSError:
                pass  # a closed console must not keep the run from stopping

    def claim(self) -> None:
        """Make :meth:`handle` the SIGINT and SIGTERM handler again (after a library replaced it); the handlers
        found the first time are kept for :meth:`release`. Only the main thread can set handlers: elsewhere,
        nothing."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != self.handle:
                previous = signal.signal(signum, self.handle)
                self._previous.setdefault(signum, previous)

    def release(self) -> None:
        """Put back the handlers :meth:`claim` found first."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


_active: list[Stopper] = []  # the runs in progress in this process, innermost last


@contextmanager
def stopping(notice: Callable[[str], None] | None = None) -> Iterator[Stopper]:
    """SIGINT and SIGTERM stop the block cleanly (:class:`Stopper`) until it ends; then the handlers are as
    before. SIGINT is handled even where this process inherited it ignored (a shell's background job)."""
    stopper = Stopper(notice)
    _active.append(stopper)
    stopper.claim()
    try:
        yield stopper
    finally:
        stopper.release()
        _active.remove(stopper)


def claim() -> None:
    """Put the running block's handlers back after a library replaced them (``ray.init`` does); nothing outside
    :func:`stopping`."""
    if _active:
        _active[-1].claim()


def received() -> int:
    """The signal that is stopping the running block, 0 when none (or outside :func:`stopping`)."""
    return _active[-1].signum if _active else 0


def fd_notice(stream: Any, newline_first: bool = False) -> Callable[[str], None] | None:
    """A :class:`Stopper` notice that writes a line straight to ``stream``'s file descriptor (a signal handler
    must not enter the Python stream the interrupted code may be inside); None when it has none.
    ``newline_first`` ends a live progress line first."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None

    def write(text: str) -> None:
        os.write(fd, (("\n" if newline_first else "") + text + "\n").encode("utf-8", "replace"))

    return write
