"""How the MLflow outbox delivers (:mod:`sophon_ray.run.outbox`): its environment settings (each read when used, a bad
value refused with the variable named, what it expects and an example), the HTTP client's retries while it
delivers, and the backoff between retries."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

WAIT_ENV = "SOPHON_TRACKING_WAIT_S"       # how long the end of a stage waits for a store that delivers nothing
DEFAULT_WAIT_S = 120.0
BACKOFF_START_S, BACKOFF_CAP_S = 0.5, 15.0
# MLflow's own HTTP client retries a refused connection for minutes (7 retries, backoff factor 2) inside one call;
# while the outbox delivers, a failed call should come back fast so that the outbox's backoff decides.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
WRITERS_ENV = "SOPHON_TRACKING_WRITERS"   # delivery threads (writers_for)
# bench/writer.py (medians of 3 rounds, 2 quiet cores, 2026-12-06): SQLite 61 trials/s with 1 thread, 60 with 2 (SQLite
# has one writer: the second thread only waits); mlflow server 33 (uvicorn) / 44 (gunicorn) with 1, 56 / 75 with 8
# (16 threads, one-off runs: 52 / 73)
SQLITE_WRITERS, SERVER_WRITERS = 1, 8
FSYNC_ENV = "SOPHON_JOURNAL_FSYNC"        # the journal's fsync policy (fsync_seconds)
DEFAULT_FSYNC_S = 0.2                     # bench/writer.py: fsync per append cost 26% into SQLite, 0.2 s groups ~6%


def _setting(name: str, default: Any, parse: Callable[[str], Any], expected: str, example: str) -> Any:
    """``$name`` parsed (``parse`` raises ValueError for a bad value), else ``default``; raises TrackingError naming
    the variable, what it expects and an example when the value is bad."""
    from sophon_ray.run.tracking import TrackingError  # noqa: PLC0415

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return parse(text.lower())
    except ValueError:
        raise TrackingError(f"{name}={text!r} is not {expected}; unset it (default {default}) or set e.g. "
                            f"{name}={example}") from None


def _at_least(low: float, value: float) -> float:
    if not value >= low:
        raise ValueError(value)
    return value


def wait_seconds() -> float:
    """$SOPHON_TRACKING_WAIT_S, else ``DEFAULT_WAIT_S``."""
    return _setting(WAIT_ENV, DEFAULT_WAIT_S, lambda t: _at_least(0, float(t)), "a number of seconds >= 0", "300")


def writers_for(uri: str) -> int:
    """Delivery threads for a store: ``$SOPHON_TRACKING_WRITERS``, else ``SQLITE_WRITERS`` for a SQLite store
    (SQLite has one writer at a time) and ``SERVER_WRITERS`` for a tracking server (its workers write in parallel)."""
    default = SQLITE_WRITERS if uri.startswith("sqlite:") else SERVER_WRITERS
    return _setting(WRITERS_ENV, default, lambda t: int(_at_least(1, int(t))), "a whole number >= 1", "2")


def fsync_seconds() -> float | None:
    """$SOPHON_JOURNAL_FSYNC (the :class:`Journal`'s ``fsync_s``): ``every`` (0: fsync each append), a number of
    seconds (group commit within that bound) or ``off`` (None: flushed to the OS only); else ``DEFAULT_FSYNC_S``."""
    words = {"every": 0.0, "off": None}
    return _setting(FSYNC_ENV, DEFAULT_FSYNC_S, lambda t: words[t] if t in words else _at_least(0, float(t)),
                    "'every', 'off' or a number of seconds >= 0", "every")


def http_env() -> dict[str, str]:
    """``HTTP_ENV`` without the variables the user set (theirs win)."""
    return {k: v for k, v in HTTP_ENV.items() if k not in os.environ}


def backoff(start: float = BACKOFF_START_S, cap: float = BACKOFF_CAP_S) -> Iterator[float]:
    """Delays between retries: ``start``, doubling, at most ``cap``."""
    delay = start
    while True:
        yield delay
        delay = min(cap, delay * 2)
