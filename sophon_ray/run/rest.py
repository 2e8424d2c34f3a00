"""The outbox's three hot calls into an MLflow tracking server (create a run, log a batch, end a run) as plain JSON
POSTs, each on a new connection (``Connection: close``).

Why not ``MlflowClient`` for these: per trial it spent 7-8 ms of the writer's CPU (``bench/writer.py``), most of it
outside the request: building protobuf messages, converting the answers into entities and, on every request,
resolving MLflow's request-header plugins, whose Databricks probes try to import three modules this machine does not
have (a failed import searches ``sys.path`` each time). This client sends the same REST API's JSON (MLflow's
``/api/2.0/mlflow/runs/{create,log-batch,update}``) with the same credentials (:func:`mlflow.utils.credentials.
get_default_host_creds`: ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, the TLS settings)
and checks answers with MLflow's own ``verify_rest_response`` (so a refused write raises the ``RestException`` the
client would). It does not retry: the outbox's backoff does.

Why a new connection per call: on a kept-alive connection MLflow's default server (uvicorn) answered every call
after 40-50 ms here, whatever the call (``/health`` included), and on a new one after 3-9 ms; gunicorn's sync
workers close every connection anyway. ``bench/writer.py`` with 8 threads: 56 trials/s into uvicorn with a new
connection per call, 43 with keep-alive (2 cores, 2026-12-06). Stores it does not serve (SQLite, ``databricks``,
SigV4 or plugin auth, OAuth client secrets) keep ``MlflowClient``: :meth:`RestWriter.for_uri` returns None.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

API = "/api/2.0/mlflow/"
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "MLFLOW_HTTP_REQUEST_TIMEOUT", 120.0  # MLflow's variable and its default


class RestWriter:
    """Create, log to and end runs of one tracking server; thread-safe (a ``requests.Session`` per thread, for its
    settings: it keeps no connection open)."""

    def __init__(self, uri: str, creds: Any) -> None:
        self.url = uri.rstrip("/") + API
        self.headers = {"Content-Type": "application/json", "Connection": "close"}
        if creds.username and creds.password:
            token = base64.standard_b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        elif creds.token:
            self.headers["Authorization"] = f"Bearer {creds.token}"
        self.verify: bool | str = False if creds.ignore_tls_verification else (creds.server_cert_path or True)
        self.cert: str | None = creds.client_cert_path
        self._local = threading.local()
        from mlflow.utils.rest_utils import verify_rest_response  # noqa: PLC0415
        from mlflow.utils.workspace_context import get_request_workspace  # noqa: PLC0415
        from mlflow.utils.workspace_utils import WORKSPACE_HEADER_NAME  # noqa: PLC0415

        self._verify_answer, self._workspace = verify_rest_response, get_request_workspace
        self._workspace_header = WORKSPACE_HEADER_NAME

    @staticmethod
    def for_uri(uri: str) -> RestWriter | None:
        """A writer for an ``http(s)://`` tracking server whose credentials are plain (none, basic or a bearer
        token); None for any other store or auth, which ``MlflowClient`` serves."""
        if not uri.startswith(("http://", "https://")):
            return None
        from mlflow.utils.credentials import get_default_host_creds  # noqa: PLC0415

        creds = get_default_host_creds(uri)
        if creds.aws_sigv4 or creds.auth or getattr(creds, "client_secret", None):
            return None
        return RestWriter(uri, creds)

    def create_run(self, experiment_id: str, name: str, tags: Mapping[str, str], start_ms: int) -> str:
        """A new RUNNING run; returns its id."""
        answer = self._post("runs/create", {"experiment_id": experiment_id, "run_name": name, "start_time": start_ms,
                                            "tags": _pairs(tags)})
        return answer["run"]["info"]["run_id"]

    def log_batch(self, run_id: str, metrics: Iterable[tuple[str, float, int, int]], params: Mapping[str, str],
                  tags: Mapping[str, str]) -> None:
        """``metrics`` as (name, value, timestamp ms, step); at most 1000 of them (MLflow's limit per batch)."""
        self._post("runs/log-batch", {"run_id": run_id, "params": _pairs(params), "tags": _pairs(tags),
                                      "metrics": [{"key": k, "value": v, "timestamp": t, "step": s}
                                                  for k, v, t, s in metrics]})

    def end_run(self, run_id: str, status: str, end_ms: int) -> None:
        self._post("runs/update", {"run_id": run_id, "status": status, "end_time": end_ms})

    def _post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests  # noqa: PLC0415

            session = self._local.session = requests.Session()
        response = session.post(self.url + endpoint, data=json.dumps(body).encode(), headers=self._headers(),
                                verify=self.verify, cert=self.cert, timeout=_timeout())
        return self._verify_answer(response, API + endpoint).json()

    def _headers(self) -> dict[str, str]:
        """The constant headers, and MLflow's workspace header when a workspace is set (``$MLFLOW_WORKSPACE``)."""
        workspace = self._workspace()
        return {**self.headers, self._workspace_header: workspace} if workspace else self.headers


def _pairs(values: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": str(v)} for k, v in values.items()]


def _timeout() -> float:
    """``$MLFLOW_HTTP_REQUEST_TIMEOUT`` (read per request: the outbox shortens it while it delivers), else 120 s."""
    try:
        return float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S
