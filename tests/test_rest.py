"""The outbox's REST calls into a tracking server (``run/rest.py``): what they store is what ``MlflowClient`` stores
(a real ``mlflow server``, under gunicorn as cluster.yaml starts it), a refused write raises MLflow's own error, and
the credentials and workspace go in the headers (a stdlib HTTP server records what arrives)."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from sophon_ray.run.rest import RestWriter
from sophon_ray.run.tracking import MAX_BATCH, Tracker
from tests.test_faults import _free_port, kill_server, start_server

ROWS = [(step, {"acc": 10.0 + step, "loss": 2.0 - step / 100}) for step in range(MAX_BATCH // 2 + 30)]  # 2 batches


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST like ``runs/create`` and records its path, headers and body."""

    seen: list[tuple[str, dict[str, str], dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.seen.append((self.path, dict(self.headers), body))
        answer = json.dumps({"run": {"info": {"run_id": "r1"}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    Recorder.seen = []
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_basic_credentials_a_token_and_a_workspace_go_in_the_headers(recorder, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    writer = RestWriter.for_uri(recorder)
    assert writer.create_run("7", "trial 1", {"sophon.key": "k1"}, 123) == "r1"
    path, headers, body = Recorder.seen[-1]
    assert path == "/api/2.0/mlflow/runs/create"
    assert headers["Authorization"] == "Basic YW5uOnMzY3JldA=="  # base64 of ann:s3cret
    assert headers["Connection"] == "close"  # uvicorn answers a kept-alive connection's calls 40-50 ms late
    assert body == {"experiment_id": "7", "run_name": "trial 1", "start_time": 123,
                    "tags": [{"key": "sophon.key", "value": "k1"}]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    RestWriter.for_uri(recorder).end_run("r1", "FINISHED", 456)
    path, headers, body = Recorder.seen[-1]
    assert (path, headers["Authorization"], headers["X-MLFLOW-WORKSPACE"]) == (
        "/api/2.0/mlflow/runs/update", "Bearer tok", "team-a")
    assert body == {"run_id": "r1", "status": "FINISHED", "end_time": 456}


def test_stores_and_auth_it_does_not_serve_keep_the_mlflow_client(monkeypatch, tmp_path):
    assert RestWriter.for_uri(f"sqlite:///{tmp_path}/mlflow.db") is None
    assert RestWriter.for_uri("databricks") is None
    monkeypatch.setenv("MLFLOW_TRACKING_AWS_SIGV4", "true")
    assert RestWriter.for_uri("https://mlflow.example.com") is None
    monkeypatch.delenv("MLFLOW_TRACKING_AWS_SIGV4")
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "my_plugin")
    assert RestWriter.for_uri("https://mlflow.example.com") is None


def _write(tracker: Tracker, key: str) -> str:
    """One trial as the outbox writes it: open (params deferred), rows + params + a tag in batches, finish."""
    run_id, created, missing = tracker.open_child("p", "s1", "attack", key, f"trial {key}", {"lr": 0.01, "seed": 3},
                                                  defer_params=True, known={}, search=False)
    assert created and missing == {"lr": "0.01", "seed": "3"}
    tracker.log_rows(run_id, ROWS, params=missing, tags={"sophon.node": "node-a"})
    tracker.log_rows(run_id, [(0, {"final": 1.5, "bad": float("nan")})])
    tracker.finish(run_id, "FINISHED")
    return run_id


@pytest.mark.integration
def test_a_run_written_over_rest_equals_one_written_by_the_mlflow_client(tmp_path):
    """Both paths into one real server (gunicorn, as cluster.yaml starts it): the same tags, params, every metric
    point (across two batches, the non-finite one skipped) and status; artifacts and the UI's page work under
    gunicorn; a refused write raises MLflow's error."""
    from mlflow.exceptions import MlflowException

    port = _free_port()
    server = start_server(tmp_path, port, ("--gunicorn-opts", "--timeout 120"))
    try:
        rest = Tracker(f"http://127.0.0.1:{port}", "rest")
        assert rest.rest is not None
        client = Tracker(f"http://127.0.0.1:{port}", "rest")
        client.rest = None  # the same store through MlflowClient
        runs = [rest.client.get_run(_write(t, key)) for t, key in ((rest, "a"), (client, "b"))]
        for run in runs:
            assert run.info.status == "FINISHED" and run.info.end_time and run.info.start_time
        tags = [{k: v for k, v in r.data.tags.items() if k != "sophon.key" and k != "mlflow.runName"} for r in runs]
        assert tags[0] == tags[1] and tags[0]["sophon.node"] == "node-a"
        assert runs[0].data.params == runs[1].data.params == {"lr": "0.01", "seed": "3"}
        assert runs[0].data.metrics == runs[1].data.metrics and "bad" not in runs[0].data.metrics
        histories = [sorted((m.step, m.value) for m in rest.client.get_metric_history(r.info.run_id, "acc"))
                     for r in runs]
        assert histories[0] == histories[1] == [(s, row["acc"]) for s, row in ROWS]
        rest.log_bytes(runs[0].info.run_id, "samples/after.png", b"png bytes")  # artifacts through the proxy
        assert Path(rest.client.download_artifacts(runs[0].info.run_id, "samples/after.png", str(tmp_path))
                    ).read_bytes() == b"png bytes"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:  # the UI's page
            assert page.status == 200 and b"<html" in page.read().lower()
        with pytest.raises(MlflowException, match="lr"):  # a param's value cannot change
            rest.log_rows(runs[0].info.run_id, [], params={"lr": "0.5"})
        with pytest.raises(MlflowException):
            rest.finish("0" * 32, "FINISHED")  # no such run
    finally:
        kill_server(server)

