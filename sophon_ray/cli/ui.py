"""``sophon-ray ui``: the MLflow UI on a sweep's tracking store, started, checked and stopped for the user.

A SQLite store (the default, ``sqlite:///mlflow.db``) gets ``mlflow server --backend-store-uri <store>
--artifacts-destination <folder of the .db>/mlartifacts`` (the artifact root the Tracker uses), bound to
127.0.0.1 by default; the command waits until ``/health`` answers, prints the URL and a direct link to the
experiment's runs (MLflow's "Model training" view), and stops the server (its whole process group) on Ctrl-C or SIGTERM. A store that is already an
MLflow server (``http(s)://``) is not served again: the link into it is printed. Imports nothing heavy at
module level (MLflow only inside the functions that need it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sophon_ray.errors import SophonError
from sophon_ray.names import ROLE
from sophon_ray.run.tracking import (check_server, _credentials_to_env, artifact_root, ensure_experiment_kind, redact,
                                 sqlite_path)

HEALTH_TIMEOUT_S = 300.0   # mlflow server took 90 s to answer on 2 cores busy with a sweep (load 12)
STOP_TIMEOUT_S = 15.0


class UiError(SophonError, RuntimeError):
    """The UI cannot be started: no store, no experiment, a busy port, or a server that died; names the fix."""


@dataclass(frozen=True)
class ExperimentLink:
    """One experiment of the store and where the UI shows it."""

    name: str
    experiment_id: str

    def url(self, base: str) -> str:
        """The experiment's runs under the UI at ``base`` (``http://host:port``).

        ``workflowType=machine_learning`` selects MLflow's "Model training" view: MLflow 3.17's UI takes the view
        from that switch (URL, else the browser's last choice, else GenAI), not from the experiment's
        ``mlflow.experimentKind`` tag, so a plain experiment link opens on an empty "Traces" overview."""
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"


def check_store(uri: str) -> None:
    """Refuse a SQLite store whose file does not exist (MLflow would silently create an empty one).

    Raises UiError naming the path and the fix."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UiError(f"no MLflow store at {db} (tracking URI {uri}). Fix: run a sweep first (`sophon-ray run "
                      "SPEC`), pass the SPEC whose sweep you want to see, or point tracking.uri / "
                      "MLFLOW_TRACKING_URI at the store the sweep logged to")


def find_experiments(uri: str, experiment: str | None) -> list[ExperimentLink]:
    """The experiment named ``experiment`` (tagged as a training experiment if it has no kind yet), or, with
    None, every active experiment that has runs (those holding a sophon-ray sweep are tagged likewise).

    Raises UiError when the named experiment is not in the store (listing the ones that are, and the fix)."""
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            there = sorted(e.name for e in client.search_experiments(max_results=100))
            raise UiError(f"no experiment named {experiment!r} in the MLflow store {redact(uri)} (experiments there: "
                          f"{', '.join(there) or 'none'}). Fix: run the sweep first (`sophon-ray run SPEC`), or set "
                          "tracking.uri / MLFLOW_TRACKING_URI to the store it logged to")
        _tag_kind(client, found.experiment_id)
        return [ExperimentLink(found.name, found.experiment_id)]
    links = []
    for found in client.search_experiments(max_results=1000):
        if not client.search_runs([found.experiment_id], max_results=1):
            continue  # MLflow's empty Default experiment
        if client.search_runs([found.experiment_id], filter_string=f"tags.`{ROLE}` = 'sweep'", max_results=1):
            _tag_kind(client, found.experiment_id)
        links.append(ExperimentLink(found.name, found.experiment_id))
    return links


def _tag_kind(client: Any, experiment_id: str) -> None:
    """``ensure_experiment_kind``, best effort: a store the user may only read still gets its UI."""
    try:
        ensure_experiment_kind(client, experiment_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types (permissions, read-only database)
        print(f"note: could not tag experiment {experiment_id} as a training experiment ({type(err).__name__}: "
              f"{str(err)[:120]}); the links below open its runs all the same", file=sys.stderr)


def free_port(host: str, port: int) -> int:
    """``port`` when nothing listens on it at ``host`` (0: any free port, chosen now).

    Raises UiError when it is taken, naming the fix."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # as the server will: connections of a UI stopped a moment ago (TIME_WAIT) do not keep the port
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UiError(f"cannot listen on {host}:{port} ({err.strerror}). Fix: pass another --port (e.g. --port "
                          f"{port + 1}, or --port 0 for any free one), or stop what listens there") from err
        return probe.getsockname()[1]


def server_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` on the store: one worker, and for a SQLite store the Tracker's artifact root."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root is not None:
        command += ["--artifacts-destination", str(root)]
    return command


# MLflow's job execution off: its GenAI job runners and periodic tasks are extra processes that a viewer of training
# runs does not use, and on MLflow 3.17 their seven huey consumers keep about one core busy while the server idles
# (measured: 28 CPU-s per idle 30 s, 0 without)
JOB_EXECUTION_OFF = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env() -> dict[str, str]:
    """The server's environment: ours, with :data:`JOB_EXECUTION_OFF` unless the user set it."""
    return {**JOB_EXECUTION_OFF, **os.environ}


def base_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens (a wildcard bind is reached through 127.0.0.1)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def wait_healthy(url: str, server: subprocess.Popen, log_path: Path, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Poll ``url/health`` until it answers 200.

    Raises UiError (with the server log's tail) when the server exits first or does not answer in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UiError(f"the MLflow server exited with status {server.returncode} before it answered. Its log "
                          f"({log_path}):\n{_tail(log_path)}\nFix: see the log (a port taken meanwhile: pass --port 0)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise UiError(f"the MLflow server did not answer {url}/health within {timeout:.0f} s. Its log ({log_path}):\n"
                  f"{_tail(log_path)}\nFix: see the log; on a busy machine try again")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(server: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM the server's process group (its workers too), SIGKILL after ``timeout``; returns its exit status."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if server.poll() is not None:
            break
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    return server.wait()


class _Stop(Exception):
    """Raised in the main thread by SIGTERM, so that the server is stopped as on Ctrl-C."""


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises :class:`_Stop`; SIGINT raises KeyboardInterrupt even when this process inherited it ignored
    (a non-interactive shell starts a background job with SIGINT ignored, which would
    otherwise leave Ctrl-C with no effect)."""
    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def serve(uri: str, experiment: str | None, host: str = "127.0.0.1", port: int = 5000,
          out: TextIO = sys.stdout) -> int:
    """Start the MLflow UI on ``uri``, print its URL and the experiment link(s), and wait until Ctrl-C or SIGTERM
    (then stop the server); an ``http(s)://`` store is already a UI, so only its link is printed. Returns 0 after
    a clean stop.

    Raises UiError for a missing store or experiment, a busy port, or a server that dies or never answers."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
        links = find_experiments(_credentials_to_env(uri), experiment)
        url = redact(uri).rstrip("/")
        print(f"the store is an MLflow server already; open {url}", file=out)
        for link in links:
            print(f"experiment {link.name}: {link.url(url)}", file=out)
        return 0
    check_store(uri)
    links = find_experiments(uri, experiment)
    port = free_port(host, port)
    url = base_url(host, port)
    log_file = tempfile.NamedTemporaryFile(prefix="sophon-ray-ui-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(log_file.name)
    server = subprocess.Popen(server_command(uri, host, port), stdout=log_file, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True, env=server_env())
    log_file.close()
    clean = False
    try:
        with _sigterm_stops():
            try:
                wait_healthy(url, server, log_path)
                root = artifact_root(uri)
                print(f"MLflow UI: {url}  (store {redact(uri)}" + (f", artifacts {root})" if root else ")"), file=out)
                for link in links:
                    print(f"experiment {link.name}: {link.url(url)}", file=out)
                if not links:
                    print("no runs in this store yet", file=out)
                print("press Ctrl-C to stop", file=out, flush=True)
                status = server.wait()
                raise UiError(f"the MLflow server stopped by itself (status {status}). Its log ({log_path}):\n"
                              f"{_tail(log_path)}")
            except (KeyboardInterrupt, _Stop):
                clean = True
    finally:
        stop(server)
        if clean:
            log_path.unlink(missing_ok=True)
    print("MLflow UI stopped", file=out, flush=True)
    return 0
