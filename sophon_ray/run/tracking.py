"""MLflow tracking behind a small interface; the single writer is the driver process.

Layout: experiment = spec name; one parent run per sweep (tags ``sophon.role=sweep``,
``sophon.sweep_id``; the resolved spec as an artifact); child runs (``mlflow.parentRunId``) for
``pretrain``, ``protect/<variant>`` and every attack trial, each found again by its deterministic key
(tag ``sophon.key``) so that a rerun, retry or resume reuses its run instead of duplicating it.

A SQLite store is put in write-ahead-log mode (``PRAGMA journal_mode=WAL``, kept in the database file; SQLite's
default ``synchronous=FULL`` stays, so a commit is on disk when it returns): one fsync per commit instead of the
rollback journal's several. The same 40 trials' store calls (search, create, batch, terminate) ran at 14.0
trials/s without it and 30.6 with it (one run each, back to back, 2 cores, 2026-12-06); ``bench/writer.py``
measures the whole writer. WAL needs the database on a local filesystem (not NFS); ``SOPHON_SQLITE_WAL=0``
leaves the file's journal mode alone.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sophon_ray.errors import SophonError
from sophon_ray.names import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND, KEY, MODE, PARENT, ROLE, SWEEP
from sophon_ray.run.rest import RestWriter

log = logging.getLogger(__name__)
MAX_BATCH = 900  # MLflow's log_batch accepts at most 1000 metrics per call
WAL_ENV = "SOPHON_SQLITE_WAL"


class TrackingError(SophonError, RuntimeError):
    """The tracking server/store cannot be reached or used; the message names the URI and the fix."""


def resolve_uri(spec_uri: str | None, workdir: str | Path = ".") -> str:
    """Spec value, else $MLFLOW_TRACKING_URI, else ``sqlite:///<workdir>/mlflow.db``."""
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), None for any other store."""
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def use_wal(db: Path) -> str:
    """Put the SQLite database ``db`` (created when missing) in WAL mode unless ``$SOPHON_SQLITE_WAL`` is 0;
    returns its journal mode. MLflow's store keeps ``synchronous=FULL`` (SQLite's default), so this changes how
    many fsyncs a commit costs, not what a commit guarantees."""
    connection = sqlite3.connect(db, timeout=20)
    try:
        if os.environ.get(WAL_ENV, "1").strip() in ("0", "false", "no", "off"):
            return connection.execute("PRAGMA journal_mode").fetchone()[0]
        return connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        connection.close()


def artifact_root(uri: str) -> Path | None:
    """Where sophon-ray keeps a SQLite store's artifacts, ``<folder of the .db>/mlartifacts`` (one subfolder per
    experiment); None for any other store, whose server decides."""
    db = sqlite_path(uri)
    return db.parent / "mlartifacts" if db else None


def redact(uri: str) -> str:
    """The URI without credentials (``user:token@`` and query strings), safe to print or log."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query:
        return uri  # nothing to hide (and sqlite:////abs/path must keep its slashes)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _credentials_to_env(uri: str) -> str:
    """Move ``user:token@`` out of the URI into MLflow's auth variables, so that no link MLflow prints or
    stores carries the secret; returns the URI without them."""
    parts = urlsplit(uri)
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = parts.username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = parts.password or ""
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, parts.query, ""))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when a tracking server does not answer."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    import base64  # noqa: PLC0415

    parts = urlsplit(uri)
    request = urllib.request.Request(redact(uri).rstrip("/") + "/health")
    if parts.username:  # credentials in the URI go in a header, never in what is printed
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (auth, proxies...): let MLflow report what it says
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(f"the MLflow server at {redact(uri)} does not answer ({err}). Fix: start it "
                            f"(mlflow server --host 127.0.0.1 ...), correct tracking.uri / MLFLOW_TRACKING_URI, "
                            "or unset both to use sqlite:///mlflow.db here") from err


def ensure_experiment_kind(client: Any, experiment_id: str) -> bool:
    """Tag the experiment ``mlflow.experimentKind = custom_model_development`` (MLflow's mark of a training
    experiment, see ``names.EXPERIMENT_KIND``) when it has no kind yet; a kind already set (by the user) is kept.
    ``client`` is an ``MlflowClient``. Returns True when the tag was set now."""
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND):
        return False
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT)
    return True


@dataclass(frozen=True)
class ChildRun:
    """What the writer needs to know of a child run to reuse it without a search: its id, status, param names."""

    run_id: str
    status: str
    params: frozenset[str]

    @staticmethod
    def of(run: Any) -> ChildRun:
        """From an MLflow ``Run``."""
        return ChildRun(run.info.run_id, run.info.status, shared_names(frozenset(run.data.params)))


_NAME_SETS: dict[frozenset[str], frozenset[str]] = {}


def shared_names(names: frozenset[str]) -> frozenset[str]:
    """One object for each distinct set of param names (a sweep has a few; its writer keeps one per run known)."""
    return _NAME_SETS.setdefault(names, names)


class Tracker:
    """One experiment in one MLflow store, with idempotent parent/child runs; the experiment is tagged
    ``mlflow.experimentKind = custom_model_development`` (created so, or tagged when it lacks a kind)."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow import MlflowClient  # noqa: PLC0415

        if uri.startswith(("http://", "https://")):
            check_server(uri)
            uri = _credentials_to_env(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.rest = RestWriter.for_uri(uri)  # the outbox's hot calls into a server; None: all through the client
        try:
            if (db := sqlite_path(uri)) is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
                use_wal(db)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=self._artifact_location(uri, experiment),
                    tags={EXPERIMENT_KIND: CUSTOM_MODEL_DEVELOPMENT})
            else:
                self.experiment_id = found.experiment_id
                ensure_experiment_kind(self.client, self.experiment_id)  # stores made before the tag existed
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unreachable store
            raise TrackingError(f"cannot use the MLflow store at {redact(uri)} ({type(err).__name__}: "
                                f"{str(err)[:200]}). Fix: start the server, correct tracking.uri / "
                                "MLFLOW_TRACKING_URI, or unset both to use sqlite:///mlflow.db here") from err

    @staticmethod
    def _artifact_location(uri: str, experiment: str) -> str | None:
        root = artifact_root(uri)
        return (root / experiment).as_uri() if root else None  # None: a server decides

    def _find(self, filter_string: str) -> Any | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=2,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def _sweep(self, sweep_id: str) -> Any | None:
        return self._find(f"tags.`{ROLE}` = 'sweep' and tags.`{SWEEP}` = '{sweep_id}'")

    def sweep_status(self, sweep_id: str) -> str | None:
        """Status of this sweep's parent run (FINISHED, RUNNING, FAILED...), None when it never ran."""
        run = self._sweep(sweep_id)
        return run.info.status if run else None

    def sweep_run(self, sweep_id: str, name: str, spec_file: Path | None = None, mode: str = "classification") -> str:
        """The parent run of this sweep, created once, tagged with its ``mode`` (what its metrics are: accuracy or
        denoising skill); the resolved spec is logged as ``spec.yaml``."""
        run = self._sweep(sweep_id)
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={ROLE: "sweep", SWEEP: sweep_id, MODE: mode})
            if spec_file is not None:
                self.client.log_artifact(run.info.run_id, str(spec_file))
        elif run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def child_run(self, parent_id: str, sweep_id: str, role: str, key: str, name: str,
                  params: Mapping[str, Any] | None = None) -> str:
        """Find or create the child run with this key; log the params it does not have yet."""
        return self.open_child(parent_id, sweep_id, role, key, name, params)[0]

    def open_child(self, parent_id: str, sweep_id: str, role: str, key: str, name: str,
                   params: Mapping[str, Any] | None = None, defer_params: bool = False,
                   known: dict[str, ChildRun] | None = None, search: bool = True) -> tuple[str, bool, dict[str, str]]:
        """:meth:`child_run`, whether the run was created now (so nothing was logged to it before), and, with
        ``defer_params``, the params it lacks (for the caller's next :meth:`log_rows`) instead of logging them.

        ``known`` (this sweep's runs of ``role`` by key, from :meth:`keyed_runs`) with ``search=False``: a key in it
        is reused and a key missing from it is created, without searching the store (the caller keeps ``known``
        complete: one writer per sweep). Either way the opened run is recorded in ``known``, its params counted as
        logged (a caller whose deferred params then fail to log must search again)."""
        if known is None or search:
            found = self._find(f"tags.`{KEY}` = '{key}' and tags.`{SWEEP}` = '{sweep_id}'")
            run = ChildRun.of(found) if found is not None else None
        else:
            run = known.get(key)
        created = run is None
        if run is None:
            run = ChildRun(self._create_run(name, {ROLE: role, SWEEP: sweep_id, KEY: key, PARENT: parent_id}),
                           "RUNNING", frozenset())
        elif run.status != "RUNNING":
            self.client.update_run(run.run_id, status="RUNNING")
        missing = {k: str(v) for k, v in (params or {}).items() if k not in run.params}
        if missing and not defer_params:
            self.log_rows(run.run_id, [], params=missing)
        if known is not None:
            known[key] = ChildRun(run.run_id, "RUNNING", shared_names(run.params | set(missing)))
        return run.run_id, created, missing if defer_params else {}

    def _create_run(self, name: str, tags: Mapping[str, str]) -> str:
        if self.rest is not None:
            return self.rest.create_run(self.experiment_id, name, tags, int(time.time() * 1000))
        return self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags)).info.run_id

    def keyed_runs(self, sweep_id: str, role: str) -> dict[str, ChildRun]:
        """This sweep's child runs of ``role`` by key (any status): one paged search (pages of 1000 runs), so
        that a writer opening many trials' runs needs no search per trial; a key found twice keeps its oldest run
        (what :meth:`open_child`'s search finds)."""
        found: dict[str, ChildRun] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], max_results=1000, page_token=token,
                filter_string=f"tags.`{SWEEP}` = '{sweep_id}' and tags.`{ROLE}` = '{role}'",
                order_by=["attributes.start_time ASC"])
            for run in page:
                if KEY in run.data.tags:
                    found.setdefault(run.data.tags[KEY], ChildRun.of(run))
            token = page.token
            if not token:
                return found

    def finished_keys(self, sweep_id: str, role: str) -> set[str]:
        """Keys of this sweep's child runs of ``role`` that finished."""
        keys, token = set(), None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], max_results=1000, page_token=token,
                filter_string=f"tags.`{SWEEP}` = '{sweep_id}' and tags.`{ROLE}` = '{role}' and "
                              "attributes.status = 'FINISHED'")
            keys |= {r.data.tags[KEY] for r in page if KEY in r.data.tags}
            token = page.token
            if not token:
                return keys

    def child_runs(self, parent_id: str) -> list[Any]:
        """Every run whose parent is ``parent_id`` (any status), oldest first."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token,
                                           filter_string=f"tags.`{PARENT}` = '{parent_id}'",
                                           order_by=["attributes.start_time ASC"])
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_rows(run_id, [(step, metrics)])

    def log_rows(self, run_id: str, rows: Iterable[tuple[int, Mapping[str, float]]],
                 params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Log many (step, {name: value}) rows in batches, with ``params`` and ``tags`` in the first batch;
        non-finite values are skipped."""
        now = int(time.time() * 1000)
        metrics = [(k, float(v), now, int(step)) for step, row in rows for k, v in row.items()
                   if isinstance(v, (int, float)) and v == v and abs(v) != float("inf")]
        params, tags = {k: str(v) for k, v in (params or {}).items()}, {k: str(v) for k, v in (tags or {}).items()}
        for i in range(0, max(len(metrics), 1), MAX_BATCH):
            batch = metrics[i:i + MAX_BATCH]
            if batch or params or tags:
                self._log_batch(run_id, batch, params, tags)
            params, tags = {}, {}

    def _log_batch(self, run_id: str, metrics: list[tuple[str, float, int, int]], params: Mapping[str, str],
                   tags: Mapping[str, str]) -> None:
        if self.rest is not None:
            self.rest.log_batch(run_id, metrics, params, tags)
            return
        from mlflow.entities import Metric, Param, RunTag  # noqa: PLC0415

        self.client.log_batch(run_id, metrics=[Metric(*m) for m in metrics],
                              params=[Param(k, v) for k, v in params.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])

    def logged_steps(self, run_id: str, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, metric)}

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_bytes(self, run_id: str, name: str, data: bytes) -> None:
        """Write ``data`` as the run's artifact ``name`` (e.g. ``samples/after.png``); writing it again replaces it."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(name).name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), str(Path(name).parent) if Path(name).parent.name else None)

    def answers(self, wait_s: float, delays: Iterable[float]) -> bool:
        """Whether the store answers a read within ``wait_s`` seconds (asked again after each of ``delays``)."""
        deadline = time.monotonic() + wait_s
        for delay in delays:
            try:
                self.client.get_experiment(self.experiment_id)
                return True
            except Exception as err:  # noqa: BLE001 - any store error: ask again until the deadline
                if time.monotonic() + delay > deadline:
                    log.warning("the MLflow store did not answer for %.0f s (%s: %.200s)", wait_s,
                                type(err).__name__, err)
                    return False
                time.sleep(delay)
        return False

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def finish(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None) -> None:
        """End the run with ``status`` at ``end_ms`` (milliseconds since the epoch; None: now)."""
        end_ms = int(time.time() * 1000) if end_ms is None else int(end_ms)
        if self.rest is not None:
            self.rest.end_run(run_id, status, end_ms)
        else:
            self.client.set_terminated(run_id, status=status, end_time=end_ms)
