"""One run's context: its options, what it has found so far (:class:`Outcome`), what the user sees (:class:`View`,
which also starts Ray) and :class:`RunContext`, the one object the pipeline's stages take."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sophon_ray.console.signals import claim
from sophon_ray.console.terminal import Console, LogCapture, link_ray_logs
from sophon_ray.spec import SweepSpec

if TYPE_CHECKING:
    from sophon_ray.run.outbox import Outbox
    from sophon_ray.run.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None
    resume: bool = False
    dry_run: bool = False
    max_trials: int | None = None
    attack: bool = True
    report: bool = True
    audit: Path | None = None          # attack a given protected checkpoint instead of protecting
    verbose: bool = False              # Ray's, Tune's and MLflow's own output on the console too


@dataclass
class Outcome:
    sweep_id: str
    trials: int
    trials_run: int = 0
    checkpoints: dict[str, str] = field(default_factory=dict)
    report: Any = None                 # analysis.report's ReportResult (overview, html, summary, heatmaps, ...)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""             # redacted: safe to print
    output_dir: str = ""
    log_dir: str = ""
    pending: int = 0                   # runs whose results are only in the journal (the store did not answer)
    journal: str = ""                  # that journal, when pending
    store_down: bool = False           # a stage could not read the store it needs (nothing may be pending)
    refused: str = ""                  # the last error of writes the store answered but kept failing (not an outage)
    stage: str = ""                    # the stage running (the last one begun): defend, pretrain+protect, attack, ...
    stopped_by: int = 0                # the signal (SIGINT, SIGTERM) that stopped the run; 0 when none did
    grid_total: int = 0                # attack grid trials planned ...
    grid_finished: int = 0             # ... and finished (set when the run is stopped)
    models_planned: int = 0            # the normal and protected models ...
    models_ready: int = 0              # ... and those stored (set when the run is stopped)

    @property
    def incomplete(self) -> bool:
        """The run ended early because the MLflow store did not answer (exit 3): results may wait in the journal."""
        return bool(self.pending or self.store_down)


@dataclass
class View:
    """What the user sees during one run: the console, and the log files once the output folder is known."""

    console: Console
    logs: LogCapture | None = None
    started_ray: bool = False
    dashboard_url: str | None = None

    def say(self, message: str) -> None:
        self.console.say(message)

    def start_ray(self, address: str | None) -> None:
        """``start_ray`` (quiet unless verbose) with Ray's loggers writing to the log file, then ``logs/ray``
        linked to Ray's session logs; says where Ray's dashboard is."""
        import ray  # noqa: PLC0415

        if ray.is_initialized():
            return
        if self.logs is not None:
            self.logs.reroute()  # Ray's loggers exist once it is imported; ray.init logs
        self.started_ray = True
        context = start_ray(address, quiet=not self.console.verbose)
        claim()  # ray.init installed its own SIGTERM handler: a run stops cleanly on SIGTERM, as on Ctrl-C
        if self.logs is not None:
            self.logs.reroute()
            link_ray_logs(self.logs.log_dir, ray_logs_dir(context))
        self.dashboard_url = dashboard_url(context)
        if self.dashboard_url:
            self.say(f"Ray dashboard: {self.dashboard_url}")


@dataclass
class RunContext:
    """What every stage of one run works with: the spec and its sweep id, the MLflow tracker and the sweep's
    parent run, the output folder, the options, the view, the outcome so far, and (in the attack stage) the
    MLflow outbox."""

    spec: SweepSpec
    sweep_id: str
    tracker: Tracker
    parent: str
    out: Path
    options: RunOptions
    view: View
    outcome: Outcome
    outbox: Outbox | None = None

    def say(self, message: str) -> None:
        self.view.say(message)

    @property
    def storage(self) -> str:
        """Where Ray Train and Tune keep their runs."""
        return self.spec.resources.storage_path or str(self.out / "ray")


def start_ray(address: str | None, quiet: bool = False) -> Any:
    """Join ``address`` / $RAY_ADDRESS, else start a private local instance on 127.0.0.1 (dashboard too); returns
    ``ray.init``'s context (None when Ray was already started).

    ``quiet``: workers' output is not forwarded to this process (it stays in Ray's session logs) and the driver's
    Ray logger logs at INFO (to wherever its handlers write; ``LogCapture`` points them at the log file)."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    common: dict[str, Any] = {"logging_level": logging.INFO if quiet else logging.WARNING,
                              "log_to_driver": not quiet}
    if address:
        return ray.init(address=address, **common)
    # the dashboard (on 127.0.0.1) also serves the state API that Ray Train's controller polls
    return ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **common)


def dashboard_url(context: Any) -> str | None:
    """The dashboard's address from ``ray.init``'s context (``http://host:port``); None without one."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def ray_logs_dir(context: Any = None) -> Path | None:
    """Ray's session log folder on this machine (worker, raylet, Train and Tune logs), from ``ray.init``'s context
    (its ``address_info["session_dir"]``); without one, from Ray's internal node object (no public accessor);
    None when unknown."""
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    if session:
        return Path(session) / "logs"
    try:
        import ray  # noqa: PLC0415

        node = ray._private.worker._global_node  # noqa: SLF001 - the fallback: Ray has no public accessor
        return Path(node.get_logs_dir_path()) if node is not None else None
    except (AttributeError, TypeError, ImportError):
        return None
