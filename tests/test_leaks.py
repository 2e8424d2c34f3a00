"""The protocol's walls, tested so that a leak fails: the attacker's objective never reads the test split (a search
trial's objective is the same whatever the test labels are; Tune, the searcher and the attacker's pick maximise
validation), the attacker's pool never overlaps the protector's share, its validation data or the test split, and
the development grid never fine-tunes or scores on the attacker's data or the test split.

Each was shown failing with the leak put in on purpose: ``val`` and ``test`` swapped in ``search_trial``; Tune's
objective pointed at the test score; the attacker's pool carved out of the protector's share; the development
grid fine-tuning on the attacker's pool."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from analysis.search import SEARCH_KEYS, picks
from sophon_ray import names
from sophon_ray.core.data import make_splits
from sophon_ray.modes import build_model, task_for
from sophon_ray.run.plan import plan_trials, search_templates
from sophon_ray.run.trials_worker import attack_data, search_data, search_trial, share
from sophon_ray.run.tune_driver import search_tune_config
from sophon_ray.run.validate import parse_spec
from sophon_ray.spec import ModelSpec

SPEC = {
    "model": {"arch": "convnet", "num_classes": 10, "channels_last": False},
    "original": {"dataset": "shapes", "image_size": 8, "train_size": 200, "test_size": 50},
    "restricted": [{"dataset": "shapes_m", "image_size": 8, "train_size": 400, "test_size": 100}],
    "protect": [{"name": "a", "seeds": [0]}],
    "attack": {"data_pool": "disjoint", "pool_fraction": 0.5,
               "development": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-2]}],
               "evaluation": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-2]}],
               "search": [{"name": "s", "num_samples": 2, "val_fraction": 0.25,
                           "space": {"epochs": [3], "batch_size": [16]}}]},
}


@pytest.fixture(scope="module")
def spec():
    return parse_spec(SPEC)


@pytest.fixture(scope="module")
def splits(spec):
    return make_splits(spec)


def fingerprints(dataset) -> set[str]:
    """One hash per example (its image bytes): procedural images never repeat, so equal hashes mean one example."""
    return {hashlib.sha1(dataset[i][0].numpy().tobytes()).hexdigest() for i in range(len(dataset))}


# ------------------------------------------------------------------------------------------------ the pools
def test_the_attackers_pool_never_overlaps_the_protectors_share_its_validation_or_the_test_split(splits):
    attacker = fingerprints(splits.restricted_attacker[0])
    protector, val = fingerprints(splits.restricted_train[0]), fingerprints(splits.restricted_val[0])
    test = fingerprints(splits.restricted_test[0])
    assert len(attacker) == len(splits.restricted_attacker[0]) and abs(len(attacker) - 200) <= 1  # half the split
    assert not attacker & protector and not attacker & val and not protector & val
    assert not test & (attacker | protector | val)


def test_a_search_holds_out_its_validation_inside_the_attackers_pool(splits):
    data = search_data(splits, 0, val_fraction=0.25, seed=0)
    train, val = fingerprints(data.train), fingerprints(data.val)
    pool = fingerprints(splits.restricted_attacker[0])
    assert train | val == pool and not train & val
    assert not (train | val) & fingerprints(splits.restricted_train[0])
    assert fingerprints(data.test) == fingerprints(splits.restricted_test[0])


def test_the_development_grid_never_reads_the_attackers_pool_or_the_test_split(spec, splits):
    data = attack_data(splits)
    trials = plan_trials(spec, [("a", 0)])
    development = [t for t in trials if t.grid == names.DEVELOPMENT]
    evaluation = [t for t in trials if t.grid == names.EVALUATION]
    assert development and evaluation
    forbidden = fingerprints(splits.restricted_attacker[0]) | fingerprints(splits.restricted_test[0])
    for trial in development:
        fit, score = data.for_trial(trial)
        assert not (fingerprints(fit) | fingerprints(score)) & forbidden
    fit, score = data.for_trial(evaluation[0])
    assert fingerprints(fit) == fingerprints(splits.restricted_attacker[0])
    assert fingerprints(score) == fingerprints(splits.restricted_test[0])


# ---------------------------------------------------------------------------------------- the objective
def _run_search_trial(spec, splits, test, monkeypatch) -> list[dict]:
    """One search trial run in this process (Tune's report captured) against the normal model, with ``test``
    standing in for the restricted test split."""
    reports: list[dict] = []
    monkeypatch.setattr("ray.tune.report", lambda metrics, **_: reports.append(dict(metrics)))
    template = next(t for t in search_templates(spec, [("a", 0)]) if t.subject.kind == "normal")
    torch.manual_seed(0)
    model = build_model(ModelSpec("convnet", 10, channels_last=False), 3, 8)
    card = {"arch": "convnet", "num_classes": 10, "channels": 3, "image_size": 8}
    data = search_data(splits, 0, val_fraction=0.25, seed=0)
    data = type(data)(data.train, data.val, test, data.original_test)
    search_trial({"lr": 0.05, "optimizer": "momentum"}, template, {"normal": share((model.state_dict(), card))},
                 share(data), threads=1, task=task_for(spec))
    return reports


def test_a_search_trials_objective_is_the_same_whatever_the_test_labels_are(spec, splits, monkeypatch):
    """Swapping validation and test in the trial, or scoring the objective on test, makes the objective follow
    the test labels; with the test labels scrambled (every label moved to the next class) it must not move."""
    test = splits.restricted_test[0]
    x, y = test.tensors
    scrambled = TensorDataset(x, (y + 1) % 10)
    plain, other = (_run_search_trial(spec, splits, t, monkeypatch) for t in (test, scrambled))
    m = task_for(spec).metric
    objective = [[r[k] for k in (m.val, m.val_best) if k in r] for r in plain]
    assert objective and all(row for row in objective)
    assert objective == [[r[k] for k in (m.val, m.val_best) if k in r] for r in other]
    assert [r[m.restricted] for r in plain] != [r[m.restricted] for r in other]   # the test split is read to score


def test_tune_the_searcher_and_the_scheduler_maximise_validation(spec):
    template = search_templates(spec, [("a", 0)])[0]
    config = search_tune_config(spec, spec.attack.search[0], template, 2, [], "leak-check")
    m = task_for(spec).metric
    assert config.metric == m.val_best == "val_acc_best" and config.mode == "max"
    searcher = config.search_alg.searcher
    assert searcher._metric == m.val_best


def test_the_attackers_pick_follows_validation_not_test():
    keys = {k: ["x", "x"] for k in SEARCH_KEYS}
    trials = pd.DataFrame({**keys, names.SEARCH_TRIAL: [0, 1], "val_best": [70.0, 40.0],
                           "at_val_best": [50.0, 90.0], "final": [50.0, 90.0]})
    assert picks(trials)[names.SEARCH_TRIAL].tolist() == [0]
    swapped = trials.assign(at_val_best=[10.0, 99.0], final=[10.0, 99.0])
    assert picks(swapped)[names.SEARCH_TRIAL].tolist() == [0]          # test scores never move the pick
