"""MLflow server mode with real processes: an ``mlflow server`` (SQLite backend, artifact proxy) on 127.0.0.1 and a
sweep that logs to it through a credentialed URI; everything arrives, no secret leaks."""

import pytest
import yaml

from tests.test_faults import _free_port, assert_complete, kill_server, spec_for, start, start_server

pytestmark = pytest.mark.faults


def test_mlflow_server_mode_with_a_credentialed_uri_logs_everything_and_leaks_no_secret(tmp_path):
    from mlflow import MlflowClient

    from sophon_ray.checkpoint import load_checkpoint

    port = _free_port()
    server = start_server(tmp_path, port)
    plain = f"http://127.0.0.1:{port}"
    try:
        secret_uri = f"http://sophon:s3cr3t-token@127.0.0.1:{port}"
        spec = spec_for(tmp_path, "server", ["direct-all", "initfc-fc"], ["adam"], uri=secret_uri)
        data = yaml.safe_load(spec.read_text())
        data["protect"] = [{"name": "v", "iterations": 4, "inner_steps": 2, "eval_every": 2, "probe_every": 2,
                            "probe_epochs": 1}]
        data["attack"]["subjects"] = ["protected", "normal", "scratch"]
        spec.write_text(yaml.safe_dump(data))
        proc = start(tmp_path, "run", str(spec))
        assert proc.wait(timeout=400) == 0, (tmp_path / "stdout.log").read_text()[-3000:]
        runs = assert_complete(plain, "server", expected=2 * 2 + 1)
        client = MlflowClient(tracking_uri=plain)
        exp = client.get_experiment_by_name("server")
        everything = client.search_runs([exp.experiment_id], max_results=1000)
        protect = [r for r in everything if r.data.tags.get("sophon.role") == "protect"][0]
        local = client.download_artifacts(protect.info.run_id, "checkpoint", str(tmp_path / "dl"))
        model, card = load_checkpoint(local)
        assert card["variant"] == "v"
        parent = [r for r in everything if r.data.tags.get("sophon.role") == "sweep"][0]
        assert any(a.path.endswith(".png") for a in client.list_artifacts(parent.info.run_id, "report"))
        for r in everything:
            assert "s3cr3t" not in str(r.data.params) + str(r.data.tags), r.info.run_name
        assert "s3cr3t" not in (tmp_path / "stdout.log").read_text()
        assert len(runs) == 5
    finally:
        kill_server(server)
