"""Tracker against a real MLflow SQLite store: the experiment kind tag and the artifact root."""

import os

from mlflow import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from sophon_ray.names import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND  # noqa: E402
from sophon_ray.run.tracking import Tracker, artifact_root, sqlite_path  # noqa: E402


def test_a_new_experiment_is_tagged_custom_model_development_and_keeps_its_artifact_root(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "kind-new")
    experiment = MlflowClient(tracking_uri=uri).get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND] == CUSTOM_MODEL_DEVELOPMENT
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "kind-new").as_uri()
    assert artifact_root(uri) == tmp_path / "mlartifacts" and sqlite_path(uri) == tmp_path / "mlflow.db"
    assert artifact_root("http://127.0.0.1:5000") is None and sqlite_path("postgresql://h/db") is None


def test_an_existing_experiment_without_a_kind_is_tagged_and_one_with_a_kind_is_left_alone(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("kind-old")                     # made before sophon-ray set the tag
    assert EXPERIMENT_KIND not in client.get_experiment(old).tags
    assert Tracker(uri, "kind-old").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND] == CUSTOM_MODEL_DEVELOPMENT

    chosen = client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND: "finetuning"})
    Tracker(uri, "kind-chosen")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND] == "finetuning"   # the user's choice is kept
