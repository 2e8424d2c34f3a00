"""Generation mode through the task seam: the same loops (finetune, simulate, protect) run a DDPM denoiser with the
generation task's losses and score, the validation refuses what does not fit, and the after-attack hook logs
sample grids and their quality."""

import dataclasses
import io

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from sophon_ray import names
from sophon_ray.core.attack import finetune, prepare
from sophon_ray.recipes import AttackConfig
from sophon_ray.modes.generation.ddpm import Schedule, denoising_error, denoising_loss, dos_loss, mean_error
from sophon_ray.modes.generation.unet import build_denoiser
from sophon_ray.recipes import strategies_for
from sophon_ray.modes.generation.task import Generation, skill
from sophon_ray.core.protection import protect
from sophon_ray.core.simulation import Environment, simulate
from sophon_ray.spec import EnvironmentSpec, GenerationSpec, ProbeSpec, ProtectSpec, SweepSpec
from sophon_ray.modes import task_for
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.run.validate import parse_spec
from tests.test_bad_input import GENERATION

SIZE = 8


def task(**settings) -> Generation:
    return Generation.of(SweepSpec(mode="generation", generation=GenerationSpec(
        timesteps=100, eval_t=(1, 10, 50), samples=settings.pop("samples", 4), sample_steps=5, **settings)))


def denoiser(seed: int = 0):
    torch.manual_seed(seed)
    return build_denoiser("unet-tiny", 1, SIZE)


def blobs(n: int = 48, seed: int = 0, shift: float = 0.0) -> TensorDataset:
    """Smooth images in [-1, 1] (a bright square on a dark ground, two classes by position)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, SIZE, SIZE), -0.8) + 0.05 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    for i in range(n):
        r = 1 if y[i] else 4
        x[i, :, r:r + 3, r:r + 3] = 0.8 - shift
    return TensorDataset(x.clamp(-1, 1), y)


def test_the_mode_picks_the_task_and_its_names():
    assert task_for(SweepSpec()) is CLASSIFICATION
    gen = task_for(SweepSpec(mode="generation"))
    assert isinstance(gen, Generation) and gen.metric is names.SKILL
    assert (gen.metric.restricted, gen.metric.restricted_loss, gen.metric.final) == (
        "restricted_skill", "restricted_mse", "restricted_skill_final")
    assert gen.losses == ("dos", "neg_mse") and "decoder" in strategies_for("generation") and "initfc-all" not in strategies_for("generation")


def test_skill_is_100_times_one_minus_the_denoising_error():
    t, model, data = task(), denoiser(), blobs()
    ev = t.evaluate(model, data)
    errors = denoising_error(model, data, t.schedule, (1, 10, 50))
    assert ev.loss == pytest.approx(mean_error(errors)) and ev.score == pytest.approx(skill(ev.loss))
    assert ev.detail == ({f"mse_t{k}": v for k, v in errors.items()}
                         | {f"skill_t{k}": skill(v) for k, v in errors.items()})
    assert skill(1.0) == 0.0 and skill(0.0) == 100.0 and skill(1.5) == -50.0


def test_fit_and_suppression_losses_are_the_diffusion_ones_and_hashable():
    t, model, x = task(suppression_t="one"), denoiser(), blobs().tensors[0][:8]
    torch.manual_seed(1)
    fit = t.fit_loss(model, x, None)
    torch.manual_seed(1)
    assert fit == denoising_loss(model, x, t.schedule, "uniform")
    torch.manual_seed(2)
    dos = t.suppression("dos")(model, x, None)
    torch.manual_seed(2)
    assert dos == dos_loss(model, x, t.schedule, "one")
    assert t.suppression("dos") == t.suppression("dos") and hash(t.suppression("dos")) == hash(t.suppression("dos"))


def test_finetune_scores_a_denoiser_with_the_generation_task():
    t, model, data = task(), denoiser(), blobs()
    rows = []
    result = finetune(model, data, data, AttackConfig("direct-all", "adam", 3e-3, 16, epochs=2), original_test=data,
                      task=t, on_epoch=lambda e, m: rows.append(m), keep_model=True)
    assert set(rows[1]) == {"restricted_skill", "restricted_mse"} and len(result.restricted) == 3
    per_t = {f"restricted_{k}_t{s}" for k in ("mse", "skill") for s in (1, 10, 50)}   # before and after only
    assert set(rows[0]) == set(rows[2]) == {"restricted_skill", "restricted_mse"} | per_t
    assert result.restricted[-1] > result.restricted[0] + 5  # denoising is learned: skill rises
    assert result.restricted_loss[-1] == pytest.approx(1 - result.restricted[-1] / 100)
    assert result.model is not None and result.original is not None


def test_the_decoder_strategy_trains_only_the_up_path():
    model = denoiser()
    params = prepare(model, AttackConfig(strategy="decoder"), torch.Generator().manual_seed(0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.decoder_param_names()) and len(params) == len(trainable)
    assert not any(n.startswith(("down.", "conv_in.", "time.")) for n in trainable)
    with pytest.raises(ValueError, match="decoder needs a denoiser"):
        prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), AttackConfig(strategy="decoder"),
                torch.Generator().manual_seed(0))


def test_simulation_runs_the_denoiser_with_the_tasks_losses():
    t, model, data = task(), denoiser(), blobs()
    batches = iter([(data.tensors[0][i:i + 12], data.tensors[1][i:i + 12]) for i in range(0, 48, 12)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sim = simulate(model, batches, Environment("adam", 1e-3, False, False), t.suppression("dos"), 3, 0.25,
                   torch.Generator().manual_seed(0), fit=t.fit_loss)
    assert set(sim.grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in sim.grads.values()) and any(g.abs().sum() > 0 for g in sim.grads.values())
    assert sim.fts_loss > 0 and sim.adversary_loss > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the real model is untouched


def test_dos_protection_lowers_restricted_skill_against_an_ntr_only_control():
    """A short real protection: with the DoS loss the restricted domain's denoising skill ends far below the same
    protection with suppression switched off (alpha ~ 0: normal-training reinforcement alone), and every metric the
    loop emits carries the generation task's names."""
    t = task()
    original, restricted = blobs(48, seed=0), blobs(48, seed=1, shift=1.4)  # dark squares: another domain
    normal = finetune(denoiser(), original, original, AttackConfig("direct-all", "adam", 3e-3, 16, epochs=2), task=t,
                      keep_model=True).model
    spec = ProtectSpec(loss="dos", iterations=8, inner_steps=2, base_lr=1e-3, alpha=3, beta=1, ntr_steps=2,
                       batch_size=16, query_fraction=0.25, max_drop=100, select_drop=100, eval_every=4, probe_every=8,
                       probe_epochs=1, probes=(ProbeSpec("direct-all", "adam", 1e-3, 16, 0.25),),
                       environments=EnvironmentSpec(optimizers=("sgd", "adam"), lr=(1e-4, 1e-3), head_reinit=0.0,
                                                    head_only=0.0), checkpoint_every=0)
    normal_original = t.evaluate(normal, original).score
    rows = []
    dos = protect(normal, original, original, [restricted], [restricted], spec, normal_original,
                  on_metrics=lambda it, m: rows.append(m), task=t)
    control = protect(normal, original, original, [restricted], [restricted], dataclasses.replace(spec, alpha=1e-9),
                      normal_original, task=t)
    keys = set().union(*rows)
    assert {"original_skill", "probe_skill", "fts_loss"} <= keys and not any(k.endswith("_acc") for k in keys)
    suppressed, kept = t.evaluate(dos.model, restricted).score, t.evaluate(control.model, restricted).score
    assert suppressed < kept - 10, (suppressed, kept)


def test_after_attack_logs_paired_sample_grids_and_their_quality():
    t, data = task(samples=4), blobs(64)
    before, after = denoiser(0), denoiser(1)
    metrics, artifacts = t.after_attack(before, after, data, data)
    assert set(artifacts) == {"samples/before.png", "samples/after.png"}
    image = Image.open(io.BytesIO(artifacts["samples/after.png"]))
    assert image.size[0] > SIZE and image.size[1] >= SIZE
    assert {"sample_kid", "sample_kid_before", "sample_confidence", "sample_class_entropy"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    again, _ = t.after_attack(before, after, data, data)  # seeded: the same images and scores
    assert again == metrics
    assert CLASSIFICATION.after_attack(before, after, data, data) == ({}, {})
    none = dataclasses.replace(t, settings=dataclasses.replace(t.settings, samples=0))
    assert none.after_attack(before, after, data, data) == ({}, {})


def test_the_bad_input_base_generation_spec_is_valid():
    spec = parse_spec(GENERATION)
    assert spec.mode == "generation" and task_for(spec).schedule.steps == 1000
    assert isinstance(task_for(spec).schedule, Schedule)


def test_dos_saturates_at_zero_where_negative_mse_keeps_falling():
    """The paper's ablation in miniature: the DoS loss is bounded below by 0 and the outer loop drives it there;
    the negative MSE is unbounded and keeps falling (the suppressed model moves ever further from the noise)."""
    t = task()
    original, restricted = blobs(48, seed=0), blobs(48, seed=1, shift=1.4)
    normal = finetune(denoiser(), original, original, AttackConfig("direct-all", "adam", 3e-3, 16, epochs=2), task=t,
                      keep_model=True).model
    spec = ProtectSpec(loss="neg_mse", iterations=12, inner_steps=2, base_lr=1e-3, alpha=3, beta=1, ntr_steps=2,
                       batch_size=16, query_fraction=0.25, max_drop=1000, select_drop=1000, eval_every=4,
                       probe_every=12, probe_epochs=1, probes=(ProbeSpec("direct-all", "adam", 1e-3, 16, 0.25),),
                       environments=EnvironmentSpec(optimizers=("sgd", "adam"), lr=(1e-4, 1e-3), head_reinit=0.0,
                                                    head_only=0.0), checkpoint_every=0)
    curves = {}
    for loss in ("neg_mse", "dos"):
        rows = []
        protect(normal, original, original, [restricted], [restricted], dataclasses.replace(spec, loss=loss),
                t.evaluate(normal, original).score, on_metrics=lambda it, m, rows=rows: rows.append(m), task=t)
        curves[loss] = [m["fts_loss"] for m in rows if "fts_loss" in m]
    dos, neg = curves["dos"], curves["neg_mse"]
    assert min(dos) >= 0 and dos[-1] < 0.1 < dos[0], dos
    assert sum(neg[-4:]) / 4 < sum(neg[:4]) / 4 - 0.3 and min(neg) < -0.8, neg
