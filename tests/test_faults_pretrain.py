"""Pretraining resumes from its last state (issue 25): the driver and its local Ray instance SIGKILLed mid-pretraining,
after Ray Train registered a state checkpoint of an epoch; ``sophon-ray protect --resume`` continues from that epoch
(not from the start) and stores a normal model bit-identical to the one an uninterrupted run stores, with every
epoch's metrics in MLflow once."""

import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sophon_ray.run.checkpoint import load_checkpoint
from sophon_ray.run.train_worker import state_digest
from tests.test_faults import kill_sessions, start, wait_for_store
from tests.test_faults_protect import state_checkpoints

pytestmark = pytest.mark.faults

EPOCHS = 5


def pretrain_spec(tmp: Path) -> Path:
    """Pretraining only (no protection), EPOCHS epochs of a few seconds each; the grid (unused here) one trial."""
    spec = {
        "name": "pretrain-resume", "output_dir": str(tmp / "out"), "model": {"arch": "convnet", "num_classes": 10},
        "original": {"dataset": "shapes", "image_size": 16, "channels": 3, "train_size": 3000, "test_size": 200},
        "restricted": [{"dataset": "shapes_m", "image_size": 16, "channels": 3, "train_size": 300, "test_size": 100}],
        "pretrain": {"epochs": EPOCHS, "batch_size": 32}, "protect": [],
        "attack": {"subjects": ["normal"], "evaluation": {"strategy": ["direct-all"], "optimizer": ["adam"],
                                                          "lr": [1e-3], "epochs": [1], "seed": [0]}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def normal_model(tmp: Path):
    (folder,) = (tmp / "out" / "checkpoints").glob("pretrain-*")
    return load_checkpoint(folder)


def test_sigkilled_driver_then_resume_continues_pretraining_from_its_last_epoch_state(tmp_path):
    straight = start(tmp_path / "straight", "protect", str(pretrain_spec(tmp_path / "straight")))
    assert straight.wait(timeout=400) == 0, (tmp_path / "straight" / "stdout.log").read_text()[-3000:]

    tmp = tmp_path / "killed"
    spec = pretrain_spec(tmp)
    proc = start(tmp, "protect", str(spec))
    wait_for_store(tmp, proc)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not state_checkpoints(tmp, pretraining=True):
        time.sleep(0.2)
    kill_sessions([proc.pid])   # the driver and the local Ray instance it started, nothing else
    proc.wait(timeout=30)
    states = state_checkpoints(tmp, pretraining=True)
    assert states and states[-1] < EPOCHS, "no pretraining state checkpoint before the kill: " + str(states)
    assert not list((tmp / "out" / "checkpoints").glob("pretrain-*")), "pretraining finished before the kill"

    resumed = start(tmp, "protect", str(spec), "--resume")
    assert resumed.wait(timeout=400) == 0, (tmp / "stdout.log").read_text()[-3000:]
    model, card = normal_model(tmp)
    reference, reference_card = normal_model(tmp_path / "straight")
    assert card["metrics"]["resumed_from_epoch"] >= states[-1] > 0     # continued, not restarted
    assert reference_card["metrics"]["resumed_from_epoch"] == 0
    assert state_digest(model) == state_digest(reference)               # bit-identical to the uninterrupted run

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("pretrain-resume")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sophon.role") == "pretrain"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(1, EPOCHS + 1)), steps                   # every epoch once
