"""The dataset builders behind :data:`sophon_ray.core.data.DATASETS`: procedural and bundled sets (``shapes``,
``shapes_m``, ``digits``, ``fake``: generated, held as tensors) and file-backed ones (torchvision sets, CelebA,
``imagefolder``: read from ``root``, default ``data/<dataset>``, downloaded only with ``download: true``).
Importing :mod:`sophon_ray.core.data` registers them."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from sophon_ray.errors import SophonError
from sophon_ray.registry import Registry
from sophon_ray.spec import DomainSpec

Split = tuple[Dataset, Dataset]
DATASETS: Registry[Callable[[DomainSpec], Split]] = Registry("dataset")


class DatasetNotFound(SophonError, FileNotFoundError):
    """A file-backed dataset is missing under its root; the message says where and how to get it."""


def normalise(x: Tensor, spec: DomainSpec) -> Tensor:
    """[N, c, h, w] in [0, 1] -> resized to image_size, channels matched, normalised by mean/std."""
    if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False,
                          antialias=True).clamp(0, 1)
    if x.shape[1] != spec.channels:
        x = x.mean(dim=1, keepdim=True) if spec.channels == 1 else x.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()



# ------------------------------------------------------------------------------------- procedural sets
SHAPE_CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "cross", "hbar", "vbar", "diamond")


def _shape_distance(cls: np.ndarray, u: np.ndarray, v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of each sample's shape in its local frame [N,H,W]."""
    r = np.sqrt(u**2 + v**2)
    box = np.maximum(np.abs(u), np.abs(v))
    su, sv = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    bar = lambda a, b: np.maximum(np.abs(a) - t, np.abs(b) - 0.9)  # noqa: E731
    d = np.stack([
        r - 0.9,
        np.abs(r - 0.7) - t,
        box - 0.8,
        np.abs(box - 0.7) - t,
        np.maximum(np.abs(u) * 0.866 + v * 0.5, -v) - 0.45,
        np.minimum(bar(u, v), bar(v, u)),
        np.minimum(bar(su, sv), bar(sv, su)),
        np.maximum(np.abs(v) - 1.5 * t, np.abs(u) - 0.9),
        np.maximum(np.abs(u) - 1.5 * t, np.abs(v) - 0.9),
        np.abs(u) + np.abs(v) - 0.95,
    ])
    return np.take_along_axis(d, cls[None, :, None, None], axis=0)[0]


def render_shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random shapes (10 classes, random position, scale, small rotation, stroke width) as soft
    masks [n, size, size] in [0, 1], and their labels."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, len(SHAPE_CLASSES), n)
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
    cx, cy = (rng.uniform(-0.3, 0.3, (2, n, 1, 1)))
    scale = rng.uniform(0.45, 0.7, (n, 1, 1))
    theta = rng.uniform(-0.3, 0.3, (n, 1, 1))
    t = rng.uniform(0.14, 0.26, (n, 1, 1))
    dx, dy = (x - cx) / scale, (y - cy) / scale
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    d = _shape_distance(cls, u, v, t) * scale  # back to image units for an even edge width
    mask = 1 / (1 + np.exp(d * size * 1.5))
    return mask.astype(np.float32), cls.astype(np.int64)


def _textures(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured procedural backgrounds [n, 3, size, size] in [0, 1]: random gratings + smooth colour noise."""
    grid = np.arange(size) / size
    y, x = np.meshgrid(grid, grid, indexing="ij")
    out = np.zeros((n, 3, size, size), np.float32)
    for _ in range(2):
        freq = rng.uniform(1, 6, (n, 1, 1, 1))
        angle = rng.uniform(0, np.pi, (n, 1, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 3, 1, 1))
        out += np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 3, 4, 4)).astype(np.float32))
    out += F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy() * 1.5
    lo, hi = out.min(axis=(2, 3), keepdims=True), out.max(axis=(2, 3), keepdims=True)
    return (out - lo) / (hi - lo + 1e-6)


def _shapes_split(spec: DomainSpec, textured: bool) -> Split:
    sizes = {"train": spec.train_size or 5000, "test": spec.test_size or 1000}
    out = []
    for i, (part, n) in enumerate(sizes.items()):
        seed = spec.seed * 1000 + i + (500 if textured else 0)
        mask, labels = render_shapes(n, spec.image_size, seed)
        rng = np.random.default_rng(seed + 7)
        if textured:  # a coloured shape on a coloured texture, the colours drawn far apart
            bg = 0.15 + 0.5 * _textures(n, spec.image_size, rng)
            colour = 1.0 - bg.mean(axis=(2, 3), keepdims=True) + rng.uniform(-0.15, 0.15, (n, 3, 1, 1))
            img = bg + (colour - bg) * mask[:, None]
        else:
            fg = rng.uniform(0.6, 1.0, (n, 1, 1, 1))
            bg = rng.uniform(0.0, 0.3, (n, 1, 1, 1))
            img = bg + (fg - bg) * mask[:, None] + rng.normal(0, 0.05, (n, 1, spec.image_size, spec.image_size))
        x = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))
        out.append(TensorDataset(normalise(x, spec), torch.from_numpy(labels)))
    return out[0], out[1]


@DATASETS.register("shapes")
def shapes(spec: DomainSpec) -> Split:
    """10 procedural shape classes, light on dark grey with noise (offline; train_size/test_size/seed)."""
    return _shapes_split(spec, textured=False)


@DATASETS.register("shapes_m")
def shapes_m(spec: DomainSpec) -> Split:
    """The same 10 shapes in colour on random coloured textures (a shifted domain, offline)."""
    return _shapes_split(spec, textured=True)


@DATASETS.register("digits")
def digits(spec: DomainSpec) -> Split:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), seeded 80/20 split."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(spec.seed))
    n_test = len(y) // 5
    x = normalise(x, spec)
    return TensorDataset(x[order[n_test:]], y[order[n_test:]]), TensorDataset(x[order[:n_test]], y[order[:n_test]])


@DATASETS.register("fake")
def fake(spec: DomainSpec) -> Split:
    """Random noise images with random labels (10 classes): plumbing tests only, nothing to learn."""
    gen = torch.Generator().manual_seed(spec.seed)
    out = []
    for n in (spec.train_size or 200, spec.test_size or 50):
        x = torch.rand(n, spec.channels, spec.image_size, spec.image_size, generator=gen)
        out.append(TensorDataset(normalise(x, spec), torch.randint(0, 10, (n,), generator=gen)))
    return out[0], out[1]


# ------------------------------------------------------------------------------------- file-backed sets
def _root(spec: DomainSpec) -> Path:
    return Path(spec.root or f"data/{spec.dataset}")


def _transform(spec: DomainSpec) -> Callable:
    from torchvision import transforms as T  # noqa: PLC0415

    mode = "L" if spec.channels == 1 else "RGB"
    return T.Compose([
        T.Lambda(lambda img: img.convert(mode)),
        T.Resize((spec.image_size, spec.image_size), antialias=True),
        T.ToTensor(),
        T.Normalize(list(spec.mean) * (spec.channels // len(spec.mean)), list(spec.std) * (spec.channels // len(spec.std))),
    ])


def _torchvision(spec: DomainSpec, build: Callable[..., Dataset], how: str) -> Split:
    root = _root(spec)
    try:
        return build(str(root), True, _transform(spec)), build(str(root), False, _transform(spec))
    except RuntimeError as err:
        raise DatasetNotFound(
            f"{spec.dataset}: no data under {root.resolve()} ({err}). Fix: set download: true for that domain "
            f"(needs internet), or {how} and point root at it."
        ) from err


def _register_torchvision(name: str, cls_name: str, split_kw: bool, how: str) -> None:
    def load(spec: DomainSpec) -> Split:
        import torchvision  # noqa: PLC0415

        cls = getattr(torchvision.datasets, cls_name)

        def build(root: str, train: bool, transform: Callable) -> Dataset:
            if split_kw:
                return cls(root, split="train" if train else "test", transform=transform, download=spec.download)
            return cls(root, train=train, transform=transform, download=spec.download)

        return _torchvision(spec, build, how)

    load.__doc__ = f"torchvision {cls_name} under root (default data/{name}); download: true fetches it."
    DATASETS.register(name)(load)


_register_torchvision("cifar10", "CIFAR10", False, "download cifar-10-python.tar.gz and extract it")
_register_torchvision("cifar100", "CIFAR100", False, "download cifar-100-python.tar.gz and extract it")
_register_torchvision("mnist", "MNIST", False, "copy MNIST/raw/*.gz from another machine")
_register_torchvision("svhn", "SVHN", True, "download train_32x32.mat and test_32x32.mat")
_register_torchvision("stl10", "STL10", True, "download stl10_binary.tar.gz and extract it")

CELEBA_CROP = 178  # the aligned images are 178 x 218: the usual centred square crop, then resize
CELEBA_LABEL = ("Male", "Smiling")  # label = 2 * Male + Smiling: 4 classes


@DATASETS.register("celeba")
def celeba(spec: DomainSpec) -> Split:
    """torchvision CelebA (aligned faces; train/test partitions) under root/celeba (default data/celeba),
    centre-cropped to 178 x 178 and resized to image_size. Label: 2 * Male + Smiling (4 classes, from the
    40 attributes), not identity: the 10,177 identities are disjoint between the partitions, so none learned on
    train can be scored on test; these two attributes are visible at 32 px and fairly balanced, so a
    restricted-domain classifier (generation's sample-quality scores) has a task that also measures class
    coverage. ``download: true`` needs the gdown package (Google Drive)."""
    from torchvision import transforms as T  # noqa: PLC0415
    from torchvision.datasets import CelebA  # noqa: PLC0415

    def build(root: str, train: bool, transform: Callable) -> Dataset:
        data = CelebA(root, split="train" if train else "test", target_type="attr", download=spec.download,
                      transform=T.Compose([T.CenterCrop(CELEBA_CROP), transform]))
        male, smiling = (data.attr_names.index(name) for name in CELEBA_LABEL)
        data.targets = (2 * data.attr[:, male] + data.attr[:, smiling]).long()  # labels_of reads it
        data.target_transform = lambda attr: int(2 * attr[male] + attr[smiling])
        return data

    return _torchvision(spec, build, "download img_align_celeba.zip (unzipped) and the five annotation .txt "
                        "files of CelebA into root/celeba")


@DATASETS.register("imagefolder")
def imagefolder(spec: DomainSpec) -> Split:
    """Class-per-folder images: root/train/<class>/*.png and root/test (or root/val) (CINIC-10, ImageNette)."""
    from torchvision.datasets import ImageFolder  # noqa: PLC0415

    root = _root(spec)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), root / "test")
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DatasetNotFound(f"imagefolder: expected {train_dir.resolve()} and {test_dir.resolve()} (or val/) "
                              "with one sub-folder of images per class; fix root or lay the files out that way")
    return ImageFolder(str(train_dir), _transform(spec)), ImageFolder(str(test_dir), _transform(spec))
