"""Dataset registry: each loader turns a :class:`DomainSpec` into ``(train, test)`` datasets of
``(image [C,H,W] normalised float, label int)``.

Offline sets (``shapes``, ``shapes_m``, ``digits``, ``fake``) are generated or read from installed
packages and held as tensors; torchvision sets and ``imagefolder`` read from ``root`` (default
``data/<dataset>``) and download only when ``download: true``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sophon_ray.registry import Registry
from sophon_ray.errors import SophonError
from sophon_ray.spec import RESTRICTED_VAL_FRACTION, DomainSpec, SweepSpec

Split = tuple[Dataset, Dataset]
DATASETS: Registry[Callable[[DomainSpec], Split]] = Registry("dataset")


class DatasetNotFound(SophonError, FileNotFoundError):
    """A file-backed dataset is missing under its root; the message says where and how to get it."""


def load_domain(spec: DomainSpec) -> Split:
    """Return the ``(train, test)`` datasets of a domain spec; raise :class:`DatasetNotFound` for missing files."""
    train, test = DATASETS.get(spec.dataset)(spec)
    return _cap(train, spec.train_size, spec.seed), _cap(test, spec.test_size, spec.seed + 1)


PROCEDURAL = ("shapes", "shapes_m", "digits", "fake")  # generated or bundled: nothing to find on disk


@dataclass(frozen=True)
class Splits:
    """Every split a sweep uses. Per restricted domain (lists, in ``spec.restricted`` order): the protector's
    share (``restricted_train``: protection, probes, the development grid's fine-tuning), its validation
    data (``restricted_val``: probes' and the development grid's scores), the attacker's pool
    (``restricted_attacker``: the evaluation grid's fine-tuning) and the test split (its scores)."""

    original_train: Dataset
    original_val: Dataset
    original_test: Dataset
    restricted_train: list[Dataset]
    restricted_val: list[Dataset]
    restricted_attacker: list[Dataset]
    restricted_test: list[Dataset]


def make_splits(spec: SweepSpec) -> Splits:
    """Load every domain of a sweep and carve its splits with fixed seeds: ``pretrain.val_fraction`` of the
    original training split for validation; of each restricted training split, 20% for the protector's
    validation, then with ``attack.data_pool: disjoint`` a further ``attack.pool_fraction`` (of the whole
    split) for the attacker and the rest for the protector; with ``shared`` the attacker draws from the whole
    restricted training split (the protector's share and validation data included)."""
    o_train, o_test = load_domain(spec.original)
    o_train, o_val = split_off(o_train, spec.pretrain.val_fraction, spec.seed)
    r_train, r_val, r_attacker, r_test = [], [], [], []
    for domain in spec.restricted:
        full, test = load_domain(domain)
        rest, val = split_off(full, RESTRICTED_VAL_FRACTION, spec.seed)
        if spec.attack.data_pool == "disjoint":
            protector, attacker = split_off(rest, spec.attack.pool_fraction / (1 - RESTRICTED_VAL_FRACTION),
                                            spec.seed + 1)
        else:
            protector, attacker = rest, full
        r_train.append(protector), r_val.append(val), r_attacker.append(attacker), r_test.append(test)
    return Splits(o_train, o_val, o_test, r_train, r_val, r_attacker, r_test)


# ------------------------------------------------------------------------------------------ helpers
def _normalise(x: Tensor, spec: DomainSpec) -> Tensor:
    """[N, c, h, w] in [0, 1] -> resized to image_size, channels matched, normalised by mean/std."""
    if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False,
                          antialias=True).clamp(0, 1)
    if x.shape[1] != spec.channels:
        x = x.mean(dim=1, keepdim=True) if spec.channels == 1 else x.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _cap(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[order] for t in dataset.tensors))
    return Subset(dataset, order.tolist())


def labels_of(dataset: Dataset) -> Tensor:
    """All labels of a dataset as a long tensor (fast for tensor sets and torchvision sets)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(np.asarray(getattr(dataset, attr)), dtype=torch.long)
    if hasattr(dataset, "samples"):
        return torch.tensor([s[1] for s in dataset.samples], dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _stratified_indices(labels: Tensor, fraction: float, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        keep.append(idx[: max(1, math.ceil(fraction * len(idx)))])
    return torch.cat(keep).sort().values


def take(dataset: Dataset, indices: Tensor) -> Dataset:
    """The samples at ``indices``: a smaller tensor set, or a Subset of a file-backed set."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


def stratified_subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """A seeded subset with ``ceil(fraction * n_c)`` samples of every class c (so tiny fractions keep
    every class); the whole set when fraction >= 1."""
    if fraction >= 1:
        return dataset
    return take(dataset, _stratified_indices(labels_of(dataset), fraction, seed))


def split_off(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded disjoint stratified split: (the rest, a held-out ``fraction``), e.g. for validation."""
    held = _stratified_indices(labels_of(dataset), fraction, seed)
    rest = torch.ones(len(dataset), dtype=torch.bool)
    rest[held] = False
    return take(dataset, rest.nonzero().flatten()), take(dataset, held)


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of ``(x, y)`` batches; tensor sets are indexed directly (no DataLoader overhead)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        n = len(y)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                        num_workers=0)
    yield from loader


class BatchStream(Iterator[tuple[Tensor, Tensor]]):
    """Endless fresh batches, reshuffled every pass (batches never cross a pass boundary), whose position can be
    saved and restored exactly: :meth:`state` is the generator's state when the current pass started and how
    many batches of that pass were taken. A pass draws from ``generator`` when it starts (its order) and, through
    a DataLoader's sampler, when it ends; :meth:`load_state` replays the start on ``generator`` itself (so the
    end still draws from it), skips the batches taken and puts the generator's state back as it was."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator) -> None:
        self.dataset, self.batch_size, self.generator = dataset, min(batch_size, len(dataset)), generator
        self._pass: Iterator[tuple[Tensor, Tensor]] | None = None
        self._pass_state: Tensor | None = None
        self._taken = 0

    def _start(self, generator: torch.Generator) -> None:
        self._pass = batches(self.dataset, self.batch_size, generator, shuffle=True, drop_last=True)
        self._taken = 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        while True:
            if self._pass is None:
                self._pass_state = self.generator.get_state()
                self._start(self.generator)
            batch = next(self._pass, None)
            if batch is not None:
                self._taken += 1
                return batch
            self._pass = None

    def state(self) -> dict[str, Any]:
        """Where the stream is: ``{"pass_state": generator state or None (no pass started), "taken": batches}``."""
        return {"pass_state": None if self._pass is None else self._pass_state, "taken": self._taken}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where a stream of the same dataset and batch size was when it gave ``state``."""
        self._pass = None
        if state["pass_state"] is None:
            return
        now = self.generator.get_state()
        self.generator.set_state(state["pass_state"])
        self._pass_state = state["pass_state"]
        self._start(self.generator)
        for _ in range(state["taken"]):
            next(self._pass)
        self._taken = state["taken"]
        self.generator.set_state(now)


def infinite_batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> BatchStream:
    """Endless fresh batches, reshuffled every pass (batches never cross a pass boundary); resumable."""
    return BatchStream(dataset, batch_size, generator)


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
        out.append(TensorDataset(_normalise(x, spec), torch.from_numpy(labels)))
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
    x = _normalise(x, spec)
    return TensorDataset(x[order[n_test:]], y[order[n_test:]]), TensorDataset(x[order[:n_test]], y[order[:n_test]])


@DATASETS.register("fake")
def fake(spec: DomainSpec) -> Split:
    """Random noise images with random labels (10 classes): plumbing tests only, nothing to learn."""
    gen = torch.Generator().manual_seed(spec.seed)
    out = []
    for n in (spec.train_size or 200, spec.test_size or 50):
        x = torch.rand(n, spec.channels, spec.image_size, spec.image_size, generator=gen)
        out.append(TensorDataset(_normalise(x, spec), torch.randint(0, 10, (n,), generator=gen)))
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
