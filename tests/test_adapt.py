"""Label-free adaptation (recipe setting ``adapt``): the losses' closed forms, and the attacker's labels never
reach it (two pools with the same inputs and different labels adapt to bit-identical models)."""

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset

from sophon_ray.core.adapt import adapt, information_maximisation_loss, inputs_of, pseudo_label_loss
from sophon_ray.core.attack import finetune
from sophon_ray.modes import build_model
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.recipes import AttackConfig
from sophon_ray.spec import ModelSpec


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec("convnet", 4, channels_last=False), channels=3, image_size=8)


def test_pseudo_labels_train_only_on_confident_predictions():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)
    loss = pseudo_label_loss(logits, threshold=0.9)
    expected = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0]))
    assert loss.item() == pytest.approx(expected.item())
    assert pseudo_label_loss(logits, threshold=0.99999999).item() == 0.0   # nothing confident: no signal


def test_information_maximisation_is_zero_for_uniform_and_minus_log_c_for_confident_diverse():
    uniform = torch.zeros(6, 3)
    assert information_maximisation_loss(uniform, 0.9).item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.eye(3).repeat(2, 1) * 50
    assert information_maximisation_loss(confident, 0.9).item() == pytest.approx(-math.log(3), abs=1e-4)


@pytest.mark.parametrize("method", ["pseudo-label", "entropy"])
def test_adaptation_never_reads_the_labels(method):
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pools = [TensorDataset(x, torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
    adapted = []
    for pool in pools:
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = adapt(model, inputs_of(pool), method, 2, optimizer, 8, torch.Generator().manual_seed(3), 0.3)
        adapted.append(model.state_dict())
        assert len(losses) == 2
    assert all(torch.equal(adapted[0][k], adapted[1][k]) for k in adapted[0])
    assert not all(torch.equal(adapted[0][k], net().state_dict()[k]) for k in adapted[0])   # it did train


def test_an_adapting_attack_runs_and_differs_from_the_plain_one():
    data = TensorDataset(torch.randn(48, 3, 8, 8), torch.randint(0, 4, (48,)))
    config = AttackConfig(strategy="direct-all", optimizer="sgd", lr=1e-2, epochs=1, batch_size=16)
    plain = finetune(net(), data, data, config, task=CLASSIFICATION)
    adapted = finetune(net(), data, data, replace(config, adapt="entropy", adapt_epochs=2), task=CLASSIFICATION)
    assert adapted.restricted_loss != plain.restricted_loss
    assert finetune(net(), data, data, config, task=CLASSIFICATION).restricted == plain.restricted


def test_validation_refuses_label_free_adaptation_of_a_denoiser_and_an_unknown_method():
    from pathlib import Path

    import yaml

    from sophon_ray.run.validate import parse_spec

    root = Path(__file__).parents[1]
    gen = yaml.safe_load((root / "sweeps" / "quickstart_generation.yaml").read_text())
    gen["attack"]["evaluation"] = {**gen["attack"]["evaluation"], "adapt": ["entropy"]}
    with pytest.raises(Exception, match=r"adapt 'entropy' does not apply in generation mode"):
        parse_spec(gen)
    cls = yaml.safe_load((root / "sweeps" / "quickstart.yaml").read_text())
    cls["attack"]["evaluation"] = {**cls["attack"]["evaluation"], "adapt": ["entropie"]}
    with pytest.raises(Exception, match=r"unknown adapt 'entropie' \(did you mean 'entropy'\?\)"):
        parse_spec(cls)
