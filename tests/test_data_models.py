import struct

import numpy as np
import pytest
import torch

from sophon_ray.core.data import (DATASETS, DatasetNotFound, batches, labels_of, load_domain, split_off,
                             stratified_subset)
from sophon_ray.modes import build_model
from sophon_ray.modes.classification.models import MODELS
from sophon_ray.spec import DomainSpec, ModelSpec


@pytest.mark.parametrize("name", ["shapes", "shapes_m"])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_procedural_sets_are_deterministic_any_size_and_balanced(name, size):
    spec = DomainSpec(dataset=name, image_size=size, train_size=300, test_size=50)
    train, test = load_domain(spec)
    again, _ = load_domain(spec)
    assert train.tensors[0].shape == (300, 3, size, size) and len(test) == 50
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert set(labels_of(train).tolist()) == set(range(10))
    other, _ = load_domain(DomainSpec(dataset=name, image_size=size, train_size=300, seed=1))
    assert not torch.equal(train.tensors[0], other.tensors[0])


def test_normalisation_and_channels():
    train, _ = load_domain(DomainSpec(dataset="digits", image_size=16, channels=1, mean=(0.0,), std=(1.0,)))
    x = train.tensors[0]
    assert x.shape[1:] == (1, 16, 16) and x.min() >= 0 and x.max() <= 1
    train3, test3 = load_domain(DomainSpec(dataset="digits", image_size=16, channels=3))
    assert train3.tensors[0].shape[1] == 3 and train3.tensors[0].min() < 0
    assert len(train3) + len(test3) == 1797


def test_fake_set_and_caps():
    train, test = load_domain(DomainSpec(dataset="fake", image_size=8, train_size=40, test_size=10))
    assert len(train) == 40 and len(test) == 10


def test_stratified_subset_keeps_every_class_and_split_off_is_disjoint():
    train, _ = load_domain(DomainSpec(dataset="shapes", image_size=8, train_size=500))
    small = stratified_subset(train, 0.02, seed=0)
    assert set(labels_of(small).tolist()) == set(range(10))
    rest, held = split_off(train, 0.2, seed=0)
    assert len(rest) + len(held) == 500
    rows = {tuple(r.flatten()[:20].tolist()) for r in held.tensors[0]}
    assert not any(tuple(r.flatten()[:20].tolist()) in rows for r in rest.tensors[0])


def test_batches_cover_the_set_once():
    train, _ = load_domain(DomainSpec(dataset="fake", image_size=4, train_size=50))
    seen = torch.cat([y for _, y in batches(train, 16, torch.Generator().manual_seed(0))])
    assert len(seen) == 50 and sorted(seen.tolist()) == sorted(train.tensors[1].tolist())


def test_missing_dataset_root_names_the_path_and_the_fix(tmp_path):
    for name in ("cifar10", "mnist", "imagefolder"):
        with pytest.raises(DatasetNotFound) as info:
            load_domain(DomainSpec(dataset=name, image_size=32, root=str(tmp_path / "none")))
        assert str(tmp_path / "none") in str(info.value)
        assert "download: true" in str(info.value) or "fix root" in str(info.value)


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def test_mnist_reads_tiny_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 8)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), 2049)
    train, test = load_domain(DomainSpec(dataset="mnist", image_size=16, channels=3, root=str(tmp_path)))
    x, y = train[0]
    assert len(train) == 20 and len(test) == 8 and x.shape == (3, 16, 16) and y == 0
    assert labels_of(train).tolist() == [i % 10 for i in range(20)]


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / split / cls / f"{i}.png")
    train, test = load_domain(DomainSpec(dataset="imagefolder", image_size=16, root=str(tmp_path)))
    assert len(train) == len(test) == 6 and train[0][0].shape == (3, 16, 16)
    assert labels_of(train).tolist() == [0, 0, 0, 1, 1, 1]


def test_every_registered_dataset_is_known():
    assert set(DATASETS.names()) >= {"shapes", "shapes_m", "digits", "fake", "cifar10", "cifar100", "mnist",
                                     "svhn", "stl10", "imagefolder"}


@pytest.mark.parametrize("arch", sorted(MODELS.names()))
@pytest.mark.parametrize("channels,size", [(3, 16), (1, 32)])
def test_every_model_builds_runs_and_exposes_its_head(arch, channels, size):
    model = build_model(ModelSpec(arch=arch, num_classes=7), channels, size)
    model.eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    names = model.head_param_names()
    assert len(names) == 2 and all(n.startswith("classifier.") for n in names)
    assert set(names) <= set(model.classifier_param_names())


def test_unknown_model_and_weights_for_convnet_are_refused():
    with pytest.raises(KeyError, match="did you mean 'resnet18'"):
        build_model(ModelSpec(arch="resnet8"))
    with pytest.raises(ValueError, match="no published weights"):
        build_model(ModelSpec(), weights="torchvision")
