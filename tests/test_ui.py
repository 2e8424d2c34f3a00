"""``sophon-ray ui``: a real ``mlflow server`` on a small real SQLite store, reached over HTTP, then stopped.

The errors (no store, no experiment, a busy port) run in-process and start nothing; the server test is marked
integration (it starts MLflow's server process: about 10-30 s)."""

import json
import os
import re
import signal
import socket
import urllib.parse
import urllib.request

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

from sophon_ray.cli import main  # noqa: E402
from sophon_ray.names import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND  # noqa: E402
from tests.store import small_sweep  # noqa: E402
from tests.ui_process import UiProcess  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return small_sweep(tmp_path_factory.mktemp("ui-store"))


HTTP_TIMEOUT_S = 60  # the first requests are slow while the sweep next door keeps both cores busy


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def test_ui_on_a_missing_store_names_the_fix_and_creates_nothing(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: never-ran\ntracking: {{uri: 'sqlite:///{tmp_path}/nothing/mlflow.db'}}\n")
    assert main(["ui", str(spec), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"error: no MLflow store at {tmp_path}/nothing/mlflow.db" in err and "sophon-ray run" in err
    assert "Traceback" not in err and not (tmp_path / "nothing").exists()


def test_ui_on_a_missing_experiment_lists_the_ones_there(store, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: other\ntracking: {{uri: '{store['uri']}'}}\n")
    assert main(["ui", str(spec), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: no experiment named 'other'" in err and "experiments there: Default, ui-test" in err


def test_ui_on_a_busy_port_names_the_fix(store, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", str(store["spec"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port 0" in err


@pytest.mark.integration
def test_ui_serves_the_store_and_its_artifacts_then_stops_on_ctrl_c(store, tmp_path):
    # The experiment lost its kind tag (a store from before it existed): `ui` restores it.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    client.delete_experiment_tag(store["experiment_id"], EXPERIMENT_KIND)
    ui = UiProcess(tmp_path, str(store["spec"]), "--port", "0")
    try:
        printed = ui.until("press Ctrl-C to stop")
        url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", printed).group(1)
        link = f"{url}/#/experiments/{store['experiment_id']}?workflowType=machine_learning"  # the runs, not GenAI
        assert f"experiment ui-test: {link}" in printed
        assert f"artifacts {store['root']}/mlartifacts" in printed
        with urllib.request.urlopen(f"{url}/health", timeout=HTTP_TIMEOUT_S) as response:
            assert response.status == 200
        found = get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-test")["experiment"]
        assert found["experiment_id"] == store["experiment_id"]
        assert {t["key"]: t["value"] for t in found["tags"]}[EXPERIMENT_KIND] == CUSTOM_MODEL_DEVELOPMENT
        # the report on the parent run is served (the UI's own artifact routes)
        query = urllib.parse.urlencode({"run_id": store["parent"], "path": "report"})
        listed = {f["path"] for f in get_json(f"{url}/ajax-api/2.0/mlflow/artifacts/list?{query}")["files"]}
        assert {"report/summary.md", "report/report.html", "report/heatmap-direct-all.png"} <= listed
        query = urllib.parse.urlencode({"run_id": store["parent"], "path": "report/summary.md"})
        with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=HTTP_TIMEOUT_S) as response:
            assert response.read().decode().startswith("# ui-test")
        # the report's bulk curve read through the server gives what it reads from the SQLite file
        from analysis.runs import load_curves

        assert load_curves(url, store["attacks"]) == load_curves(store["uri"], store["attacks"])
        assert all(len(curve) == 5 for curve in load_curves(url, store["attacks"]).values())
        # a store that is a server already is not served again: its link is printed
        status, out = UiProcess(tmp_path, str(store["spec"]), "--set", f"tracking.uri={url}").finish(timeout=120)
        assert status == 0 and f"experiment ui-test: {link}" in out, out
        ui.process.send_signal(signal.SIGINT)             # Ctrl-C
        status, out = ui.finish()
        assert status == 0 and out.rstrip().endswith("MLflow UI stopped"), out
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):      # the server (and its workers) are gone
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    finally:
        ui.stop()
