"""A timestep policy per generation stage (issue 23, deliverable 1): ``generation.fit_t`` (pretraining, NTR),
``simulate_t`` (the simulated attacker), ``attack_t`` (the real attacker and the probes), ``suppression_t`` and
``score_t``, each ``uniform``, ``one``, a fixed t or a band [t_min, t_max]; ``generation.protocol`` (``ddpm``,
``official``) fills the stages left unset.

Each policy draws what it says (uniform exactly as before), each stage's loss draws under its own policy, the
presets expand as documented, no shipped sweep's id or model keys change (and a changed stage does change the keys
it affects), validation names the field and the fix, and per-timestep skill reaches the metrics and the report.
"""

from __future__ import annotations

import copy
import math
import dataclasses
import glob
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from analysis.runs import attack_table, timestep_columns
from analysis.timesteps import timestep_rows, timestep_section
from sophon_ray import names
from sophon_ray.core import protection
from sophon_ray.core.attack import finetune
from sophon_ray.core.protection import protect
from sophon_ray.core.training import pretrain
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.modes.generation.ddpm import (Schedule, denoising_error, mean_error, policy_error,
                                              sample_timesteps)
from sophon_ray.modes.generation.task import Generation, skill
from sophon_ray.modes.generation.unet import build_denoiser
from sophon_ray.recipes import AttackConfig
from sophon_ray.run.keys import pretrain_key, protect_key, sweep_id
from sophon_ray.run.validate import load_spec, parse_spec
from sophon_ray.spec import (PROTOCOLS, TIMESTEP_STAGES, EnvironmentSpec, GenerationSpec, PretrainSpec, ProbeSpec,
                             ProtectSpec, SpecError, SweepSpec, build_spec, spec_hash, to_dict)
from tests.test_bad_input import GENERATION, GOOD
from tests.tiny import blobs

ROOT = Path(__file__).parents[1]
SIZE = 8
T = 100


# ------------------------------------------------------------------------------------------------ policies
def _old_uniform(n, schedule, device="cpu", generator=None):
    """The ``uniform`` policy as it was before the stages (a copy of the old implementation)."""
    where = generator.device if generator is not None else torch.device(device)
    return torch.randint(0, schedule.steps, (n,), generator=generator, device=where).to(device)


def test_uniform_draws_exactly_what_it_drew_before():
    schedule = Schedule.linear(T)
    for seed in (0, 1, 7):
        new = sample_timesteps("uniform", 500, schedule, generator=torch.Generator().manual_seed(seed))
        old = _old_uniform(500, schedule, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)
    torch.manual_seed(3)   # the global RNG when no generator is given
    new = sample_timesteps("uniform", 200, schedule)
    torch.manual_seed(3)
    assert torch.equal(new, _old_uniform(200, schedule))
    # the band over the whole schedule is the same distribution with the same draws
    full = sample_timesteps((0, T - 1), 500, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, _old_uniform(500, schedule, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("policy, t", [(1, 1), ("one", 1), (37, 37), (0, 0), (T - 1, T - 1)])
def test_a_fixed_t_gives_t_to_every_sample_and_draws_nothing(policy, t):
    schedule, gen = Schedule.linear(T), torch.Generator().manual_seed(5)
    state, global_state = gen.get_state(), torch.get_rng_state()
    drawn = sample_timesteps(policy, 64, schedule, generator=gen)
    assert drawn.dtype == torch.long and drawn.tolist() == [t] * 64
    assert torch.equal(gen.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)


def test_a_band_draws_inside_it_and_covers_it():
    schedule = Schedule.linear(T)
    drawn = sample_timesteps((3, 7), 2000, schedule, generator=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.long and set(drawn.tolist()) == {3, 4, 5, 6, 7}
    again = sample_timesteps([3, 7], 2000, schedule, generator=torch.Generator().manual_seed(0))   # a list too
    assert torch.equal(drawn, again)
    assert set(sample_timesteps((4, 4), 50, schedule, generator=torch.Generator()).tolist()) == {4}


@pytest.mark.parametrize("policy, match", [((7, 3), "t_min > t_max; write it as \\[3, 7\\]"),
                                           ((0, T), "reaches outside 0..99"), (T, "timestep 100 is outside 0..99"),
                                           (-1, "outside"), (True, "expected a timestep policy"),
                                           ((1, 2, 3), "expected a timestep policy")])
def test_a_bad_policy_is_refused_when_drawn(policy, match):
    with pytest.raises(ValueError, match=match):
        sample_timesteps(policy, 4, Schedule.linear(T))


# -------------------------------------------------------------------------------------------------- presets
def test_the_default_protocol_is_todays_behaviour_and_official_is_t_1_everywhere():
    default = GenerationSpec()
    assert default.protocol == "ddpm" and all(getattr(default, s) is None for s in TIMESTEP_STAGES)
    assert {s: default.stage(s) for s in TIMESTEP_STAGES} == {
        "fit_t": "uniform", "simulate_t": "uniform", "attack_t": "uniform", "suppression_t": "uniform",
        "score_t": "eval_t"}
    official = GenerationSpec(protocol="official")
    assert {s: official.stage(s) for s in TIMESTEP_STAGES} == dict.fromkeys(TIMESTEP_STAGES, 1)
    assert set(PROTOCOLS) == {"ddpm", "official"}
    # an explicit stage wins over the protocol; the rest still come from it
    mixed = GenerationSpec(protocol="official", attack_t="uniform", score_t=[1, 500])
    assert mixed.stage("attack_t") == "uniform" and mixed.stage("score_t") == (1, 500)
    assert mixed.stage("fit_t") == mixed.stage("simulate_t") == mixed.stage("suppression_t") == 1
    assert mixed.resolved() == dataclasses.replace(mixed, fit_t=1, simulate_t=1, suppression_t=1, score_t=(1, 500))
    with pytest.raises(KeyError, match="allowed: fit_t"):
        default.stage("fit")


def test_the_task_binds_each_stage_to_its_policy_once():
    task = _task(protocol="official", attack_t=[5, 9])
    assert task.settings.fit_t == 1 and task.settings.suppression_t == 1 and task.settings.score_t == 1
    assert task.fitting("fit").policy == 1 and task.fitting("simulate").policy == 1
    assert task.fitting("attack").policy == (5, 9) and task.suppression("dos").policy == 1
    assert task.fitting("simulate") is task.fitting("simulate")   # one object: a stable simulation cache key
    banded = task.suppression("dos", [2, 3])
    assert banded.policy == (2, 3) and banded == task.suppression("dos", (2, 3))
    with pytest.raises(ValueError, match="unknown fitting stage 'pretrain'"):
        task.fitting("pretrain")
    with pytest.raises(ValueError, match="t_min > t_max"):
        task.suppression("dos", (9, 5))
    # classification has one fitting loss for every stage and refuses an unknown one
    assert all(CLASSIFICATION.fitting(s) == CLASSIFICATION.fit_loss for s in ("fit", "simulate", "attack"))
    with pytest.raises(ValueError, match="unknown fitting stage"):
        CLASSIFICATION.fitting("probe")


# ------------------------------------------------------------------------------------ each stage's own policy
def _task(**settings) -> Generation:
    return Generation.of(SweepSpec(mode="generation", generation=GenerationSpec(
        timesteps=T, eval_t=(1, 10, 50), samples=0, **settings)))






def _timesteps(drawn) -> set[int]:
    return {int(t) for _, ts in drawn for t in ts}


STAGED = dict(fit_t=11, simulate_t=22, attack_t=33, suppression_t=44, score_t=55)


def test_pretraining_fits_at_fit_t(drawn):
    torch.manual_seed(0)
    pretrain(build_denoiser("unet-tiny", 1, SIZE), blobs(), blobs(16, 1), PretrainSpec(epochs=1, batch_size=16),
             task=_task(**STAGED))
    assert drawn and _timesteps(drawn) == {11} and {p for p, _ in drawn} == {11}


def test_the_attacker_fits_at_attack_t(drawn):
    """The brief's example: attack_t [1, 1] with every other stage uniform: the attacker's fine-tuning draws t = 1
    only (and scoring at eval_t draws nothing)."""
    torch.manual_seed(0)
    config = AttackConfig("direct-all", "adam", 1e-3, 16, epochs=2)
    finetune(build_denoiser("unet-tiny", 1, SIZE), blobs(), blobs(16, 1), config, task=_task(attack_t=[1, 1]))
    assert drawn and {p for p, _ in drawn} == {(1, 1)} and _timesteps(drawn) == {1}
    drawn.clear()
    finetune(build_denoiser("unet-tiny", 1, SIZE), blobs(), blobs(16, 1), config, task=_task(**STAGED))
    assert _timesteps(drawn) == {33}
    drawn.clear()   # warm-starting on allowed data is the attacker's training too
    finetune(build_denoiser("unet-tiny", 1, SIZE), blobs(), blobs(16, 1),
             dataclasses.replace(config, epochs=1, warm_start="original", warm_epochs=1), task=_task(**STAGED),
             warm=blobs(16, 2))
    assert _timesteps(drawn) == {33}


def _protect(task: Generation, model, on_metrics=None, **changes) -> None:
    original, restricted = blobs(32, 0), blobs(32, 1, shift=1.4)
    spec = ProtectSpec(loss="dos", iterations=2, inner_steps=1, base_lr=1e-3, alpha=1, beta=1, ntr_steps=1,
                       batch_size=8, query_fraction=0.5, max_drop=1000, select_drop=1000, eval_every=1, probe_every=2,
                       probe_epochs=1, probes=(ProbeSpec("direct-all", "adam", 1e-3, 8, 0.25),),
                       environments=EnvironmentSpec(optimizers=("sgd",), lr=(1e-4, 1e-4)), checkpoint_every=0)
    protect(model, original, original, [restricted], [restricted], dataclasses.replace(spec, **changes), 0.0,
            on_metrics=on_metrics, task=task)


def test_the_protection_runs_each_stage_at_its_own_policy(drawn):
    """NTR at fit_t, the simulated attacker's support step at simulate_t, its query (suppression) at suppression_t,
    the probes (attacks) at attack_t; each counted: 2 iterations x 1 inner step x 1 NTR step."""
    torch.manual_seed(0)
    _protect(_task(**STAGED), build_denoiser("unet-tiny", 1, SIZE))
    counts = pd.Series([p for p, _ in drawn]).value_counts().to_dict()
    assert set(counts) == {11, 22, 33, 44}
    assert counts[11] == counts[22] == counts[44] == 2 and counts[33] >= 1
    assert all(bool((ts == p).all()) for p, ts in drawn)
    drawn.clear()   # today's default: everything uniform
    _protect(_task(), build_denoiser("unet-tiny", 1, SIZE))
    assert {p for p, _ in drawn} == {"uniform"}


def test_the_simulated_attacker_gets_one_fit_object_for_every_iteration(monkeypatch):
    """The simulation keys its captured CUDA-graph step by the fit loss: the protection passes the same object (the
    simulate stage's) every iteration."""
    seen = []
    real = protection.simulate

    def spy(*args, fit, **kwargs):
        seen.append(fit)
        return real(*args, fit=fit, **kwargs)

    monkeypatch.setattr(protection, "simulate", spy)
    task = _task(simulate_t=[5, 20])
    torch.manual_seed(0)
    _protect(task, build_denoiser("unet-tiny", 1, SIZE), iterations=3, probe_every=3)
    assert len(seen) == 3 and all(f is task.fitting("simulate") for f in seen)
    assert seen[0].policy == (5, 20)


def test_the_score_follows_score_t():
    model, data = build_denoiser("unet-tiny", 1, SIZE), blobs(24)
    schedule = Schedule.linear(T)
    at_eval = denoising_error(model, data, schedule, (1, 10, 50))
    default = _task().evaluate(model, data)
    assert default.loss == pytest.approx(mean_error(at_eval)) and default.score == pytest.approx(skill(default.loss))
    fixed = _task(score_t=55).evaluate(model, data)
    assert fixed.loss == pytest.approx(denoising_error(model, data, schedule, (55,))[55])
    assert _task(protocol="official").evaluate(model, data).loss == pytest.approx(at_eval[1])
    band = _task(score_t=[20, 80]).evaluate(model, data)
    assert band.loss == pytest.approx(policy_error(model, data, schedule, (20, 80)))
    assert band.loss == _task(score_t=[20, 80]).evaluate(model, data).loss   # seeded: the same x_t every time
    assert all(band.loss != pytest.approx(v) for v in at_eval.values())
    # whatever the score, the skill at every eval_t timestep is beside it
    for ev in (default, fixed, band):
        assert ev.detail == ({f"mse_t{t}": e for t, e in at_eval.items()}
                             | {f"skill_t{t}": skill(e) for t, e in at_eval.items()})


# ------------------------------------------------------------------------------------- per-timestep metrics
def test_protection_checks_log_the_skill_per_timestep():
    rows: list[tuple[int, dict]] = []
    torch.manual_seed(0)
    _protect(_task(), build_denoiser("unet-tiny", 1, SIZE), on_metrics=lambda it, m: rows.append((it, m)))
    checks = [m for _, m in rows if names.SKILL.original in m]
    assert len(checks) == 2   # eval_every 1, 2 iterations
    for m in checks:
        assert {f"original_skill_t{t}" for t in (1, 10, 50)} <= set(m)
        assert {f"original_mse_t{t}" for t in (1, 10, 50)} <= set(m)
        assert m["original_skill_t10"] == pytest.approx(skill(m["original_mse_t10"]))


def test_an_attack_logs_the_skill_per_timestep_before_and_after():
    rows = []
    torch.manual_seed(0)
    finetune(build_denoiser("unet-tiny", 1, SIZE), blobs(), blobs(16, 1),
             AttackConfig("direct-all", "adam", 1e-3, 16, epochs=3), task=_task(), on_epoch=lambda e, m: rows.append(m))
    per_t = {f"restricted_skill_t{t}" for t in (1, 10, 50)}
    assert [per_t <= set(r) for r in rows] == [True, False, False, True]


# -------------------------------------------------------------------------------------------------- the report
def _run(i: int, subject: str, variant: str, seed: int, per_t: dict[int, float] | None, lr: float = 0.01):
    params = {names.SUBJECT: subject, names.VARIANT: variant, names.PROTECT_SEED: "0" if variant != "-" else "-1",
              names.GRID: names.EVALUATION, names.DOMAIN: "digits", names.DATA_POOL: "disjoint",
              **{k: str(v) for k, v in AttackConfig(lr=lr, seed=seed).as_params().items()}}
    metrics = {names.SKILL.final: 10.0 + i, names.SKILL.best: 11.0 + i, names.SKILL.original: 50.0}
    metrics |= {f"restricted_skill_t{t}": v for t, v in (per_t or {}).items()}
    return SimpleNamespace(info=SimpleNamespace(run_id=f"r{i}"), data=SimpleNamespace(params=params, metrics=metrics))


def test_the_attack_table_reads_the_per_timestep_scores_and_the_report_shows_them():
    runs = [_run(0, "protected", "v", 0, {1: 5.0, 10: 20.0, 250: 1.0}),
            _run(1, "protected", "v", 1, {1: 7.0, 10: 30.0}),
            _run(2, "normal", "-", 0, {1: 60.0, 10: 70.0, 250: 40.0}), _run(3, "scratch", "-", 0, None),
            _run(4, "protected", "v", 0, {1: 9.0, 10: 5.0}, lr=0.1)]   # a second recipe (cell)
    table = attack_table(runs, metric=names.SKILL)
    assert list(table.columns[-3:]) == ["restricted_skill_t1", "restricted_skill_t10", "restricted_skill_t250"]
    assert timestep_columns(["restricted_skill_t250", "x", "restricted_skill_t1", "restricted_mse_t1"],
                            names.SKILL) == ["restricted_skill_t1", "restricted_skill_t250"]
    rows = timestep_rows(table, names.SKILL)
    mean = rows[rows["statistic"] == "mean"].set_index(names.SUBJECT)
    assert list(mean.index) == ["protected/v", "normal", "scratch"]
    # cells: seed means (6, 25, 1) and (9, 5, -); mean over the cells and the best cell
    assert mean.loc["protected/v", "cells"] == 2 and mean.loc["normal", "cells"] == 1
    assert list(mean.loc["protected/v", ["t1", "t10", "t250"]]) == [7.5, 15.0, 1.0]
    best = rows[rows["statistic"] == "best"].set_index(names.SUBJECT)
    assert list(best.loc["protected/v", ["t1", "t10", "t250"]]) == [9.0, 25.0, 1.0]
    assert mean.loc["normal", "t250"] == 40.0 and pd.isna(mean.loc["scratch", "t1"])
    text = timestep_section(rows, names.SKILL)
    assert "| protected/v | 2 | 7.5 (9.0) | 15.0 (25.0) | 1.0 (1.0) |" in text and "t = 250" in text
    assert "| normal | 1 | 60.0 (60.0) | 70.0 (70.0) | 40.0 (40.0) |" in text
    # a classification sweep (no per-timestep metrics) gets no table and no section
    plain = attack_table([_run(0, "protected", "v", 0, None)], metric=names.SKILL)
    assert timestep_rows(plain, names.SKILL).empty and timestep_section(timestep_rows(plain)) == ""


# -------------------------------------------------------------------------------------- sweep ids and keys
# sweep id, normal model key and protection keys ("variant/seed") of every shipped sweep, recorded before the stages
# existed: stored results and MLflow runs are found again by them
SHIPPED = {
    "adaptive.yaml": ("4a20da3b15cf", "c7f892d784f9", {"0/0": "db7cac5274bb", "0/1": "17488bb22f2d",
                                                       "0/2": "9917c923f2d1"}),
    # changed on purpose (2026-12-06): the paper's setting under the official protocol, never run before
    "cifar100_celeba_ddpm.yaml": ("66d6a66a28ac", "2baf8cf2ed62", {
        "0/0": "78fabb16a6c8", "0/1": "7d075bd097c8", "0/2": "dde222ef457f", "1/0": "8638435a5846",
        "1/1": "d867ab039f08", "1/2": "09cc73b9212c"}),
    "cifar10_mnist_resnet18.yaml": ("62b4744def8c", "814c4a8f080f", {"0/0": "84373b392f75"}),
    "defend.yaml": ("60631888791b", "c7f892d784f9", {
        "0/0": "6df59983aa67", "0/1": "d2d85764c76b", "0/2": "516b3fbcd749", "1/0": "9337cb482610",
        "1/1": "e4edfda10e19", "1/2": "bba411a43ced", "2/0": "ddc7c5bbb390", "2/1": "f60847397d44",
        "2/2": "b4e727f50ce2"}),
    "defend_generation.yaml": ("831afe083b19", "66c593c23486", {   # added with the stages; its dos keys are generation's
        "0/0": "073f540bc426", "0/1": "9cdc22ebc10f", "0/2": "c39d686cac5f", "1/0": "e609e639131f",
        "1/1": "9ba9cff82117", "1/2": "a50e6735070f"}),
    "defend_quickstart.yaml": ("c3b691794f2f", "c7f892d784f9", {"0/0": "be9140a71eeb", "1/0": "ad840060239b"}),
    "dos_alone.yaml": ("b81e31567730", "66c593c23486", {"0/0": "95cc8a9913f0", "0/1": "5f354992eca2",   # 2026-12-06
                                                        "0/2": "382ae551647a"}),
    "dos_official_ddpm.yaml": ("04915589f5bf", "66c593c23486", {   # added 2026-12-06 (issue 23)
        "0/0": "96dc08e282f6", "0/1": "9ddac92fe743", "0/2": "35965ff1e7ab"}),
    "dos_official_factors.yaml": ("6adcdcaed4fe", "6960a10c011d", {   # added 2026-12-06 (issue 23)
        "0/0": "727d31c32253", "0/1": "0ba7019fdc95", "0/2": "c0d66c7bf5f0", "1/0": "b11c96214e5a",
        "1/1": "9a5ada259b3f", "1/2": "151c51708ba7"}),
    "dos_official_inner.yaml": ("069b1003cc01", "6960a10c011d", {   # added 2026-12-06 (issue 23)
        "0/0": "280369c8f1b5", "0/1": "54e1ab3fb818", "0/2": "5ed2a4d23098"}),
    "dos_official_iterations.yaml": ("44aea465c43a", "6960a10c011d", {   # 2026-12-07: a third seed (issue 23)
        "0/0": "771be9465f02", "0/1": "51296894786f", "0/2": "2a9ba94da89e"}),
    "dos_official_pool.yaml": ("3cc920e265b6", "6960a10c011d", {   # 2026-12-07: a third seed (issue 23)
        "0/0": "771be9465f02", "0/1": "51296894786f", "0/2": "2a9ba94da89e"}),
    "dos_official_small.yaml": ("2ff32b213697", "6960a10c011d", {   # added 2026-12-06 (issue 23)
        "0/0": "9d37de8c5fab", "0/1": "c37125432ac8", "0/2": "aa7ad07d9872", "1/0": "2e7b493d0c25",
        "1/1": "1e5af97bba11", "1/2": "86036ce11dd4"}),
    "efficacy.yaml": ("9767085be567", "c7f892d784f9", {"0/0": "db7cac5274bb", "0/1": "17488bb22f2d",
                                                       "0/2": "9917c923f2d1", "1/0": "5eff8adc9643",
                                                       "1/1": "fba49eceead4", "1/2": "684c0bb2e271"}),
    "generation.yaml": ("0176258c39f5", "66c593c23486", {"0/0": "073f540bc426", "0/1": "9cdc22ebc10f",
                                                         "0/2": "c39d686cac5f", "1/0": "bc76cfb96e4f"}),
    "imagenette_cifar10_resnet18.yaml": ("df682082167e", "2e32468e728b", {"0/0": "42fc0315fc37",
                                                                          "1/0": "9e03442ac44e"}),
    "precondition_budget.yaml": ("32657fb170cc", "6960a10c011d", {}),   # added 2026-12-06 (issue 23)
    "precondition_official.yaml": ("b72f118b8581", "6960a10c011d", {}),   # added 2026-12-06 (issue 23)
    "quickstart.yaml": ("e44bd8b68e61", "c7f892d784f9", {"0/0": "11cdd6e86005"}),
    "quickstart_generation.yaml": ("e6e68c62360f", "66c593c23486", {"0/0": "073f540bc426"}),
    "search_quickstart.yaml": ("459b4ec81bfb", "c7f892d784f9", {"0/0": "11cdd6e86005"}),
}


def _keys(spec: SweepSpec) -> tuple[str, str, dict[str, str]]:
    return (sweep_id(spec), pretrain_key(spec),
            {f"{i}/{seed}": protect_key(spec, i, seed) for i, v in enumerate(spec.protect) for seed in v.seeds})


def test_every_shipped_sweep_is_recorded():
    assert sorted(SHIPPED) == sorted(Path(p).name for p in glob.glob(str(ROOT / "sweeps" / "*.yaml")))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_sweep_keeps_its_sweep_id_and_model_keys(name):
    spec = load_spec(ROOT / "sweeps" / name)
    assert _keys(spec) == SHIPPED[name]
    # the stages are hashed only when set: a generation section without them hashes as it did before they existed
    new = {"protocol", "fit_t", "simulate_t", "attack_t", "score_t"}
    default = type(spec.generation)()
    assert new & set(to_dict(spec.generation, hashed_only=True)) == {
        k for k in new if getattr(spec.generation, k) != getattr(default, k)}


def test_a_changed_stage_changes_the_keys_it_affects_and_no_other():
    spec = parse_spec(GENERATION)
    base = _keys(spec)

    def keys(**stages):
        return _keys(dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, **stages)))

    # written out at today's values: nothing changes
    assert keys(protocol="ddpm", fit_t="uniform", simulate_t="uniform", attack_t="uniform", suppression_t="uniform",
                score_t="eval_t") == base
    fit = keys(fit_t=1)   # the normal model, so everything
    assert fit[0] != base[0] and fit[1] != base[1] and fit[2]["0/0"] != base[2]["0/0"]
    for stage, value in (("simulate_t", 1), ("suppression_t", "one"), ("attack_t", [1, 10]), ("score_t", 1)):
        changed = keys(**{stage: value})   # the protection (probes, score, ...) and the sweep, not the normal model
        assert changed[1] == base[1] and changed[0] != base[0] and changed[2]["0/0"] != base[2]["0/0"], stage
    official = keys(protocol="official")
    assert official[0] != base[0] and official[1] == fit[1]
    assert official[2]["0/0"] not in (base[2]["0/0"], fit[2]["0/0"])
    assert official == keys(**dict.fromkeys(TIMESTEP_STAGES, 1))   # the preset is its stages
    # classification ignores the generation section: its keys stay whatever the stages say
    plain = parse_spec(GOOD)
    ignored = dataclasses.replace(plain, generation=GenerationSpec(protocol="official", fit_t=[1, 5]))
    assert _keys(ignored) == _keys(plain)


def test_the_new_fields_are_hashed_only_when_set():
    before = {"timesteps", "beta_start", "beta_end", "suppression_t", "eval_t", "eval_seed", "samples", "sample_steps",
              "sample_quality"}   # the hashed fields GenerationSpec had before the stages
    assert before <= set(to_dict(GenerationSpec(), hashed_only=True)) and not {
        "protocol", "fit_t", "simulate_t", "attack_t", "score_t"} & set(to_dict(GenerationSpec(), hashed_only=True))
    assert to_dict(GenerationSpec(fit_t=[1, 5]), hashed_only=True)["fit_t"] == [1, 5]
    assert spec_hash(GenerationSpec(protocol="official")) != spec_hash(GenerationSpec())


# ----------------------------------------------------------------------------------------- spec and validation
def test_the_spec_syntax_builds_every_policy_form():
    for value, built in (("uniform", "uniform"), ("one", "one"), (1, 1), ([1, 100], (1, 100))):
        spec, problems = build_spec({"mode": "generation", "generation": {"fit_t": value, "score_t": value}})
        assert not problems and spec.generation.fit_t == built and spec.generation.score_t == built
    spec, problems = build_spec({"generation": {"score_t": "eval_t", "protocol": "official"}})
    assert not problems and spec.generation.stage("score_t") == "eval_t" and spec.generation.stage("fit_t") == 1
    _, problems = build_spec({"generation": {"attack_t": True}})
    assert [str(p) for p in problems] == [
        "generation.attack_t: expected a string or an integer or a list of 2 values, got True"]


def _problems(generation=None, **variant) -> list[str]:
    data = copy.deepcopy(GENERATION)
    data["generation"] = generation or {}
    data["protect"][0].update(variant)
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    return [str(p) for p in err.value.problems]


def test_validation_names_the_field_and_the_fix():
    assert _problems({"fit_t": "unifrom"}) == [
        "generation.fit_t: unknown timestep policy 'unifrom' (did you mean 'uniform'?); allowed: one, uniform, a "
        "timestep t (an integer in 0..999) or a band [t_min, t_max]; or leave it out for the protocol's"]
    assert _problems({"attack_t": [100, 1]}) == [
        "generation.attack_t: band [100, 1] has t_min > t_max; write it as [1, 100]; or leave it out for the "
        "protocol's"]
    assert _problems({"simulate_t": [0, 1000]}) == [
        "generation.simulate_t: band [0, 1000] reaches outside 0..999 (generation.timesteps is 1000); keep both ends "
        "in that range; or leave it out for the protocol's"]
    assert _problems({"timesteps": 50, "eval_t": [1, 10], "sample_steps": 10, "score_t": 50}) == [
        "generation.score_t: timestep 50 is outside 0..49 (generation.timesteps is 50); pick a t in that range; or "
        "eval_t (the mean at generation.eval_t); or leave it out for the protocol's"]
    assert _problems({"suppression_t": "eval_t"})[0].startswith("generation.suppression_t: unknown timestep policy")
    assert _problems({"protocol": "oficial"}) == [
        "generation.protocol: unknown protocol 'oficial' (did you mean 'official'?); allowed: ddpm, official (it "
        "fills every timestep stage left unset)"]
    assert _problems(suppression_t=[9, 2]) == [
        "protect.0.suppression_t: band [9, 2] has t_min > t_max; write it as [2, 9]; or leave it out for "
        "generation.suppression_t"]
    for good in ({"protocol": "official"}, {"fit_t": 1, "attack_t": [1, 100], "score_t": "eval_t"},
                 {"protocol": "official", "score_t": "uniform"}):
        data = copy.deepcopy(GENERATION)
        data["generation"] = good
        parse_spec(data)
    data = copy.deepcopy(GENERATION)
    data["protect"][0]["suppression_t"] = [1, 10]
    assert parse_spec(data).protect[0].suppression_t == (1, 10)


def test_classification_ignores_the_generation_stages():
    data = copy.deepcopy(GOOD)
    data["generation"] = {"protocol": "bogus", "fit_t": [9, 2], "score_t": "nope"}
    assert parse_spec(data).generation.fit_t == (9, 2)   # ignored, as the rest of generation is


def test_the_timesteps_cli_writes_its_table_for_any_sweep(tmp_path):
    """``python -m analysis.timesteps`` needs no protected subject; a sweep without per-timestep scores (this
    classification store) gets the line that says so."""
    from analysis.timesteps import main
    from tests.store import small_sweep

    store = small_sweep(tmp_path / "store")
    out = tmp_path / "out"
    assert main(["--tracking-uri", store["uri"], "--experiment", store["experiment"], "--out", str(out)]) == 0
    assert "logged no per-timestep scores" in (out / "timesteps.md").read_text()
    assert main(["--tracking-uri", store["uri"], "--experiment", "no-such", "--out", str(out)]) == 2


def test_before_the_attack_reads_each_runs_epoch_zero():
    from analysis.timesteps import before_attack

    runs = pd.DataFrame({"run_id": ["a", "b"], "restricted_skill_t1": [50.0, 60.0]})
    out = before_attack(runs, {"restricted_skill_t1": {"a": [3.0, 50.0], "b": []}})
    assert out["restricted_skill_t1"].iloc[0] == 3.0 and math.isnan(out["restricted_skill_t1"].iloc[1])
    assert runs["restricted_skill_t1"].tolist() == [50.0, 60.0]        # the input is left as it was
