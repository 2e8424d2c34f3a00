"""Tracker against a real MLflow SQLite store: the experiment kind tag, the artifact root, WAL mode, the runs known
by key."""

import os
import sqlite3

from mlflow import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from sophon_ray.names import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND  # noqa: E402
from sophon_ray.run.tracking import WAL_ENV, ChildRun, Tracker, artifact_root, sqlite_path  # noqa: E402


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


def journal_mode(db) -> str:
    connection = sqlite3.connect(db)
    try:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        connection.close()


def test_a_sqlite_store_is_put_in_wal_mode_unless_the_variable_says_no(tmp_path, monkeypatch):
    monkeypatch.delenv(WAL_ENV, raising=False)
    Tracker(f"sqlite:///{tmp_path}/a/mlflow.db", "wal")
    assert journal_mode(tmp_path / "a" / "mlflow.db") == "wal"
    monkeypatch.setenv(WAL_ENV, "0")
    Tracker(f"sqlite:///{tmp_path}/b/mlflow.db", "no-wal")
    assert journal_mode(tmp_path / "b" / "mlflow.db") == "delete"  # SQLite's default, left alone


def test_known_runs_open_without_a_search_and_a_search_finds_what_they_lack(tmp_path):
    """``keyed_runs`` reads the sweep's runs by key once; ``open_child`` with them reuses a known run (set
    RUNNING again, its params not logged twice) and creates an unknown key, both without searching; with
    ``search=True`` it finds a run the known runs lack instead of creating a second one."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "known")
    parent = tracker.sweep_run("s1", "sweep")
    first, created, _ = tracker.open_child(parent, "s1", "attack", "k1", "n1", {"lr": 0.1})
    tracker.finish(first)
    assert created and tracker.keyed_runs("s2", "attack") == {}
    known = tracker.keyed_runs("s1", "attack")
    assert known == {"k1": ChildRun(first, "FINISHED", frozenset({"lr"}))}

    searches = []
    real = tracker.client.search_runs
    tracker.client.search_runs = lambda *a, **k: searches.append(k) or real(*a, **k)
    again, created, missing = tracker.open_child(parent, "s1", "attack", "k1", "n1", {"lr": 0.1, "bs": 8},
                                                 defer_params=True, known=known, search=False)
    assert (again, created, missing) == (first, False, {"bs": "8"})
    new, created, _ = tracker.open_child(parent, "s1", "attack", "k2", "n2", {}, known=known, search=False)
    assert created and searches == []
    assert known["k1"] == ChildRun(first, "RUNNING", frozenset({"lr", "bs"})) and known["k2"].run_id == new
    client = MlflowClient(tracking_uri=tracker.uri)
    assert client.get_run(first).info.status == "RUNNING"

    del known["k2"]  # a run this writer does not know of (e.g. its answer was lost)
    found, created, _ = tracker.open_child(parent, "s1", "attack", "k2", "n2", {}, known=known, search=True)
    assert (found, created) == (new, False) and len(searches) == 1 and known["k2"].run_id == new
