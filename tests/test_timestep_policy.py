"""A protect variant's own timestep policy of the generation suppression losses (``protect[i].suppression_t``, and
``defend.space.suppression_t`` for a defender search): it changes no existing hash, it reaches the suppression loss
the protection trains with, validation refuses unknown names and any use in classification mode, a defender's
sampled value becomes the candidate's, and the protect run's MLflow params carry it only when set."""

import copy
import dataclasses
import glob
import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sophon_ray.core.protection import protect
from sophon_ray.modes import task_for
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.modes.generation.task import Generation
from sophon_ray.modes.generation.unet import build_denoiser
from sophon_ray.run.checkpoint import CARD, FORMAT
from sophon_ray.run.defend import candidate, candidate_key, dimensions
from sophon_ray.run.keys import protect_key, sweep_id
from sophon_ray.run.outbox import Outbox
from sophon_ray.run.stages import log_models
from sophon_ray.run.validate import load_spec, parse_spec
from sophon_ray.spec import (DefendSpace, DefendSpec, EnvironmentSpec, GenerationSpec, ProbeSpec, ProtectSpec,
                             SpecError, SweepSpec, spec_hash, to_dict)
from tests.test_bad_input import GENERATION, GOOD
from tests.tiny import blobs

ROOT = Path(__file__).parents[1]
SWEEPS = sorted(glob.glob(str(ROOT / "sweeps" / "*.yaml")))


# ------------------------------------------------------------------------------------------ hashes unchanged
def _without(cls: type, name: str) -> type:
    """``cls`` as it was before the field ``name`` was added (same name, fields, defaults and hash metadata)."""
    kept = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                               metadata=f.metadata))
            for f in fields(cls) if f.name != name]
    return dataclasses.make_dataclass(cls.__name__, kept, frozen=True)


OLD_PROTECT, OLD_SPACE = _without(ProtectSpec, "suppression_t"), _without(DefendSpace, "suppression_t")


def _old(v: ProtectSpec):
    """A variant (without a policy) as the old classes held it."""
    assert v.suppression_t is None and (v.defend is None or v.defend.space.suppression_t is None)
    values = {f.name: getattr(v, f.name) for f in fields(OLD_PROTECT)}
    if v.defend is not None:
        space = OLD_SPACE(**{f.name: getattr(v.defend.space, f.name) for f in fields(OLD_SPACE)})
        values["defend"] = dataclasses.replace(v.defend, space=space)
    return OLD_PROTECT(**values)


def test_the_new_fields_are_hashed_only_when_set():
    assert {f.name: f.default for f in fields(ProtectSpec)}["suppression_t"] is None
    assert DefendSpace().suppression_t is None
    for v in (ProtectSpec(), ProtectSpec(loss="dos", defend=DefendSpec(space=DefendSpace(alpha=(1.0, 3.0))))):
        assert "suppression_t" not in to_dict(v, hashed_only=True)
        assert to_dict(v, hashed_only=True) == to_dict(_old(v), hashed_only=True)
        assert spec_hash(v) == spec_hash(_old(v)) and candidate_key(v) == spec_hash(to_dict(_old(v), True))
    set_ = ProtectSpec(loss="dos", suppression_t="one")
    assert to_dict(set_, hashed_only=True)["suppression_t"] == "one" and spec_hash(set_) != spec_hash(ProtectSpec(loss="dos"))
    searched = ProtectSpec(defend=DefendSpec(space=DefendSpace(suppression_t=("one", "uniform"))))
    assert to_dict(searched, hashed_only=True)["defend"]["space"]["suppression_t"] == ["one", "uniform"]
    assert "suppression_t" not in to_dict(ProtectSpec(defend=DefendSpec()), hashed_only=True)["defend"]["space"]


def _uses_a_policy(path: str) -> bool:
    return any(v.suppression_t is not None or (v.defend is not None and v.defend.space.suppression_t is not None)
               for v in load_spec(path).protect)


@pytest.mark.parametrize("path", [p for p in SWEEPS if not _uses_a_policy(p)], ids=lambda p: Path(p).name)
def test_every_shipped_sweep_keeps_its_sweep_id_and_protection_keys(path):
    """The sweep id and every protection key of each sweeps/*.yaml are what the classes without the new fields
    give (so stored results and MLflow runs are found again)."""
    spec = load_spec(path)
    old = dataclasses.replace(spec, protect=tuple(_old(v) for v in spec.protect))
    assert sweep_id(spec) == sweep_id(old) and spec_hash(spec) == spec_hash(old)
    for i, v in enumerate(spec.protect):
        for seed in v.seeds:
            assert protect_key(spec, i, seed) == protect_key(old, i, seed)
        assert candidate_key(v) == spec_hash(to_dict(_old(v), True))


def test_a_policy_changes_the_protection_key():
    spec = parse_spec(GENERATION)
    other = dataclasses.replace(spec, protect=(dataclasses.replace(spec.protect[0], suppression_t="one"),))
    assert protect_key(other, 0, 0) != protect_key(spec, 0, 0) and sweep_id(other) != sweep_id(spec)


# ------------------------------------------------------------------------------------- the loss uses it
SIZE = 8


def _task(policy: str = "uniform") -> Generation:
    return Generation.of(SweepSpec(mode="generation", generation=GenerationSpec(
        timesteps=100, eval_t=(1, 10, 50), samples=0, suppression_t=policy)))






def test_the_task_binds_the_given_policy_else_the_sweeps(drawn):
    t = _task("uniform")
    assert t.suppression("dos", None) == t.suppression("dos") and t.suppression("dos").policy == "uniform"
    one = t.suppression("dos", timesteps="one")
    assert one.policy == "one" and one != t.suppression("dos") and one == t.suppression("dos", "one")
    x = blobs().tensors[0][:6]
    torch.manual_seed(0)
    one(build_denoiser("unet-tiny", 1, SIZE), x, None)
    assert [p for p, _ in drawn] == ["one"] and torch.equal(drawn[0][1], torch.ones(6, dtype=torch.long))
    with pytest.raises(KeyError, match="allowed: one, uniform"):
        t.suppression("dos", "onee")
    assert CLASSIFICATION.suppression("ice", None) == CLASSIFICATION.suppression("ice")
    with pytest.raises(ValueError, match="generation mode only; remove it"):
        CLASSIFICATION.suppression("ice", "one")


def _protect(policy: str | None, task: Generation, model) -> None:
    original, restricted = blobs(32, 0), blobs(32, 1, shift=1.4)
    spec = ProtectSpec(loss="dos", iterations=2, inner_steps=1, base_lr=1e-3, alpha=1, beta=1, ntr_steps=1,
                       batch_size=8, query_fraction=0.5, max_drop=1000, select_drop=1000, eval_every=2, probe_every=2,
                       probe_epochs=1, probes=(ProbeSpec("direct-all", "adam", 1e-3, 8, 0.25),),
                       environments=EnvironmentSpec(optimizers=("sgd",), lr=(1e-4, 1e-4)), checkpoint_every=0,
                       suppression_t=policy)
    protect(model, original, original, [restricted], [restricted], spec, 0.0, task=task)


def test_the_variants_policy_reaches_the_protections_suppression_loss(drawn):
    """Sweep policy uniform, variant policy one: the suppression loss draws t = 1 for every image (every other
    DDPM loss of the protection, the fitting ones, stays uniform); without a variant policy nothing draws 'one'."""
    torch.manual_seed(0)
    model, task = build_denoiser("unet-tiny", 1, SIZE), _task("uniform")
    _protect(None, task, model)
    assert drawn and {p for p, _ in drawn} == {"uniform"}
    drawn.clear()
    _protect("one", task, model)
    ones = [t for p, t in drawn if p == "one"]
    assert ones, "the variant's suppression_t never reached the suppression loss"
    assert all(bool((t == 1).all()) for t in ones)
    assert len(ones) == 2   # one query loss per iteration (inner_steps 1), 2 iterations
    # the other way round: the sweep says one, the variant uniform -> no suppression loss draws 'one'
    drawn.clear()
    _protect("uniform", _task("one"), model)
    assert {p for p, _ in drawn} == {"uniform"}


# ------------------------------------------------------------------------------------------ validation
def _problems(data) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    return [str(p) for p in err.value.problems]


def _generation(**variant):
    data = copy.deepcopy(GENERATION)
    data["protect"][0].update(variant)
    data["attack"] = {**data["attack"], "development": [{"strategy": ["direct-all"], "optimizer": ["sgd"],
                                                         "lr": [1e-3]}]}
    return data


def test_generation_accepts_known_policies_for_the_variant_and_the_defender():
    spec = parse_spec(_generation(suppression_t="one", defend={"space": {"suppression_t": ["one", "uniform"]}}))
    assert spec.protect[0].suppression_t == "one"
    assert spec.protect[0].defend.space.suppression_t == ("one", "uniform")
    assert parse_spec(_generation()).protect[0].suppression_t is None


def test_an_unknown_policy_is_refused_naming_the_field_and_the_policies():
    assert _problems(_generation(suppression_t="onee")) == [
        "protect.0.suppression_t: unknown timestep policy 'onee' (did you mean 'one'?); allowed: one, uniform"]
    problems = _problems(_generation(defend={"space": {"suppression_t": ["uniform", "bogus"]}}))
    assert len(problems) == 1 and problems[0].startswith("protect.0.defend.space.suppression_t.1: 'bogus' is not a "
                                                         "valid value of protect.suppression_t")
    assert "allowed: one, uniform" in problems[0]
    assert _problems(_generation(defend={"space": {"suppression_t": []}})) == [
        "protect.0.defend.space.suppression_t: is empty: give at least one value, or leave the field out"]


def test_classification_refuses_either_field_with_the_fix():
    data = copy.deepcopy(GOOD)
    data["protect"][0]["suppression_t"] = "one"
    problems = _problems(data)
    assert len(problems) == 1 and problems[0].startswith("protect.0.suppression_t:")
    assert "generation mode only" in problems[0] and problems[0].endswith("remove it")
    data = copy.deepcopy(GOOD)
    data["attack"]["development"] = [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3]}]
    data["protect"][0]["defend"] = {"space": {"suppression_t": ["one", "uniform"]}}
    problems = _problems(data)
    assert len(problems) == 1 and problems[0].startswith("protect.0.defend.space.suppression_t:")
    assert "generation mode only" in problems[0] and problems[0].endswith("remove it")


# ------------------------------------------------------------------------------------- defender's candidate
def test_a_sampled_policy_becomes_the_candidates():
    variant = ProtectSpec(loss="dos", defend=DefendSpec(space=DefendSpace(suppression_t=("one", "uniform"))))
    chosen = candidate(variant, {"suppression_t": "one"}, 0)
    assert chosen.suppression_t == "one" and chosen.defend is None and chosen.seeds == (0,)
    assert candidate(variant, {}, 0).suppression_t is None
    assert list(dimensions(variant.defend.space)) == ["suppression_t"]
    assert DefendSpace(suppression_t=("one",)).fixed() == {"suppression_t": "one"}
    assert candidate_key(chosen) != candidate_key(candidate(variant, {}, 0))


# ---------------------------------------------------------------------------------------------- MLflow
def test_the_protect_run_logs_the_policy_only_when_set(tmp_path):
    spec = parse_spec(GENERATION)
    spec = dataclasses.replace(spec, protect=(spec.protect[0], dataclasses.replace(spec.protect[0], name="w",
                                                                                    suppression_t="one")))
    dirs = {}
    for name in ("normal", "protect/v/s0", "protect/w/s0"):
        d = tmp_path / name.replace("/", "_")
        d.mkdir()
        (d / CARD).write_text(json.dumps({"format": FORMAT, "spec_hash": name, "metrics": {}}))
        dirs[name] = d
    ctx = SimpleNamespace(spec=spec, tracker=SimpleNamespace(finished_keys=lambda sid, role: set()), sweep_id="sid",
                          parent="parent")
    outbox = Outbox(None)   # never started: what log_models journals stays queued
    log_models(ctx, outbox, dirs["normal"], {k: v for k, v in dirs.items() if k != "normal"})
    params = {op.data["name"]: op.data["params"] for op in outbox.queued() if op.kind == "open"}
    assert "suppression_t" not in params["protect/v/s0"]
    assert params["protect/w/s0"]["suppression_t"] == "one"
    assert task_for(spec).settings.suppression_t == "uniform"   # the sweep's policy is untouched
