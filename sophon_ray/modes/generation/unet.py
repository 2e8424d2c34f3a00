"""The epsilon-prediction UNet of generation mode (:class:`Denoiser`) and its presets (:data:`DENOISERS`).

**The model is our own UNet, not diffusers.** diffusers 0.42.1 installs and imports offline, and its
``UNet2DModel`` builds both presets with exactly our parameter counts (the paper's DDPM-CIFAR10 layout:
35,746,307; the tiny preset: 267,313), and its layers are plain ``nn.Conv2d``/``nn.Linear`` that
:func:`sophon_ray.recipes.lora.add_lora` could wrap. Measured against this module on 2 shared cores, 1 thread,
tiny preset, batch 32, 1 x 16 x 16, alternating rounds: a training step (forward + backward + Adam) costs
~1.17x ours (median of per-round ratios; best times 112 vs 96 ms), a forward 63 vs 42 ms (median);
``from diffusers import UNet2DModel`` adds 11-14 s to a process that already imported torch (ours: 0.04
s), paid by every Ray trial worker, and it brings 6 packages more (huggingface_hub, hf-xet, httpx2,
httpcore2, regex, truststore; ~85 MB). The UNet is ~230 lines here, with parameter names chosen for the
attack strategies (:meth:`Denoiser.blocks`, :meth:`Denoiser.decoder_param_names`, :attr:`Denoiser.head`).
The schedule is also our own (:class:`Schedule`, ~20 lines): DDPMScheduler's stateful ``set_timesteps``
/ ``step`` API hides the two formulas the losses and the sampler need.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sophon_ray.recipes.surgery import last_blocks
from sophon_ray.registry import Registry


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """DDPM's sinusoidal embedding [B, dim] of integer timesteps ``t`` [B] (frequencies 1 .. 1/10000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or the largest divisor of ``channels`` below it (eps 1e-6 as DDPM)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of width ``base`` -> Linear -> SiLU -> Linear to ``dim`` (DDPM's temb MLP)."""

    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.base))


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected time embedding, GN-SiLU-dropout-conv, + (1x1-projected) input."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(t_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels with a residual (DDPM's AttnBlock); q, k, v and the output
    projection are 1x1 convolutions, so LoRA wraps them like any other conv."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the UNet: residual blocks (each followed by attention where ``attention``), then the
    resampling layer (a stride-2 conv going down, :class:`Upsample` going up; none at the end of the path)."""

    def __init__(self, res: list[ResBlock], attention: list[Attention], resample: nn.Module | None) -> None:
        super().__init__()
        if attention and len(attention) != len(res):
            raise ValueError(f"Level: {len(attention)} attention layers for {len(res)} residual blocks")
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attention)
        self.resample = resample


class Middle(nn.Module):
    """ResBlock, attention (optional), ResBlock at the lowest resolution."""

    def __init__(self, channels: int, t_dim: int, groups: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, t_dim, groups, dropout)
        self.attn = Attention(channels, groups) if attention else None
        self.res2 = ResBlock(channels, channels, t_dim, groups, dropout)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.res1(x, temb)
        x = self.attn(x) if self.attn is not None else x
        return self.res2(x, temb)


class Denoiser(nn.Module):
    """DDPM's epsilon-prediction UNet: ``forward(x [B,C,H,W], t [B] long) -> eps_hat [B,C,H,W]``.

    ``widths[i]`` channels at level i (resolution ``image_size / 2**i``), ``res_blocks`` residual blocks per
    level going down and ``res_blocks + 1`` going up (each taking one skip connection), attention after the
    residual blocks of the levels in ``attention_levels`` and (``mid_attention``) in the middle. The noise
    schedule is not part of the model (see :class:`Schedule`).

    Parameter groups for the attack strategies: :meth:`blocks` (input to output, the head excluded, like
    :meth:`sophon_ray.modes.classification.models.Net.blocks`), :meth:`decoder_param_names` (the up path and output layers),
    :meth:`head_param_names` / :attr:`head` (the final output conv).
    """

    def __init__(self, channels: int, image_size: int, widths: tuple[int, ...], res_blocks: int,
                 attention_levels: tuple[int, ...] = (), mid_attention: bool = True, groups: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        levels = len(widths)
        if channels < 1:
            raise ValueError(f"Denoiser: channels must be >= 1, got {channels}")
        if levels < 1 or res_blocks < 1:
            raise ValueError(f"Denoiser: needs >= 1 level and >= 1 residual block, got widths={widths}, "
                             f"res_blocks={res_blocks}")
        if image_size < 2 ** (levels - 1) or image_size % 2 ** (levels - 1):
            raise ValueError(f"Denoiser: image_size {image_size} must be a multiple of {2 ** (levels - 1)} "
                             f"(the {levels} levels halve it {levels - 1} times); use e.g. 16 or 32")
        bad = [i for i in attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"Denoiser: attention_levels {bad} outside 0..{levels - 1}")
        self.channels, self.image_size = channels, image_size
        self.widths, self.res_blocks = tuple(widths), res_blocks
        t_dim = 4 * widths[0]

        self.time = TimeEmbedding(widths[0], t_dim)
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        skips, c = [widths[0]], widths[0]
        down: list[Level] = []
        for i, w in enumerate(widths):
            res = [ResBlock(c if j == 0 else w, w, t_dim, groups, dropout) for j in range(res_blocks)]
            attn = [Attention(w, groups) for _ in res] if i in attention_levels else []
            last = i == levels - 1
            down.append(Level(res, attn, None if last else nn.Conv2d(w, w, 3, stride=2, padding=1)))
            skips += [w] * (res_blocks + (0 if last else 1))
            c = w
        self.down = nn.ModuleList(down)
        self.mid = Middle(c, t_dim, groups, dropout, mid_attention)
        up: list[Level] = []
        for i in reversed(range(levels)):
            w = widths[i]
            res = []
            for _ in range(res_blocks + 1):
                res.append(ResBlock(c + skips.pop(), w, t_dim, groups, dropout))
                c = w
            attn = [Attention(w, groups) for _ in res] if i in attention_levels else []
            up.append(Level(res, attn, Upsample(w) if i > 0 else None))
        self.up = nn.ModuleList(up)
        self.out_norm = _norm(c, groups)
        self.out_conv = nn.Conv2d(c, channels, 3, padding=1)
        self._blocks = self._check_blocks(
            [["time.", "conv_in."]] + [[f"down.{i}."] for i in range(levels)] + [["mid."]]
            + [[f"up.{i}."] for i in range(levels - 1)] + [[f"up.{levels - 1}.", "out_norm."]])

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Denoiser: expected x of shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        temb = self.time(t)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = res(h, temb)
                h = level.attn[j](h) if len(level.attn) else h
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)
        h = self.mid(h, temb)
        for level in self.up:
            for j, res in enumerate(level.res):
                h = res(torch.cat([h, hs.pop()], dim=1), temb)
                h = level.attn[j](h) if len(level.attn) else h
            if level.resample is not None:
                h = level.resample(h)
        return self.out_conv(F.silu(self.out_norm(h)))

    @property
    def head(self) -> nn.Conv2d:
        """The final output conv (what LoRA leaves fully trainable and ``initfc``-style strategies reset)."""
        return self.out_conv

    def head_param_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("out_conv.")]

    def decoder_param_names(self) -> list[str]:
        """The up path (every up level, upsampling included) and the output layers (norm + conv): what a
        "decoder only" attacker trains. The middle block counts as the bottleneck, not the decoder."""
        return [n for n, _ in self.named_parameters() if n.startswith(("up.", "out_norm.", "out_conv."))]

    def blocks(self) -> list[list[str]]:
        """Parameter-name prefixes (ending in '.') of each block, input to output: the stem (time embedding
        MLP + input conv), each down level, the middle, each up level (the last one with the output norm).

        Together they cover every parameter except the head's (:meth:`head_param_names`) exactly once, as
        :meth:`sophon_ray.modes.classification.models.Net.blocks` does, so ``last-k`` trains ``block_param_names(k)`` + the head.
        """
        return [list(b) for b in self._blocks]

    def block_param_names(self, k: int) -> list[str]:
        """Names of the parameters of the last ``k`` blocks (0 <= k <= number of blocks)."""

        return last_blocks(self, self._blocks, k)

    def _check_blocks(self, blocks: list[list[str]]) -> list[list[str]]:
        flat = tuple(p for block in blocks for p in block)
        owners = {n: [p for p in flat if n.startswith(p)] for n, _ in self.named_parameters()
                  if not n.startswith("out_conv.")}
        bad = sorted(n for n, o in owners.items() if len(o) != 1)
        if bad:
            raise ValueError(f"Denoiser blocks must cover every non-head parameter exactly once; wrong for {bad[:5]}")
        return blocks


DENOISERS: Registry[Callable[[int, int], Denoiser]] = Registry("denoiser")


@DENOISERS.register("unet-tiny")
def unet_tiny(channels: int, image_size: int) -> Denoiser:
    """Tiny DDPM UNet for CPU runs: widths 16/32/32, 1 res block per level, attention in the middle only,
    GroupNorm 8; image_size a multiple of 4. 267k parameters at 1 channel: the DDPM layout puts 2 res
    blocks per up level (each taking a skip, so 48-64 input channels) and 2 in the middle; diffusers'
    UNet2DModel with the same settings has the same count."""
    return Denoiser(channels, image_size, widths=(16, 32, 32), res_blocks=1, attention_levels=(),
                    mid_attention=True, groups=8, dropout=0.0)


@DENOISERS.register("unet-paper")
def unet_paper(channels: int, image_size: int) -> Denoiser:
    """The paper's DDPM-CIFAR10 UNet: widths 128/256/256/256, 2 res blocks, attention at level 1 (16x16 at
    32 px) and in the middle, GroupNorm 32, dropout 0.1 (35.7M parameters at 3 channels)."""
    return Denoiser(channels, image_size, widths=(128, 256, 256, 256), res_blocks=2, attention_levels=(1,),
                    mid_attention=True, groups=32, dropout=0.1)


def build_denoiser(name: str, channels: int, image_size: int) -> Denoiser:
    """``DENOISERS.get(name)(channels, image_size)``; KeyError naming the allowed presets on a miss."""
    return DENOISERS.get(name)(channels, image_size)
