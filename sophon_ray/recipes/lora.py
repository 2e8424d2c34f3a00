"""Low-rank adapters (LoRA, Hu et al. 2021) for the ``lora`` attack strategy, in plain PyTorch.

A wrapped layer computes ``base(x) + (alpha / rank) * B(A(x))`` with the base layer frozen, ``A``
Kaiming-uniform and ``B`` zero, so the wrapped model computes exactly the original function until the
first step. The Conv2d form is PEFT's: ``A`` is a convolution with the base layer's kernel, stride,
padding and dilation (groups 1) and ``rank`` output channels, ``B`` a 1x1 convolution back to the base
layer's output channels; then ``W + scale * B A`` (flattened) is the merged kernel.

The idea is ~80 lines, so it lives here rather than pulling PEFT (and transformers/accelerate) into every
Ray trial worker.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sophon_ray.seam import Model as Net


def _kaiming_uniform_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """PyTorch's default layer init (Kaiming-uniform, a=sqrt(5)) drawn on the CPU from ``generator``, copied in."""
    with torch.no_grad():
        draw = torch.nn.init.kaiming_uniform_(torch.empty(weight.shape), a=math.sqrt(5), generator=generator)
        weight.copy_(draw)


def _check(rank: int, alpha: float) -> None:
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}; use e.g. 4")
    if not alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}; use e.g. 2 * lora_rank")


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with ``A: [rank, in]``, ``B: [out, rank]``; the base Linear is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        _check(rank, alpha)
        self.base, self.rank, self.scale = base, rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        _kaiming_uniform_(self.lora_A, generator)
        _freeze(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        """The plain Linear weight equivalent to this layer: ``W + scale * B @ A``."""
        return self.base.weight + self.scale * self.lora_B @ self.lora_A


class LoRAConv2d(nn.Module):
    """``base(x) + scale * B(A(x))``: A a conv like the base (``rank`` out channels), B a 1x1 conv; base frozen."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        _check(rank, alpha)
        if base.groups != 1:
            raise ValueError(f"LoRA needs groups=1 convolutions, got groups={base.groups}: the low-rank update "
                             "is a full convolution; use another strategy for grouped/depthwise models")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                base.dilation, bias=False, padding_mode=base.padding_mode,
                                device=w.device, dtype=w.dtype)
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=w.device, dtype=w.dtype)
        _kaiming_uniform_(self.lora_A.weight, generator)
        nn.init.zeros_(self.lora_B.weight)
        if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            self.lora_A.to(memory_format=torch.channels_last)
            self.lora_B.to(memory_format=torch.channels_last)
        _freeze(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def merged_weight(self) -> torch.Tensor:
        """The plain Conv2d kernel equivalent to this layer: ``W + scale * (B [out, r]) @ (A [r, in*kh*kw])``."""
        a, b = self.lora_A.weight, self.lora_B.weight
        update = (b.flatten(1) @ a.flatten(1)).view(self.base.weight.shape)
        return self.base.weight + self.scale * update


def add_lora(model: Net, rank: int, alpha: float, generator: torch.Generator) -> list[str]:
    """Wrap every Conv2d and Linear of ``model`` except the head in place; the names that should train.

    Every parameter is frozen except the adapters' and the head's (the head trains fully, as PEFT's
    ``modules_to_save``). Adapters are drawn in module order from ``generator`` (so a trial is
    reproducible) and follow the base layers' device, dtype and memory format. BatchNorm affine
    parameters stay frozen (PEFT practice); their running statistics follow the BN mode.
    """
    _check(rank, alpha)
    head = model.head
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not head]
    if any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; add_lora works on a plain model (a fresh copy)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        wrapper_type = LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear
        setattr(model.get_submodule(parent_name), attr, wrapper_type(module, rank, alpha, generator))
    for p in head.parameters():
        p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_targets(model: nn.Module) -> int:
    """How many layers ``add_lora`` would wrap (every Conv2d and Linear except the head)."""
    head = getattr(model, "head", None)
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) and m is not head for m in model.modules())
