"""DDPM maths for SOPHON's generation setting (the UNet is :mod:`.unet`): the linear schedule,
the training / suppression losses, a fixed-seed evaluation metric and an ancestral sampler.

SOPHON (IEEE S&P 2024) protects a DDPM (epsilon prediction, linear betas 1e-4..0.02, T = 1000) with the
"denial of service" suppression loss: the mean squared *predicted* noise ``eps_hat(x_t, t)^2`` on
restricted-domain images, teaching the model to refuse to denoise them (:func:`dos_loss`); the paper's
ablation maximises the plain denoising error instead (:func:`neg_mse_loss`, unbounded).

**Timesteps** are an explicit policy (:data:`TimestepPolicy`): a name (:data:`TIMESTEP_POLICIES`), a fixed
timestep t (an int) or a band [t_min, t_max] (t ~ U{t_min..t_max}, both ends included). ``"uniform"`` draws
t ~ U{0..T-1}, as DDPM training and the paper's text do. ``"one"`` (= the fixed t ``1``) is what the official code
actually runs
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
On shapes -> digits (experiments/gen_pair.py) t = 1 and 10 are the hardest steps (errors ~0.3-1.1: noise of
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

from sophon_ray.core.data import batches
from sophon_ray.registry import Registry
from sophon_ray.spec.schema import TimestepPolicy  # a name, a fixed t (an int) or a band (t_min, t_max)

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


def _fixed_or_band(policy: object) -> int | tuple[int, int] | None:
    """``policy`` as a fixed timestep (int) or a band (tuple of two ints); None when it is neither (a name or junk)."""
    if isinstance(policy, int) and not isinstance(policy, bool):
        return policy
    if (isinstance(policy, (tuple, list)) and len(policy) == 2
            and all(isinstance(t, int) and not isinstance(t, bool) for t in policy)):
        return int(policy[0]), int(policy[1])
    return None


def policy_problem(policy: object, steps: int) -> str | None:
    """Why ``policy`` is not a timestep policy of a ``steps``-step schedule, with the fix; None when it is one."""
    span = f"0..{steps - 1} (generation.timesteps is {steps})"
    forms = f"a timestep t (an integer in 0..{steps - 1}) or a band [t_min, t_max]"
    if isinstance(policy, str):
        if policy not in TIMESTEP_POLICIES:
            return f"{TIMESTEP_POLICIES.miss_message(policy)}, {forms}"
        if policy == "one" and steps <= OFFICIAL_T:
            return f"'one' is t = {OFFICIAL_T} and needs generation.timesteps > {OFFICIAL_T}, got {steps}"
        return None
    value = _fixed_or_band(policy)
    if value is None:
        return f"expected a timestep policy: {', '.join(TIMESTEP_POLICIES.names())}, {forms}; got {policy!r}"
    if isinstance(value, int):
        return None if 0 <= value < steps else f"timestep {value} is outside {span}; pick a t in that range"
    low, high = value
    if low > high:
        return f"band [{low}, {high}] has t_min > t_max; write it as [{high}, {low}]"
    if low < 0 or high >= steps:
        return f"band [{low}, {high}] reaches outside {span}; keep both ends in that range"
    return None


def normalise_policy(policy: TimestepPolicy | list[int]) -> TimestepPolicy:
    """``policy`` in a hashable, canonical form (a band as a tuple); names and fixed timesteps as they are."""
    value = _fixed_or_band(policy)
    return value if isinstance(value, tuple) else policy


def fixed_timestep(policy: TimestepPolicy) -> int | None:
    """The one timestep a policy always gives (``one``, a fixed t, a band of one step); None when it draws."""
    if policy == "one":
        return OFFICIAL_T
    value = _fixed_or_band(policy)
    if isinstance(value, tuple):
        return value[0] if value[0] == value[1] else None
    return value


def sample_timesteps(policy: TimestepPolicy, n: int, schedule: Schedule, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> Tensor:
    """``n`` timesteps [n] (long, on ``device``) under ``policy``: a :data:`TIMESTEP_POLICIES` name, a fixed t
    (every sample t; draws nothing, as ``one``) or a band [t_min, t_max] (t ~ U{t_min..t_max}). Draws come from
    ``generator`` when given (on its device), else from torch's global RNG on ``device``."""
    if isinstance(policy, str):
        return TIMESTEP_POLICIES.get(policy)(n, schedule, device, generator)
    problem = policy_problem(policy, schedule.steps)
    if problem is not None:
        raise ValueError(f"timestep policy: {problem}")
    value = _fixed_or_band(policy)
    if isinstance(value, int):
        return torch.full((n,), value, dtype=torch.long, device=device)
    low, high = value
    where = _draw_device(device, generator)
    return torch.randint(low, high + 1, (n,), generator=generator, device=where).to(device)


# ------------------------------------------------------------------------------------------------ losses


def _predict(model: nn.Module, x0: Tensor, schedule: Schedule, policy: TimestepPolicy,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Noise ``x0`` at timesteps drawn under ``policy``; return ``(eps_hat, eps)``. Noise and timesteps come
    from ``generator`` (drawn on its device, moved to x0's) or else torch's global RNG on x0's device."""
    t = sample_timesteps(policy, x0.shape[0], schedule, x0.device, generator)
    where = _draw_device(x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
    return model(schedule.add_noise(x0, noise, t), t), noise


def denoising_loss(model: nn.Module, x0: Tensor, schedule: Schedule, policy: TimestepPolicy = "uniform",
                   generator: torch.Generator | None = None) -> Tensor:
    """DDPM's simple loss: mean over pixels and batch of ``(eps_hat(x_t, t) - eps)^2`` (pretraining, normal
    training reinforcement, the attacker's fine-tuning)."""
    eps_hat, noise = _predict(model, x0, schedule, policy, generator)
    return F.mse_loss(eps_hat, noise)


def dos_loss(model: nn.Module, x0: Tensor, schedule: Schedule, policy: TimestepPolicy,
             generator: torch.Generator | None = None) -> Tensor:
    """SOPHON's denial-of-service loss: mean over pixels and batch of ``eps_hat(x_t, t)^2`` (x_t noised as in
    :func:`denoising_loss`); minimal (0) when the model predicts no noise at all. Bounded below, so it
    converges where :func:`neg_mse_loss` diverges."""
    eps_hat, _ = _predict(model, x0, schedule, policy, generator)
    return eps_hat.pow(2).mean()


def neg_mse_loss(model: nn.Module, x0: Tensor, schedule: Schedule, policy: TimestepPolicy,
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


@torch.no_grad()
def policy_error(model: nn.Module, dataset: Dataset, schedule: Schedule, policy: TimestepPolicy, seed: int = 0,
                 batch_size: int = 256) -> float:
    """Mean per-pixel ``(eps_hat(x_t, t) - eps)^2`` over ``dataset`` with one timestep per image drawn under
    ``policy`` (a band, ``uniform``): the expected DDPM loss under the policy, estimated with common random numbers
    (noise, then timesteps, per batch from a CPU generator seeded with ``seed``), so two models (or two calls) see
    the same x_t. A policy with one timestep is scored exactly by :func:`denoising_error` instead."""
    if len(dataset) == 0:
        raise ValueError("policy_error: the dataset is empty")
    device, was_training = _model_device(model), model.training
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    model.eval()
    try:
        for x0, _ in batches(dataset, batch_size, shuffle=False):
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = sample_timesteps(policy, x0.shape[0], schedule, "cpu", generator).to(device)
            x0 = x0.to(device)
            eps_hat = model(schedule.add_noise(x0, noise, t), t)
            total += float((eps_hat.float() - noise).pow(2).sum())
            count += noise.numel()
    finally:
        model.train(was_training)
    return total / count


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
