"""Training-batch augmentations for fine-tuning attacks (``attack.augment``): batch-wise and vectorised.

Each is ``(x [N, C, H, W] normalised, generator) -> x'`` of the same shape. Random parameters are drawn
on the CPU from the trial's seeded ``torch.Generator`` (so a trial is reproducible on any device) and
applied on ``x``'s device. Only training batches are augmented; evaluation never is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sophon_ray.registry import Registry

Augment = Callable[[Tensor, torch.Generator], Tensor]
AUGMENTS: Registry[Augment] = Registry("augmentation")

MAX_SHIFT = 2            # pixels, each axis
BRIGHTNESS = 0.2         # additive offset, U(-b, b), in normalised units
CONTRAST = 0.2           # scale around the image mean, U(1 - c, 1 + c)
CHANNEL_GAIN = 0.1       # per-channel multiplicative gain, U(1 - g, 1 + g)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, like: Tensor) -> Tensor:
    draw = torch.rand(shape, generator=generator) * (high - low) + low
    return draw.to(device=like.device, dtype=like.dtype)


@AUGMENTS.register("none")
def none(x: Tensor, generator: torch.Generator) -> Tensor:
    """No augmentation (the input batch itself)."""
    return x


@AUGMENTS.register("flip")
def flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flip of each image with probability 1/2."""
    mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


@AUGMENTS.register("shift")
def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random translation of each image by up to 2 px per axis (zero padding, then crop).

    Zero is the mean colour after normalisation; this is torchvision's RandomCrop(size, padding=2)."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (MAX_SHIFT,) * 4)
    rows = offsets[0].view(n, 1) + torch.arange(h, device=x.device)   # [N, H] source rows in padded
    cols = offsets[1].view(n, 1) + torch.arange(w, device=x.device)   # [N, W]
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)]    # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_format(x))


@AUGMENTS.register("colour")
def colour(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-image random contrast (around the image mean) and brightness, then a per-channel gain."""
    n, c = x.shape[:2]
    contrast = _uniform((n, 1, 1, 1), 1 - CONTRAST, 1 + CONTRAST, generator, x)
    brightness = _uniform((n, 1, 1, 1), -BRIGHTNESS, BRIGHTNESS, generator, x)
    gain = _uniform((n, c, 1, 1), 1 - CHANNEL_GAIN, 1 + CHANNEL_GAIN, generator, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness) * gain


@AUGMENTS.register("all")
def all_(x: Tensor, generator: torch.Generator) -> Tensor:
    """flip, then shift, then colour."""
    return colour(shift(flip(x, generator), generator), generator)


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def make_augment(name: str) -> Augment | None:
    """The registered augmentation ``name`` for ``train_epoch``; None for ``none`` (nothing to run)."""
    fn = AUGMENTS.get(name)
    return None if fn is none else fn
