"""The standard FID network (:mod:`sophon_ray.modes.generation.fid_inception`) on a tiny stand-in weights file: a
state dict with the real file's keys and shapes and random values, saved with torch.save. No real weights are
needed (or downloaded): the loader, the FID-specific blocks, the 2048-d features, the errors that name the file and
the fix, validation, and the Frechet distance on top."""

import copy

import pytest
import torch
from torchvision.models.inception import Inception3, InceptionA, InceptionE

from sophon_ray.modes.generation.fid_inception import (FID_DIMS, FID_INCEPTION_FILE, FIDInception, FIDInceptionA,
                                                       FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2,
                                                       InceptionWeightsError, _check, load_fid_inception,
                                                       weights_problem)
from sophon_ray.modes.generation.quality import fid, fid_features, inception_scores, to_unit_range
from sophon_ray.run.validate import parse_spec
from sophon_ray.spec import SpecError
from tests.test_bad_input import GENERATION, GOOD


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The layout of pytorch-fid's pt_inception-2015-12-05 file, built independently of the module under test:
    torchvision's Inception3 with a 1008-way classifier and no auxiliary head (the FID blocks have torchvision's
    parameter names), random values."""
    torch.manual_seed(0)
    state = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    # spot checks of the real file's layout
    assert state["fc.weight"].shape == (1008, 2048) and state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert not any(k.startswith("AuxLogits") for k in state)
    path = tmp_path_factory.mktemp("fid") / FID_INCEPTION_FILE
    torch.save(state, path)
    return path, state


def test_the_stand_in_loads_and_gives_2048_d_features_of_small_images(stand_in):
    path, _ = stand_in
    net = load_fid_inception(path)
    assert isinstance(net, FIDInception) and not net.net.training
    blocks = {name: type(getattr(net.net, name)) for name in ("Mixed_5b", "Mixed_6e", "Mixed_7b", "Mixed_7c")}
    assert blocks == {"Mixed_5b": FIDInceptionA, "Mixed_6e": FIDInceptionC, "Mixed_7b": FIDInceptionE_1,
                      "Mixed_7c": FIDInceptionE_2}
    gen = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1      # the DDPM convention: [-1, 1], one channel
    feats = fid_features(net, grey)
    assert feats.shape == (2, FID_DIMS) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    assert not torch.equal(feats[0], feats[1])
    rgb = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    assert fid_features(net, rgb).shape == (2, FID_DIMS)
    assert weights_problem(path) is None


@pytest.mark.slow
def test_fid_on_the_stand_in(stand_in):
    """The Frechet distance on top (2048-d eigendecompositions: seconds each, minutes on a busy machine)."""
    path, _ = stand_in
    gen = torch.Generator().manual_seed(0)
    grey, rgb = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1, torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    apart = fid(grey, rgb, path)   # ~0 for a set against itself, > 0 against another set
    assert apart > 0 and abs(fid(grey, grey, path)) < 1e-6 * apart
    scores = inception_scores(grey, rgb, path.parent / "no-imagenet-weights.pth", path)
    assert scores == {"fid_standard": pytest.approx(apart)}   # no torchvision ImageNet weights: that score is left out


def test_the_fid_blocks_pool_as_tensorflow_did():
    """Same weights, other pooling: A/C/E_1 average without the zero padding (the border changes), E_2 max-pools."""
    torch.manual_seed(0)
    x = torch.rand(1, 192, 5, 5)
    fid_a = FIDInceptionA(192, pool_features=32).eval()
    plain = InceptionA.forward(fid_a, x)
    ours = fid_a(x)
    assert ours.shape == plain.shape
    assert torch.allclose(ours[:, :224], plain[:, :224])            # the convolution branches are torchvision's
    assert not torch.allclose(ours[:, 224:], plain[:, 224:])        # the pooling branch is not
    e1 = FIDInceptionE_1(64).eval()
    e2 = FIDInceptionE_2(64).eval()
    e2.load_state_dict(e1.state_dict())
    y = torch.rand(1, 64, 4, 4)
    assert not torch.allclose(e1(y), e2(y)) and torch.allclose(e1(y)[:, :1856], e2(y)[:, :1856])
    assert not torch.allclose(InceptionE.forward(e1, y), e1(y))


def test_a_wrong_file_names_itself_and_the_fix(stand_in, tmp_path):
    path, state = stand_in
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(InceptionWeightsError, match=f"no file at {missing}.*{FID_INCEPTION_FILE}"):
        load_fid_inception(missing)
    # torchvision's ImageNet Inception-v3 (1000 classes, an auxiliary head): recognised and sent where it belongs
    imagenet = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1000, 768)}, imagenet)
    with pytest.raises(InceptionWeightsError) as err:
        load_fid_inception(imagenet)
    message = str(err.value)
    assert str(imagenet) in message and "missing key(s)" in message and "unexpected key(s) (e.g. AuxLogits" in message
    assert "generation.imagenet_inception" in message and "generation.fid_inception to a local copy" in message
    assert FID_INCEPTION_FILE in message and "nothing is downloaded" in message
    # one tensor of another shape; one key missing (checked in memory: no second 100 MB file)
    bad = dict(state, **{"Mixed_6b.branch7x7_1.conv.weight": torch.zeros(160, 768, 1, 1)})
    with pytest.raises(InceptionWeightsError, match=r"Mixed_6b.branch7x7_1.conv.weight \[160, 768, 1, 1\] \(want "
                                                    r"\[128, 768, 1, 1\]\)"):
        _check(path, bad)
    short = copy.copy(state)
    del short["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(InceptionWeightsError, match="1 missing key.*Mixed_7c.branch_pool.conv.weight"):
        _check(path, short)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(InceptionWeightsError, match=f"{junk} is not a readable PyTorch state dict"):
        load_fid_inception(junk)


def test_validation_checks_the_file_before_anything_runs(stand_in, tmp_path):
    path, _ = stand_in
    assert parse_spec({**GENERATION, "generation": {"fid_inception": str(path)}}).generation.fid_inception == str(path)
    with pytest.raises(SpecError, match=r"generation.fid_inception: no file at .*nowhere.pth"):
        parse_spec({**GENERATION, "generation": {"fid_inception": str(tmp_path / "nowhere.pth")}})
    # classification mode ignores generation settings
    parse_spec({**GOOD, "generation": {"fid_inception": str(tmp_path / "nowhere.pth")}})


def test_images_go_in_as_image_files_would():
    x = torch.tensor([-1.0, 0.0, 1.0, 1.5, 0.1]).view(1, 1, 1, 5)
    unit = to_unit_range(x)
    assert unit.shape == (1, 3, 1, 5) and torch.equal(unit[:, 0], unit[:, 2])
    assert torch.allclose(unit[0, 0, 0], torch.tensor([0.0, 128 / 255, 1.0, 1.0, 140 / 255]))   # 8-bit, clipped
    other = to_unit_range(torch.zeros(1, 3, 2, 2), mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    assert torch.allclose(other[0, :, 0, 0], torch.tensor([102 / 255, 128 / 255, 153 / 255]))
