"""Allowed-domain warm start (recipe settings warm_start, warm_epochs): the attacker first fine-tunes on permitted
data (the original domain's training split, or a benign domain's), then on the restricted domain."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from sophon_ray.core.attack import finetune
from sophon_ray.modes import build_model
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.recipes import AttackConfig
from sophon_ray.run.trials_worker import AttackData, warm_data
from sophon_ray.run.validate import parse_spec
from sophon_ray.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec("convnet", 4, channels_last=False), channels=3, image_size=8)


def blobs(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g))


def test_a_warm_started_attack_trains_on_the_allowed_data_first():
    restricted, allowed = blobs(0), blobs(1)
    config = AttackConfig(strategy="direct-all", optimizer="sgd", lr=5e-2, epochs=1, batch_size=16)
    plain = finetune(net(), restricted, restricted, config, task=CLASSIFICATION)
    warm = replace(config, warm_start="original", warm_epochs=2)
    started = finetune(net(), restricted, restricted, warm, task=CLASSIFICATION, warm=allowed, keep_model=True)
    assert started.restricted[0] != plain.restricted[0] or started.restricted_loss[0] != plain.restricted_loss[0]
    again = finetune(net(), restricted, restricted, warm, task=CLASSIFICATION, warm=allowed)
    assert again.restricted_loss == started.restricted_loss     # seeded
    other = finetune(net(), restricted, restricted, warm, task=CLASSIFICATION, warm=blobs(2))
    assert other.restricted_loss != started.restricted_loss     # it is the allowed data that moved it
    with pytest.raises(ValueError, match="warm_start: original needs its allowed data"):
        finetune(net(), restricted, restricted, warm, task=CLASSIFICATION)


def test_the_trials_data_hands_out_the_allowed_split_a_recipe_names():
    original, benign = blobs(1), (blobs(2), blobs(3))
    data = AttackData([], [], [], [], blobs(4), [benign], original)
    assert data.warm("original") is original and data.warm("benign") is benign[0] and data.warm("none") is None
    assert warm_data("benign", None, []) is None


def test_a_benign_warm_start_needs_a_benign_domain():
    spec = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    spec["attack"]["evaluation"] = {**spec["attack"]["evaluation"], "warm_start": ["benign"]}
    with pytest.raises(Exception, match="warm_start benign fine-tunes on the first benign domain"):
        parse_spec(spec)
    spec["attack"]["evaluation"]["warm_start"] = ["none", "original"]
    assert parse_spec(spec).attack.evaluation[0].warm_start == ("none", "original")
