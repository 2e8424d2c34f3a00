"""Dataset registry and splits: each loader turns a :class:`DomainSpec` into ``(train, test)`` datasets of
``(image [C,H,W] normalised float, label int)`` (the loaders are in :mod:`sophon_ray.core.datasets`); a sweep's
:class:`Splits`, stratified subsets and batch streams.

Offline sets (``shapes``, ``shapes_m``, ``digits``, ``fake``) are generated or read from installed
packages and held as tensors; torchvision sets and ``imagefolder`` read from ``root`` (default
``data/<dataset>``) and download only when ``download: true``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sophon_ray.core.datasets import DATASETS, DatasetNotFound, Split  # noqa: F401 - DatasetNotFound: public here
from sophon_ray.spec import RESTRICTED_VAL_FRACTION, DomainSpec, SweepSpec

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
