import json
import pickle

import pytest
import torch

from sophon_ray.run.checkpoint import CheckpointError, load_checkpoint, make_card, read_card, save_checkpoint
from sophon_ray.modes import build_model
from sophon_ray.spec import DomainSpec, ModelSpec


def _card(arch="convnet", classes=10):
    return make_card(ModelSpec(arch, classes), DomainSpec("shapes", 16), (DomainSpec("shapes_m", 16),), "abc123",
                     role="protected", metrics={"original_val_acc": 97.5})


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSpec(), 3, 16)
    model(torch.randn(4, 3, 16, 16))  # move BN running stats off their defaults
    save_checkpoint(model, _card(), tmp_path / "ckpt")
    loaded, card = load_checkpoint(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert card["restricted"][0]["dataset"] == "shapes_m" and card["metrics"]["original_val_acc"] == 97.5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]


def test_mismatched_card_is_refused_with_the_differences(tmp_path):
    save_checkpoint(build_model(ModelSpec(), 3, 16), _card(), tmp_path / "c")
    card = json.loads((tmp_path / "c" / "model.json").read_text())
    card["num_classes"] = 5
    (tmp_path / "c" / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"do not match the card.*classifier\.2\.weight"):
        load_checkpoint(tmp_path / "c")
    card["num_classes"], card["arch"] = 10, "resnet18"
    (tmp_path / "c" / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "c")


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="never loaded"):
        load_checkpoint(tmp_path / "bad")
    # a pickle disguised as safetensors next to a valid card
    save_checkpoint(build_model(ModelSpec(), 3, 16), _card(), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "c")
    assert not marker.exists()


def test_corrupt_safetensors_is_refused(tmp_path):
    save_checkpoint(build_model(ModelSpec(), 3, 16), _card(), tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "c")


def test_nan_checkpoint_is_never_written(tmp_path):
    model = build_model(ModelSpec(), 3, 16)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(model, _card(), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_card_format_is_checked(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="expected 'sophon-ray/1'"):
        read_card(tmp_path / "c")


def test_pretrain_weights_from_a_checkpoint_skip_pretraining_and_must_fit(tmp_path):
    from sophon_ray.run.checkpoint import initial_model
    from sophon_ray.run.validate import parse_spec

    torch.manual_seed(1)
    model = build_model(ModelSpec(), 3, 16)
    save_checkpoint(model, _card(), tmp_path / "given")
    spec = parse_spec({"original": {"dataset": "shapes", "image_size": 16},
                       "restricted": [{"dataset": "shapes_m", "image_size": 16}],
                       "pretrain": {"weights": str(tmp_path / "given")}})
    loaded, needs_training = initial_model(spec)
    assert not needs_training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    small = parse_spec({"original": {"dataset": "shapes", "image_size": 12},
                        "restricted": [{"dataset": "shapes_m", "image_size": 12}],
                        "pretrain": {"weights": str(tmp_path / "given")}})
    with pytest.raises(CheckpointError, match="the card says"):
        initial_model(small)
    fresh, needs_training = initial_model(parse_spec({}))
    assert needs_training and isinstance(fresh, torch.nn.Module)


def test_channels_last_models_save_contiguous_and_load_in_either_layout(tmp_path):
    model = build_model(ModelSpec(channels_last=True), 3, 16)
    conv = model.body[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    save_checkpoint(model, _card(), tmp_path / "c")
    for layout in (True, False):
        loaded, _ = load_checkpoint(tmp_path / "c", channels_last=layout)
        assert loaded.body[0].weight.is_contiguous(memory_format=torch.channels_last) == layout
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    x = torch.randn(4, 3, 16, 16)
    plain = build_model(ModelSpec(channels_last=False), 3, 16)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model.eval()(x), plain.eval()(x), atol=1e-5)  # same function, other layout
