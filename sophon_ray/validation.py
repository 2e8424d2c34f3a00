"""Spec validation against the registries: every problem at once (field path, bad value, what is allowed,
did-you-mean), before anything expensive starts; and advisories (protocol warnings) that do not stop a run.

This is the only spec module that imports the registries (and so torch): ``spec.py`` stays a leaf that every
other module can import.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from sophon_ray import registries
from sophon_ray.registry import Registry, did_you_mean
from sophon_ray.spec import (DATA_POOLS, MODES, RESTRICTED_VAL_FRACTION, SUBJECTS, DomainSpec, GridSpec, Problem,
                             SpecError, SweepSpec, build_spec, read_spec_data)


class _Checker:
    """Collects problems; small helpers for the recurring checks."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def name_in(self, path: str, value: str, registry: Registry) -> None:
        if value not in registry:
            self.add(path, registry.miss_message(value))

    def positive(self, path: str, value: float | None) -> None:
        if value is not None and value <= 0:
            self.add(path, f"must be > 0, got {value}")

    def at_least_zero(self, path: str, value: float) -> None:
        if value < 0:
            self.add(path, f"must be >= 0, got {value}")

    def fraction(self, path: str, value: float | None, low_open: bool = True) -> None:
        if value is not None and not ((0 < value <= 1) if low_open else (0 <= value <= 1)):
            self.add(path, f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _domains(c: _Checker, spec: SweepSpec) -> None:
    domains = [("original", spec.original)] + [(f"restricted.{i}", d) for i, d in enumerate(spec.restricted)]
    if not spec.restricted:
        c.add("restricted", "needs at least one restricted domain")
    for path, d in domains:
        _domain(c, path, d, spec.original)


def _domain(c: _Checker, path: str, d: DomainSpec, original: DomainSpec) -> None:
    c.name_in(f"{path}.dataset", d.dataset, registries.DATASETS)
    c.positive(f"{path}.image_size", d.image_size)
    if d.channels not in (1, 3):
        c.add(f"{path}.channels", f"must be 1 or 3, got {d.channels}")
    for key in ("train_size", "test_size"):
        c.positive(f"{path}.{key}", getattr(d, key))
    for key in ("mean", "std"):
        if len(getattr(d, key)) not in (1, d.channels):
            c.add(f"{path}.{key}", f"needs 1 or {d.channels} values, got {getattr(d, key)}")
    if any(s <= 0 for s in d.std):
        c.add(f"{path}.std", f"must be > 0, got {d.std}")
    if (d.image_size, d.channels) != (original.image_size, original.channels):
        c.add(f"{path}.image_size", "every domain feeds the same model: image_size and channels must match "
              f"original ({original.image_size}, {original.channels}), got ({d.image_size}, {d.channels})")


def _pretrain(c: _Checker, spec: SweepSpec) -> None:
    p = spec.pretrain
    c.name_in("pretrain.optimizer", p.optimizer, registries.OPTIMIZERS)
    for key in ("epochs", "lr", "batch_size"):
        c.positive(f"pretrain.{key}", getattr(p, key))
    if p.weights and p.weights != "torchvision" and not (Path(p.weights) / "model.json").is_file():
        c.add("pretrain.weights", f"no sophon-ray checkpoint at {Path(p.weights).resolve()} (expected model.json + "
              "model.safetensors); give a checkpoint directory, 'torchvision' for published ImageNet weights, "
              "or null to pretrain")
    if not 0 < p.val_fraction < 1:
        c.add("pretrain.val_fraction", f"must be in (0, 1), got {p.val_fraction}")


def _protect(c: _Checker, spec: SweepSpec) -> None:
    labels = [v.label for v in spec.protect]
    for i, v in enumerate(spec.protect):
        path = f"protect.{i}"
        c.name_in(f"{path}.loss", v.loss, registries.LOSSES)
        for key in ("iterations", "inner_steps", "base_lr", "alpha", "beta", "batch_size", "clip_norm",
                    "eval_every", "probe_every", "probe_epochs"):
            c.positive(f"{path}.{key}", getattr(v, key))
        for key in ("ntr_steps", "max_rollbacks", "max_drop", "select_drop"):
            c.at_least_zero(f"{path}.{key}", getattr(v, key))
        if v.checkpoint_every < 0:
            c.add(f"{path}.checkpoint_every", f"must be >= 0 (iterations between protection state checkpoints; 0 "
                  f"turns them off), got {v.checkpoint_every}")
        if not 0 < v.query_fraction < 1:
            c.add(f"{path}.query_fraction", f"must be in (0, 1), got {v.query_fraction}")
        elif v.batch_size < 4:
            c.add(f"{path}.batch_size", f"support and query need >= 2 samples each (BatchNorm): raise batch_size "
                  f"({v.batch_size}) to 4 or more")
        if labels.count(v.label) > 1:
            c.add(f"{path}.name", f"variant name '{v.label}' is used twice: give each protect entry a unique name")
        if not v.seeds:
            c.add(f"{path}.seeds", "needs at least one protection seed, e.g. [0, 1, 2]")
        if len(set(v.seeds)) < len(v.seeds):
            c.add(f"{path}.seeds", f"lists a seed twice: {list(v.seeds)}")
        if not v.probes:
            c.add(f"{path}.probes", "needs at least one probe attack (they choose the returned checkpoint)")
        for j, probe in enumerate(v.probes):
            c.name_in(f"{path}.probes.{j}.strategy", probe.strategy, registries.STRATEGIES)
            c.name_in(f"{path}.probes.{j}.optimizer", probe.optimizer, registries.OPTIMIZERS)
            c.positive(f"{path}.probes.{j}.lr", probe.lr)
            c.positive(f"{path}.probes.{j}.batch_size", probe.batch_size)
            c.fraction(f"{path}.probes.{j}.data_fraction", probe.data_fraction)
        env = v.environments
        if not env.optimizers:
            c.add(f"{path}.environments.optimizers", "needs at least one optimizer")
        for j, opt in enumerate(env.optimizers):
            c.name_in(f"{path}.environments.optimizers.{j}", opt, registries.INNER_OPTIMIZERS)
        if env.lr[0] <= 0 or env.lr[0] > env.lr[1]:
            c.add(f"{path}.environments.lr", f"needs 0 < low <= high, got {list(env.lr)}")
        c.fraction(f"{path}.environments.head_reinit", env.head_reinit, low_open=False)
        c.fraction(f"{path}.environments.head_only", env.head_only, low_open=False)


def _grid(c: _Checker, path: str, g: GridSpec) -> None:
    for f in fields(GridSpec):
        if not getattr(g, f.name):
            c.add(f"{path}.{f.name}", "is empty: give at least one value")
    checks = {"strategy": registries.STRATEGIES, "optimizer": registries.OPTIMIZERS, "schedule": registries.SCHEDULES}
    for key, registry in checks.items():
        for j, value in enumerate(getattr(g, key)):
            c.name_in(f"{path}.{key}.{j}", value, registry)
    for key in ("lr", "batch_size", "epochs"):
        for j, value in enumerate(getattr(g, key)):
            c.positive(f"{path}.{key}.{j}", value)
    for j, value in enumerate(g.data_fraction):
        c.fraction(f"{path}.data_fraction.{j}", value)
    for j, value in enumerate(g.weight_decay):
        c.at_least_zero(f"{path}.weight_decay.{j}", value)


def _attack(c: _Checker, spec: SweepSpec) -> None:
    a = spec.attack
    for i, s in enumerate(a.subjects):
        if s not in SUBJECTS:
            c.add(f"attack.subjects.{i}", f"unknown subject '{s}'{did_you_mean(s, list(SUBJECTS))}; allowed: "
                  f"{', '.join(SUBJECTS)}")
    if "protected" in a.subjects and not spec.protect:
        c.add("attack.subjects", "'protected' needs at least one protect variant")
    if not a.evaluation:
        c.add("attack.evaluation", "needs at least one grid: the evaluation grid is what the report shows")
    for name in ("evaluation", "development"):
        for i, g in enumerate(getattr(a, name)):
            _grid(c, f"attack.{name}.{i}", g)
    if a.data_pool not in DATA_POOLS:
        c.add("attack.data_pool", f"unknown data pool '{a.data_pool}'{did_you_mean(a.data_pool, list(DATA_POOLS))}; "
              f"allowed: {', '.join(DATA_POOLS)}")
    high = 1 - RESTRICTED_VAL_FRACTION
    if not 0 < a.pool_fraction < high:
        c.add("attack.pool_fraction", f"must be in (0, {high:g}) (the protector keeps the rest of the restricted "
              f"training split after {RESTRICTED_VAL_FRACTION:g} for validation), got {a.pool_fraction}")


def _resources(c: _Checker, spec: SweepSpec) -> None:
    r = spec.resources
    c.positive("resources.protect_workers", r.protect_workers)
    c.positive("resources.protect_parallel", r.protect_parallel)
    c.positive("resources.cpus_per_trial", r.cpus_per_trial)
    c.at_least_zero("resources.max_failures", r.max_failures)
    c.at_least_zero("resources.gpus_per_trial", r.gpus_per_trial)


def check(spec: SweepSpec) -> list[Problem]:
    """Every problem of a typed spec against the registries and the rules between fields."""
    c = _Checker()
    if spec.mode not in MODES:
        c.add("mode", f"'{spec.mode}' is not supported; allowed: {', '.join(MODES)} (generation/DoS is not "
              "implemented yet)")
    c.name_in("model.arch", spec.model.arch, registries.MODELS)
    c.positive("model.num_classes", spec.model.num_classes)
    for part in (_domains, _pretrain, _protect, _attack, _resources):
        part(c, spec)
    return c.problems


def _cells(grids: Iterable[GridSpec]) -> set[tuple[Any, ...]]:
    """(strategy, optimizer, lr, batch size) of every cell of the grids."""
    return {cell for g in grids for cell in itertools.product(g.strategy, g.optimizer, g.lr, g.batch_size)}


def advisories(spec: SweepSpec) -> list[Problem]:
    """Protocol warnings that do not stop a run: a probe attack (which chooses the returned checkpoint) that is
    also an evaluation cell lets checkpoint selection look at what the report scores."""
    evaluation = _cells(spec.attack.evaluation)
    out = []
    for i, variant in enumerate(spec.protect):
        for j, p in enumerate(variant.probes):
            if (p.strategy, p.optimizer, p.lr, p.batch_size) in evaluation:
                out.append(Problem(f"protect.{i}.probes.{j}", f"probe ({p.strategy}, {p.optimizer}, lr {p.lr:g}, "
                                   f"batch {p.batch_size}) is also an evaluation cell: checkpoint selection then "
                                   "tunes on a reported setting. Fix: probe with a development setting (another "
                                   "lr or batch size)"))
    return out


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    """Build and validate a :class:`SweepSpec` from a plain mapping; raise :class:`SpecError` listing all problems."""
    spec, problems = build_spec(data)
    if spec is not None:
        try:
            problems += check(spec)
        except Exception:  # noqa: BLE001 - a half-built spec may not support every check; typing errors stand
            if not problems:
                raise
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> SweepSpec:
    """Read a YAML sweep spec, apply dotted overrides, validate; raise :class:`SpecError` listing all problems."""
    return parse_spec(read_spec_data(path, overrides), str(path))
