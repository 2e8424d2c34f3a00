"""``sophon-ray sync``: deliver the results a sweep's MLflow journal holds (the store did not answer in the run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sophon_ray.console.terminal import environment
from sophon_ray.spec import SweepSpec


@dataclass(frozen=True)
class SyncResult:
    journal: Path
    trials: int       # trials with undelivered results in the journal before
    pending: int      # ... and after
    delivered_ops: int


def check_tracking(spec: SweepSpec) -> None:
    """Refuse a tracking server that does not answer before anything is written (TrackingError names the fix)."""
    from sophon_ray.run.tracking import check_server, resolve_uri  # noqa: PLC0415

    uri = resolve_uri(spec.tracking.uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)


def sync(spec: SweepSpec) -> SyncResult:
    """Deliver the journal's undelivered MLflow results of the spec's sweep (``sophon-ray sync``): idempotent,
    so a second sync delivers nothing twice. Raises TrackingError when the store does not answer."""
    from sophon_ray.run.outbox import JOURNAL, Journal, Outbox  # noqa: PLC0415
    from sophon_ray.run.delivery import http_env, wait_seconds  # noqa: PLC0415
    from sophon_ray.run.tracking import Tracker, resolve_uri  # noqa: PLC0415

    journal = spec.out.resolve() / JOURNAL
    if not Journal(journal).pending():
        return SyncResult(journal, 0, 0, 0)  # nothing to do: the store is not even opened
    check_tracking(spec)
    with environment(http_env()):
        outbox = Outbox(Tracker(resolve_uri(spec.tracking.uri), spec.name), journal)
        trials = outbox.load_journal()
        outbox.start()
        outbox.drain(wait_seconds())
        outbox.close()
    return SyncResult(journal, trials, len(outbox.pending_keys()), outbox.stats.delivered)
