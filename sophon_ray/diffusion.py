"""DDPM building blocks for SOPHON's generation setting: an epsilon-prediction UNet, the linear schedule,
the training / suppression losses, a fixed-seed evaluation metric and an ancestral sampler.

SOPHON (IEEE S&P 2024) protects a DDPM (epsilon prediction, linear betas 1e-4..0.02, T = 1000) with the
"denial of service" suppression loss: the mean squared *predicted* noise ``eps_hat(x_t, t)^2`` on
restricted-domain images, teaching the model to refuse to denoise them (:func:`dos_loss`); the paper's
ablation maximises the plain denoising error instead (:func:`neg_mse_loss`, unbounded).

**The model is our own UNet, not diffusers.** diffusers 0.42.1 installs and imports offline, and its
``UNet2DModel`` builds both presets with exactly our parameter counts (the paper's DDPM-CIFAR10 layout:
35,746,307; the tiny preset: 267,313), and its layers are plain ``nn.Conv2d``/``nn.Linear`` that
:func:`sophon_ray.lora.add_lora` could wrap. Measured against this module on 2 shared cores, 1 thread,
tiny preset, batch 32, 1 x 16 x 16, alternating rounds: a training step (forward + backward + Adam) costs
~1.17x ours (median of per-round ratios; best times 112 vs 96 ms), a forward 63 vs 42 ms (median);
``from diffusers import UNet2DModel`` adds 11-14 s to a process that already imported torch (ours: 0.04
s), paid by every Ray trial worker, and it brings 6 packages more (huggingface_hub, hf-xet, httpx2,
httpcore2, regex, truststore; ~85 MB). The UNet is ~230 lines here, with parameter names chosen for the
attack strategies (:meth:`Denoiser.blocks`, :meth:`Denoiser.decoder_param_names`, :attr:`Denoiser.head`).
The schedule is also our own (:class:`Schedule`, ~20 lines): DDPMScheduler's stateful ``set_timesteps``
/ ``step`` API hides the two formulas the losses and the sampler need.

**Timesteps** are an explicit policy (:data:`TIMESTEP_POLICIES`). ``"uniform"`` draws t ~ U{0..T-1}, as
DDPM training and the paper's text do. ``"one"`` is what the official code actually runs
(github.com/Sophon-NonFinetunableLearning/Sophon, ``generation/diffusion_model/diffusion_methods/ddpm.py``):
both ``DDPMTester.forward`` and ``DDPMTrainer.forward`` draw ``t = torch.randint(1, 2, ...)``, i.e. t = 1 for
every sample (DDPMTrainer keeps ``torch.randint(0, self.t, ...)`` commented out above it), and ``t`` is a
0-based index (``extract`` gathers from 1000-entry tensors built by ``torch.linspace(1e-4, 0.02, 1000)``),
so x_t = sqrt(abar[1]) x0 + sqrt(1 - abar[1]) eps with abar[1] = (1 - 1e-4)(1 - 1.1992e-4) ~ 0.99978, noise
std ~ 0.015. ``generation/denial_service_loss.py`` (DoS) and ``mean_squared_loss.py`` (the negative-MSE
ablation) use ``config.tester`` (DDPMTester) for the MAML query/support losses, the original-domain
reinforcement and their fine-tuning tests; ``train_diffusion_model.py`` and
``combined_denoise_maml_diffusion_celeba.py`` use ``config.trainer`` (DDPMTrainer): t = 1 as well. (The
``config/`` modules that bind trainer/tester are not in the repository; these two are its only
noising classes.)

**Evaluation** (:func:`denoising_error`) is the denoising MSE at :data:`EVAL_TIMESTEPS` = (1, 10, 100, 250,
500) with seeded noise. t = 1 is the official code's training and test step (so a model protected with
``"one"`` is scored where it was trained); 10..500 spread over the range where the image still matters:
abar = 0.998, 0.895, 0.521, 0.078 (signal-to-noise 450 down to 0.085). Beyond ~600 x_t is nearly pure
noise (abar(750) = 0.0033), eps_hat ~ x_t scores ~0 for any model and says nothing about the domain.
On shapes -> digits (bench/gen_pair.py) t = 1 and 10 are the hardest steps (errors ~0.3-1.1: noise of
std 0.015 / 0.047 is hard to tell from the images' own fine structure) and separate pretrained from
scratch models least (normal/scratch 0.85-1.0 at t = 1), 100..500 most (0.19-0.82); the unweighted mean
(:func:`mean_error`) is dominated by the small steps.

**Sampling** (:func:`sample`) is DDPM's ancestral sampler (fixedsmall variance, x_0 clipped). All 1000
steps take ~33 s for 16 images with the tiny preset on 1 CPU thread, hence ``steps``: the respaced chain
(:func:`respace`), 100 steps ~2.7 s. With the exact noise predictor for Gaussian data of std 0.3 (the
tests), 1000 steps give std 0.297, 100 steps 0.270, 10 steps 0.165 (fixedsmall loses variance on big jumps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sophon_ray.data import batches
from sophon_ray.registry import Registry

# ----------------------------------------------------------------------------------------------- the model


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
    :meth:`sophon_ray.models.Net.blocks`), :meth:`decoder_param_names` (the up path and output layers),
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
        :meth:`sophon_ray.models.Net.blocks` does, so ``last-k`` trains ``block_param_names(k)`` + the head.
        """
        return [list(b) for b in self._blocks]

    def block_param_names(self, k: int) -> list[str]:
        """Names of the parameters of the last ``k`` blocks (0 <= k <= number of blocks)."""
        from sophon_ray.models import last_blocks  # noqa: PLC0415 - models imports this module lazily

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


# ------------------------------------------------------------------------------------------- the schedule


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete DDPM noise schedule: ``steps`` (T) timesteps indexed 0..T-1, ``betas`` [T] and
    ``alphas_cumprod`` [T] (float32, CPU; computed in float64), ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)``.

    Kept apart from the model so that a checkpoint holds weights only and every loss, metric and sampler
    states the schedule it uses.
    """

    steps: int
    betas: Tensor
    alphas_cumprod: Tensor

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """DDPM's linear schedule: betas evenly spaced from ``beta_start`` (t = 0) to ``beta_end`` (t = T-1)."""
        if T < 2:
            raise ValueError(f"Schedule.linear: T must be >= 2, got {T}; DDPM uses 1000")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"Schedule.linear: need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(T, betas.float(), torch.cumprod(1.0 - betas, dim=0).float())

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) sample: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, ``t`` [B] long, 0..T-1."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


# ------------------------------------------------------------------------------------------ timesteps

OFFICIAL_T = 1  # the official code's fixed timestep, a 0-based index into its 1000-step schedule (docstring)
TIMESTEP_POLICIES: Registry[Callable[..., Tensor]] = Registry("timestep policy")


def _draw_device(device: torch.device | str, generator: torch.Generator | None) -> torch.device:
    """Where to draw random numbers: the generator's device when one is given (torch requires it), else ``device``."""
    return generator.device if generator is not None else torch.device(device)


@TIMESTEP_POLICIES.register("one")
def _one(n: int, schedule: Schedule, device: torch.device | str, generator: torch.Generator | None) -> Tensor:
    """t = 1 for every sample: the official SOPHON code's fixed timestep (torch.randint(1, 2))."""
    if schedule.steps <= OFFICIAL_T:
        raise ValueError(f"timestep policy 'one' needs a schedule of > {OFFICIAL_T} steps, got {schedule.steps}")
    return torch.full((n,), OFFICIAL_T, dtype=torch.long, device=device)


@TIMESTEP_POLICIES.register("uniform")
def _uniform(n: int, schedule: Schedule, device: torch.device | str, generator: torch.Generator | None) -> Tensor:
    """t ~ U{0..T-1} per sample: DDPM training and the paper's text."""
    where = _draw_device(device, generator)
    return torch.randint(0, schedule.steps, (n,), generator=generator, device=where).to(device)


def sample_timesteps(policy: str, n: int, schedule: Schedule, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> Tensor:
    """``n`` timesteps [n] (long, on ``device``) under ``policy`` (a :data:`TIMESTEP_POLICIES` name), drawn
    from ``generator`` when given, else from torch's global RNG on ``device``."""
    return TIMESTEP_POLICIES.get(policy)(n, schedule, device, generator)


# ------------------------------------------------------------------------------------------------ losses


def _predict(model: nn.Module, x0: Tensor, schedule: Schedule, policy: str,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Noise ``x0`` at timesteps drawn under ``policy``; return ``(eps_hat, eps)``. Noise and timesteps come
    from ``generator`` (drawn on its device, moved to x0's) or else torch's global RNG on x0's device."""
    t = sample_timesteps(policy, x0.shape[0], schedule, x0.device, generator)
    where = _draw_device(x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
    return model(schedule.add_noise(x0, noise, t), t), noise


def denoising_loss(model: nn.Module, x0: Tensor, schedule: Schedule, policy: str = "uniform",
                   generator: torch.Generator | None = None) -> Tensor:
    """DDPM's simple loss: mean over pixels and batch of ``(eps_hat(x_t, t) - eps)^2`` (pretraining, normal
    training reinforcement, the attacker's fine-tuning)."""
    eps_hat, noise = _predict(model, x0, schedule, policy, generator)
    return F.mse_loss(eps_hat, noise)


def dos_loss(model: nn.Module, x0: Tensor, schedule: Schedule, policy: str,
             generator: torch.Generator | None = None) -> Tensor:
    """SOPHON's denial-of-service loss: mean over pixels and batch of ``eps_hat(x_t, t)^2`` (x_t noised as in
    :func:`denoising_loss`); minimal (0) when the model predicts no noise at all. Bounded below, so it
    converges where :func:`neg_mse_loss` diverges."""
    eps_hat, _ = _predict(model, x0, schedule, policy, generator)
    return eps_hat.pow(2).mean()


def neg_mse_loss(model: nn.Module, x0: Tensor, schedule: Schedule, policy: str,
                 generator: torch.Generator | None = None) -> Tensor:
    """Minus :func:`denoising_loss`: the paper's ablation (maximise the denoising error; unbounded below)."""
    return -denoising_loss(model, x0, schedule, policy, generator)


# -------------------------------------------------------------------------------------------- evaluation

EVAL_TIMESTEPS = (1, 10, 100, 250, 500)


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def denoising_error(model: nn.Module, dataset: Dataset, schedule: Schedule,
                    timesteps: Iterable[int] = EVAL_TIMESTEPS, seed: int = 0,
                    batch_size: int = 256) -> dict[int, float]:
    """Mean per-pixel ``(eps_hat(x_t, t) - eps)^2`` over ``dataset`` at each fixed timestep: ``{t: mse}``.

    ``dataset`` yields ``(x in [-1, 1], label)`` (labels ignored). The noise comes from a CPU generator seeded
    with ``seed`` (one draw per batch, shared by every timestep: common random numbers, so differences
    between timesteps and between models are not sampling noise): two calls with the same model, data,
    seed and batch size give identical numbers (and the same noise on any device). Runs in eval mode without
    gradients and puts the model's training mode back.
    """
    steps = [int(t) for t in timesteps]
    bad = [t for t in steps if not 0 <= t < schedule.steps]
    if not steps or bad:
        raise ValueError(f"denoising_error: timesteps must be non-empty and in 0..{schedule.steps - 1}, "
                         f"got {steps}")
    if len(dataset) == 0:
        raise ValueError("denoising_error: the dataset is empty")
    device, was_training = _model_device(model), model.training
    generator = torch.Generator().manual_seed(seed)
    totals = {t: 0.0 for t in steps}
    count = 0
    model.eval()
    try:
        for x0, _ in batches(dataset, batch_size, shuffle=False):
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x0 = x0.to(device)
            for t in steps:
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                eps_hat = model(schedule.add_noise(x0, noise, tt), tt)
                totals[t] += float((eps_hat.float() - noise).pow(2).sum())
            count += noise.numel()
    finally:
        model.train(was_training)
    return {t: totals[t] / count for t in steps}


def mean_error(errors: dict[int, float]) -> float:
    """The unweighted mean over timesteps of a :func:`denoising_error` result: one number per model."""
    if not errors:
        raise ValueError("mean_error: no timesteps in the result")
    return sum(errors.values()) / len(errors)


# ---------------------------------------------------------------------------------------------- sampling


def respace(schedule: Schedule, steps: int) -> tuple[list[int], list[float]]:
    """``steps`` evenly spaced timesteps from T-1 down to 0 and their ``abar``, in sampling order. The chain
    through them has betas ``1 - abar[tau_i] / abar[tau_(i-1)]`` (Nichol & Dhariwal 2021's respacing); all
    T steps give the schedule's own chain."""
    if not 2 <= steps <= schedule.steps:
        raise ValueError(f"sample: steps must be in 2..{schedule.steps}, got {steps}")
    taus = torch.linspace(0, schedule.steps - 1, steps, dtype=torch.float64).round().long().flip(0)
    return taus.tolist(), schedule.alphas_cumprod.double()[taus].tolist()


@torch.no_grad()
def sample(model: nn.Module, schedule: Schedule, n: int, generator: torch.Generator,
           device: torch.device | str = "cpu", steps: int | None = None) -> Tensor:
    """``n`` images [n, C, H, W] in [-1, 1] by DDPM ancestral sampling from pure noise.

    Each step predicts x_0 from eps_hat (clamped to [-1, 1], as DDPM and the official code do), takes the
    posterior mean of q(x_{t-1} | x_t, x_0) and adds noise of the posterior variance ("fixedsmall"), none
    at the last step. ``steps`` (default all T) runs the respaced chain on that many evenly spaced
    timesteps (same sampler, larger jumps): cheaper previews at some cost in sample quality. Noise comes
    from ``generator`` (drawn on its device). Eval mode; the training mode is put back.
    """
    taus, abars = respace(schedule, steps or schedule.steps)
    c, size = int(model.channels), int(model.image_size)
    where = generator.device
    x = torch.randn((n, c, size, size), generator=generator, device=where).to(device)
    was_training = model.training
    model.eval()
    try:
        for i, (t, a_bar) in enumerate(zip(taus, abars)):
            last = i + 1 == len(taus)
            a_prev = 1.0 if last else abars[i + 1]
            alpha = a_bar / a_prev
            beta = 1.0 - alpha
            eps = model(x, torch.full((n,), t, dtype=torch.long, device=device))
            x0 = ((x - math.sqrt(1.0 - a_bar) * eps) / math.sqrt(a_bar)).clamp(-1.0, 1.0)
            x = (beta * math.sqrt(a_prev) * x0 + (1.0 - a_prev) * math.sqrt(alpha) * x) / (1.0 - a_bar)
            if not last:
                std = math.sqrt(beta * (1.0 - a_prev) / (1.0 - a_bar))
                x = x + std * torch.randn(x.shape, generator=generator, device=where).to(device)
    finally:
        model.train(was_training)
    return x.clamp(-1.0, 1.0)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write ``images`` [N, C, H, W] in [-1, 1] as one PNG grid of ``nrow`` per row; returns the path."""
    from torchvision.utils import save_image  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1.0, 1.0))
    return path
