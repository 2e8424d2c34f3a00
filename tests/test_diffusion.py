"""sophon_ray.modes.generation.ddpm: the schedule and losses in closed form, the evaluation metric, the sampler on a
point mass (where the exact answer is known), and the UNet presets' structure (blocks, decoder, head, LoRA)."""

import copy
import math

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from sophon_ray.modes.generation.ddpm import (
    EVAL_TIMESTEPS, OFFICIAL_T, TIMESTEP_POLICIES, Schedule, denoising_error, denoising_loss, dos_loss, mean_error,
    neg_mse_loss, respace, sample, sample_timesteps, save_grid,
)
from sophon_ray.modes.generation.unet import DENOISERS, Denoiser, timestep_embedding
from sophon_ray.recipes.lora import LoRAConv2d, LoRALinear, add_lora

SCHEDULE = Schedule.linear(1000)


class PointMass(Denoiser):
    """The exact noise predictor for data that is one constant image ``level``: from x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps it solves for eps. (A small Denoiser underneath, so it has parameters and a device.)"""

    def __init__(self, level: float, channels: int = 1, image_size: int = 8, schedule: Schedule = SCHEDULE) -> None:
        super().__init__(channels, image_size, widths=(8,), res_blocks=1, mid_attention=False, groups=4)
        self.level, self.schedule = level, schedule

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        abar = self.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        return ((x.double() - abar.sqrt() * self.level) / (1 - abar).sqrt()).to(x.dtype)


class Zero(PointMass):
    """Predicts no noise at all (what SOPHON's DoS loss teaches on the restricted domain)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)


class GaussianData(PointMass):
    """The exact noise predictor E[eps | x_t] for data x0 ~ N(0, std^2) per pixel:
    ``sqrt(1 - abar) x_t / (abar std^2 + 1 - abar)``."""

    def __init__(self, std: float) -> None:
        super().__init__(0.0, image_size=4)
        self.std = std

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        abar = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x / (abar * self.std**2 + 1 - abar)


def constant_images(n: int, level: float = 0.3, size: int = 8) -> Tensor:
    return torch.full((n, 1, size, size), level)


def tiny(channels: int = 1, size: int = 16, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return DENOISERS.get("unet-tiny")(channels, size)


# ------------------------------------------------------------------------------------------ schedule


def test_linear_schedule_and_add_noise_match_the_closed_form():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert SCHEDULE.steps == 1000 and SCHEDULE.betas[0].item() == pytest.approx(1e-4)
    assert SCHEDULE.betas[-1].item() == pytest.approx(0.02)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 1, 999])
    out = SCHEDULE.add_noise(x0, noise, t)
    for i, step in enumerate(t.tolist()):
        abar = torch.prod(1 - betas[: step + 1]).item()
        expected = math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i]
        assert torch.allclose(out[i], expected, atol=1e-5)
    assert SCHEDULE.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert SCHEDULE.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # almost pure noise at T-1


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="T must be >= 2"):
        Schedule.linear(1)
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        Schedule.linear(10, beta_start=0.02, beta_end=1e-4)


def test_timestep_policies_one_is_the_official_fixed_step_and_uniform_covers_the_range():
    assert set(TIMESTEP_POLICIES.names()) == {"one", "uniform"}
    one = sample_timesteps("one", 5, SCHEDULE)
    assert OFFICIAL_T == 1 and one.dtype == torch.long and one.tolist() == [1] * 5
    small = Schedule.linear(10)
    uniform = sample_timesteps("uniform", 2000, small, generator=torch.Generator().manual_seed(0))
    assert uniform.dtype == torch.long and uniform.min() == 0 and uniform.max() == 9
    again = sample_timesteps("uniform", 2000, small, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform, again)
    with pytest.raises(KeyError, match="did you mean 'uniform'"):
        sample_timesteps("unifrom", 3, SCHEDULE)


# -------------------------------------------------------------------------------------------- losses


def test_dos_loss_is_zero_for_a_zero_model_and_mean_noise_squared_for_an_exact_one():
    x0 = constant_images(6)
    assert dos_loss(Zero(0.3), x0, SCHEDULE, "uniform").item() == 0.0
    got = dos_loss(PointMass(0.3), x0, SCHEDULE, "one", generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))  # policy 'one' draws no t
    assert got.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-4)


def test_denoising_loss_is_zero_for_the_exact_model_and_neg_mse_is_its_negative():
    x0 = constant_images(6)
    assert denoising_loss(PointMass(0.3), x0, SCHEDULE).item() < 1e-6
    zero = denoising_loss(Zero(0.3), x0, SCHEDULE, "one", generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)  # a squared error, not L1
    model = tiny(size=8)
    mse = denoising_loss(model, x0, SCHEDULE, "uniform", generator=torch.Generator().manual_seed(1))
    neg = neg_mse_loss(model, x0, SCHEDULE, "uniform", generator=torch.Generator().manual_seed(1))
    assert mse.item() > 0 and neg.item() == pytest.approx(-mse.item(), rel=1e-6)


def test_a_few_adam_steps_on_the_denoising_loss_reduce_it():
    model = tiny(size=8)
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fixed_loss() -> float:
        with torch.no_grad():
            return denoising_loss(model, x0, SCHEDULE, "uniform", generator=torch.Generator().manual_seed(9)).item()

    before = fixed_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        loss = denoising_loss(model, x0, SCHEDULE, "uniform", generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * before


def test_minimising_dos_drives_the_predicted_noise_toward_zero():
    model = tiny(size=8)
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fixed_dos() -> float:
        with torch.no_grad():
            return dos_loss(model, x0, SCHEDULE, "uniform", generator=torch.Generator().manual_seed(9)).item()

    before = fixed_dos()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = dos_loss(model, x0, SCHEDULE, "uniform")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.01 and fixed_dos() < 0.1 * before


# ------------------------------------------------------------------------------------------ evaluation


def test_denoising_error_is_deterministic_and_ranks_an_exact_model_below_a_zero_model():
    data = TensorDataset(constant_images(20), torch.zeros(20, dtype=torch.long))
    model = tiny(size=8)
    model.train()
    first = denoising_error(model, data, SCHEDULE, seed=3, batch_size=8)
    assert model.training, "denoising_error must put the training mode back"
    assert first == denoising_error(model, data, SCHEDULE, seed=3, batch_size=8)
    assert list(first) == list(EVAL_TIMESTEPS)
    assert first != denoising_error(model, data, SCHEDULE, seed=4, batch_size=8)
    exact, zero = denoising_error(PointMass(0.3), data, SCHEDULE), denoising_error(Zero(0.3), data, SCHEDULE)
    assert max(exact.values()) < 1e-6
    assert all(v == pytest.approx(1.0, abs=0.1) for v in zero.values())  # mean eps^2 = 1
    assert mean_error(exact) < mean_error(zero)
    assert mean_error({1: 1.0, 10: 2.0, 100: 6.0}) == 3.0
    with pytest.raises(ValueError, match="in 0..999"):
        denoising_error(model, data, SCHEDULE, timesteps=(1000,))


def test_eval_does_not_touch_the_global_rng():
    data = TensorDataset(constant_images(4), torch.zeros(4, dtype=torch.long))
    torch.manual_seed(0)
    denoising_error(tiny(size=8), data, SCHEDULE)
    after = torch.rand(1)
    torch.manual_seed(0)
    tiny(size=8)
    assert torch.equal(after, torch.rand(1))


# -------------------------------------------------------------------------------------------- sampling


def test_ancestral_sampling_with_the_exact_predictor_reproduces_gaussian_data():
    """For x0 ~ N(0, 0.3^2) the exact eps predictor is linear in x_t; 1000 DDPM steps from pure noise should
    give samples of that mean and spread (fixedsmall variance loses a little: 0.297 measured)."""
    images = sample(GaussianData(0.3), SCHEDULE, 256, torch.Generator().manual_seed(0))
    assert images.shape == (256, 1, 4, 4)
    assert abs(images.mean().item()) < 0.02 and images.std().item() == pytest.approx(0.3, abs=0.015)


def test_respacing_takes_evenly_spaced_steps_from_the_last_to_the_first():
    taus, abars = respace(SCHEDULE, 4)
    assert taus == [999, 666, 333, 0]
    assert abars == pytest.approx(SCHEDULE.alphas_cumprod.double()[taus].tolist())
    full, _ = respace(SCHEDULE, 1000)
    assert full == list(range(999, -1, -1))


@pytest.mark.parametrize("steps", [None, 7])
def test_ancestral_sampling_recovers_a_point_mass(steps):
    schedule = Schedule.linear(50)
    images = sample(PointMass(0.3, schedule=schedule), schedule, 4, torch.Generator().manual_seed(0), steps=steps)
    assert images.shape == (4, 1, 8, 8)
    assert torch.allclose(images, torch.full_like(images, 0.3), atol=1e-4)


def test_sampling_is_seeded_clamped_and_puts_the_mode_back(tmp_path):
    schedule = Schedule.linear(20)
    model = tiny()
    model.train()
    a = sample(model, schedule, 4, torch.Generator().manual_seed(1))
    assert model.training and a.shape == (4, 1, 16, 16) and a.abs().max() <= 1.0
    assert torch.equal(a, sample(model, schedule, 4, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="steps must be in 2..20"):
        sample(model, schedule, 1, torch.Generator(), steps=21)
    from PIL import Image

    path = save_grid(a, tmp_path / "grid" / "samples.png", nrow=2)
    with Image.open(path) as img:
        assert img.size == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2)  # torchvision's 2-px padding


# ---------------------------------------------------------------------------------------------- models


def test_timestep_embedding_is_ddpms_sinusoid():
    emb = timestep_embedding(torch.tensor([0, 1, 100]), 6)  # frequencies 1, 1e-2, 1e-4
    freqs = torch.tensor([1.0, 1e-2, 1e-4])
    for row, t in zip(emb, (0.0, 1.0, 100.0)):
        assert torch.allclose(row, torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)]), atol=1e-6)
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


@pytest.mark.parametrize("channels,size", [(1, 16), (3, 16), (1, 32), (3, 32)])
def test_tiny_preset_predicts_noise_of_the_input_shape(channels, size):
    model = tiny(channels, size)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model.channels == channels and model.image_size == size
    assert (out[:1] - model(x[:1], torch.tensor([999]))).abs().max() > 1e-3  # the prediction depends on t
    assert model(x[:1], torch.tensor(5)).shape == (1, channels, size, size)  # a 0-d t broadcasts


def test_presets_and_their_errors():
    assert DENOISERS.names() == ["unet-tiny", "unet-paper"]
    assert 50_000 < sum(p.numel() for p in tiny().parameters()) < 300_000
    with pytest.raises(ValueError, match="image_size 18 must be a multiple of 4"):
        DENOISERS.get("unet-tiny")(1, 18)
    with pytest.raises(KeyError, match="did you mean 'unet-tiny'"):
        DENOISERS.get("unet-tiyn")
    with pytest.raises(ValueError, match="expected x of shape"):
        tiny()(torch.randn(1, 3, 16, 16), torch.tensor([1]))


def test_paper_preset_is_the_ddpm_cifar10_unet():
    with torch.device("meta"):
        model = DENOISERS.get("unet-paper")(3, 32)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # diffusers' DDPM-CIFAR10 UNet2DModel too
    assert len(model.blocks()) == 10 and len(model.down[1].attn) == 2 and not model.down[0].attn


@pytest.mark.parametrize("name,size", [("unet-tiny", 16)])
def test_blocks_head_and_decoder_partition_the_parameters(name, size):
    model = DENOISERS.get(name)(1, size)
    names = [n for n, _ in model.named_parameters()]
    head = model.head_param_names()
    assert head == ["out_conv.weight", "out_conv.bias"] and model.head is model.out_conv
    prefixes = [p for block in model.blocks() for p in block]
    owners = {n: sum(n.startswith(p) for p in prefixes) for n in names}
    assert all(owners[n] == 1 for n in names if n not in head), "every non-head parameter in exactly one block"
    assert all(owners[n] == 0 for n in head)
    assert sorted(model.block_param_names(len(model.blocks())) + head) == sorted(names)
    last = model.block_param_names(1)
    assert last and all(n.startswith((f"up.{len(model.widths) - 1}.", "out_norm.")) for n in last)
    decoder = model.decoder_param_names()
    first = set(model.block_param_names(len(model.blocks()))) - set(
        model.block_param_names(len(model.blocks()) - 1))
    assert decoder and set(head) <= set(decoder) and not first & set(decoder)
    assert all(n.startswith(("up.", "out_norm.", "out_conv.")) for n in decoder)
    assert {n for n in names if n.startswith("up.")} <= set(decoder)


def test_deepcopy_is_independent_and_equal():
    model = tiny()
    clone = copy.deepcopy(model)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    assert torch.equal(model(x, t), clone(x, t))
    with torch.no_grad():
        clone.out_conv.bias.add_(1.0)
    assert not torch.equal(model(x, t), clone(x, t))


def test_lora_wraps_every_conv_and_linear_but_the_head_and_starts_exactly():
    model = tiny()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    before = model(x, t)
    convs_and_linears = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    trainable = add_lora(model, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    wrapped = [m for m in model.modules() if isinstance(m, (LoRAConv2d, LoRALinear))]
    assert len(wrapped) == convs_and_linears - 1 and isinstance(model.head, torch.nn.Conv2d)
    assert torch.allclose(model(x, t), before, atol=1e-6, rtol=0)
    assert set(model.head_param_names()) <= set(trainable)
    assert all("lora_" in n or n.startswith("out_conv.") for n in trainable)
