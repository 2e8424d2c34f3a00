"""Reparameterisation before fine-tuning (recipe settings shrink, perturb, rescale, temperature): the
function-preserving rescaling leaves each architecture's outputs unchanged, shrink-and-perturb changes exactly
what it says, temperature divides the logits, and every one is a no-op at its default (the recipe's draws and keys
unchanged)."""

import copy
from dataclasses import replace

import pytest
import torch

from sophon_ray.core.attack import finetune
from sophon_ray.modes import build_model
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.recipes import TABLE, AttackConfig
from sophon_ray.recipes.surgery import conv_norm_pairs, reparameterise
from sophon_ray.run.validate import parse_spec
from sophon_ray.spec import ModelSpec


def model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_model(ModelSpec(arch, 5, channels_last=False), channels=3, image_size=16)
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        net.train()
        for _ in range(3):
            net(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return net.eval()


@pytest.mark.parametrize("arch,pairs", [("convnet", 3), ("resnet18", 20), ("vgg13", 0), ("convnet_nobn", 0)])
def test_rescaling_convs_leaves_the_function_unchanged(arch, pairs):
    net, x = model(arch), torch.randn(8, 3, 16, 16)
    scaled = copy.deepcopy(net)
    reparameterise(scaled, AttackConfig(rescale=7.0), torch.Generator())
    assert len(conv_norm_pairs(net)) == pairs
    for mode in ("eval", "train"):
        getattr(net, mode)(), getattr(scaled, mode)()
        torch.manual_seed(1)  # the same dropout masks (VGG) for both
        expected = net(x)
        torch.manual_seed(1)
        torch.testing.assert_close(scaled(x), expected, rtol=1e-3, atol=1e-4)
    if pairs:
        conv, _ = conv_norm_pairs(scaled)[0]
        original, _ = conv_norm_pairs(net)[0]
        torch.testing.assert_close(conv.weight, 7.0 * original.weight)


def test_rescaling_leaves_a_denoiser_unchanged_and_untouched():
    torch.manual_seed(0)
    unet = build_model(ModelSpec("unet-tiny", 1, channels_last=False), channels=1, image_size=16)
    assert conv_norm_pairs(unet) == []   # GroupNorm before the convs: nothing to rescale


def test_shrink_and_perturb_change_exactly_what_they_say():
    net = model("convnet")
    shrunk = copy.deepcopy(net)
    reparameterise(shrunk, AttackConfig(shrink=0.4), torch.Generator())
    for (name, a), b in zip(net.named_parameters(), shrunk.parameters()):
        torch.testing.assert_close(b, 0.4 * a, msg=name)
    for (name, a), b in zip(net.named_buffers(), shrunk.buffers()):
        assert torch.equal(a, b), name   # statistics are not parameters
    noisy = [copy.deepcopy(net) for _ in range(2)]
    for n in noisy:
        reparameterise(n, AttackConfig(shrink=0.5, perturb=0.01), torch.Generator().manual_seed(3))
    delta = torch.cat([(b - 0.5 * a).flatten() for a, b in zip(net.parameters(), noisy[0].parameters())])
    assert abs(delta.std().item() - 0.01) < 0.001 and abs(delta.mean().item()) < 0.001
    assert all(torch.equal(a, b) for a, b in zip(noisy[0].parameters(), noisy[1].parameters()))  # seeded


def test_temperature_divides_the_logits():
    net, x = model("convnet"), torch.randn(4, 3, 16, 16)
    hot = copy.deepcopy(net)
    reparameterise(hot, AttackConfig(temperature=4.0), torch.Generator())
    torch.testing.assert_close(hot(x), net(x) / 4.0, rtol=1e-5, atol=1e-6)


def test_defaults_are_no_ops_and_keep_a_recipes_run_and_key():
    net = model("convnet")
    same = copy.deepcopy(net)
    reparameterise(same, AttackConfig(), torch.Generator())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    config = AttackConfig(strategy="initfc-all", optimizer="sgd", lr=1e-2, epochs=1, batch_size=16)
    assert not {"shrink", "perturb", "rescale", "temperature"} & set(TABLE.params(config))
    assert TABLE.params(replace(config, shrink=0.4))["shrink"] == 0.4


def test_a_shrunk_attack_runs_and_differs_from_the_plain_one():
    net = model("convnet")
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,)))
    config = AttackConfig(strategy="direct-all", optimizer="sgd", lr=1e-2, epochs=1, batch_size=16)
    plain = finetune(net, data, data, config, task=CLASSIFICATION)
    shrunk = finetune(net, data, data, replace(config, shrink=0.4, perturb=0.001), task=CLASSIFICATION)
    again = finetune(net, data, data, config, task=CLASSIFICATION)
    assert plain.restricted == again.restricted and plain.restricted_loss != shrunk.restricted_loss


def test_validation_refuses_classifier_only_settings_in_generation_mode():
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "quickstart_generation.yaml").read_text())
    data["attack"]["evaluation"] = {**data["attack"]["evaluation"], "temperature": [2.0], "shrink": [0.5]}
    with pytest.raises(Exception, match=r"temperature 2\.0 does not apply in generation mode"):
        parse_spec(data)
    data["attack"]["evaluation"]["temperature"] = [1.0]
    data["attack"]["evaluation"]["shrink"] = [0.0]
    with pytest.raises(Exception, match=r"shrink.*must be > 0"):
        parse_spec(data)


@pytest.mark.parametrize("setting,value", [("shrink", 0.4), ("perturb", 0.01), ("rescale", 3.0), ("temperature", 2.0),
                                           ("adapt", "entropy"), ("adapt_epochs", 3), ("adapt_threshold", 0.8),
                                           ("warm_start", "original"), ("warm_epochs", 2)])
def test_each_informed_attack_setting_round_trips_through_mlflow_params_and_the_trial_key(setting, value):
    from sophon_ray import names
    from sophon_ray.recipes import param_casts
    from sophon_ray.run.plan import Subject, Trial

    config = replace(AttackConfig(), **{setting: value})
    params = TABLE.params(config)
    assert params[setting] == value
    assert param_casts()[setting](str(value)) == value     # what analysis reads back from MLflow's string
    trial = Trial(Subject("normal"), names.EVALUATION, 0, "d", "disjoint", config)
    plain = replace(trial, config=AttackConfig())
    assert trial.key != plain.key and trial.params()[setting] == value and setting not in plain.params()


def test_validation_refuses_a_rescale_that_would_do_nothing():
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "quickstart.yaml").read_text())
    data["attack"]["evaluation"] = {**data["attack"]["evaluation"], "rescale": [1.0, 4.0]}
    assert parse_spec(data).attack.evaluation[0].rescale == (1.0, 4.0)   # convnet: 3 conv -> BatchNorm pairs
    data["model"]["arch"] = "convnet_nobn"
    with pytest.raises(Exception, match="rescale 4 does nothing on convnet_nobn"):
        parse_spec(data)
