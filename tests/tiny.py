"""Tiny shared fixtures for the core tests (small models and tensor datasets, built in milliseconds)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sophon_ray.modes.classification.models import Net


def tiny_net(bn: bool = False, classes: int = 3, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    body = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    return Net(nn.Sequential(*body), nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, classes)))


def tiny_data(n: int = 64, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 6, 6, generator=gen) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def blobs(n: int = 32, seed: int = 0, shift: float = 0.0, size: int = 8) -> TensorDataset:
    """A tiny 1-channel image set in [-1, 1] (a bright square on a dark field; ``shift`` dims the square): what the
    generation-mode tests fit denoisers on."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, size, size), -0.8) + 0.05 * torch.randn(n, 1, size, size, generator=gen)
    x[:, :, 2:5, 2:5] = 0.8 - shift
    return TensorDataset(x.clamp(-1, 1), y)
