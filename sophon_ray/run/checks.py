"""Validation's building blocks: a problem collector, and the checks that derive from the recipe table (every
grid axis and search dimension checked against its setting's declared values, strategies against the mode and the
model). ``run.validate`` assembles them with the spec's other sections."""

from __future__ import annotations

import functools
import itertools
from dataclasses import fields
from typing import Any

from sophon_ray.modes import MODES, all_archs, build_model, mode_of_arch
from sophon_ray.recipes import SETTINGS, STRATEGIES, AttackConfig, ModelFacts, Range, strategies_for
from sophon_ray.registry import Registry, did_you_mean
from sophon_ray.spec import DISTRIBUTIONS, ModelSpec, Problem, SweepSpec


class Checker:
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


@functools.lru_cache(maxsize=64)
def model_facts(arch: str, channels: int, image_size: int) -> ModelFacts:
    """What strategies need to know of ``arch`` (blocks, LoRA targets, grouped convs), built on the meta device
    (no memory, no init cost)."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    from sophon_ray.recipes.lora import lora_targets  # noqa: PLC0415

    with torch.device("meta"):
        model = build_model(ModelSpec(arch, num_classes=2, channels_last=False), channels, image_size)
    grouped = sum(isinstance(m, nn.Conv2d) and m.groups != 1 for m in model.modules())
    from sophon_ray.recipes.surgery import conv_norm_pairs  # noqa: PLC0415

    return ModelFacts(arch, mode_of_arch(arch).name, len(model.blocks()), lora_targets(model), grouped,
                      len(conv_norm_pairs(model)))


def strategy_problem(arch: str, config: Any, channels: int = 3, image_size: int = 16) -> str | None:
    """Why ``config.strategy`` cannot run on ``arch`` with ``config``'s settings (naming the field and the fix), or
    None when it can: the strategy's modes, then its own check (only the settings it uses are checked)."""
    if config.strategy not in STRATEGIES:
        return STRATEGIES.miss_message(config.strategy)
    mode = mode_of_arch(arch)
    if mode is None:
        return f"unknown model '{arch}'; allowed: {', '.join(all_archs())}"
    strategy = STRATEGIES.get(config.strategy)
    if config.strategy not in strategies_for(mode.name):
        return (f"strategy: {config.strategy} does not apply to {arch} ({mode.name} mode); use one of "
                f"{', '.join(strategies_for(mode.name))}")
    return strategy.check(model_facts(arch, channels, image_size), config) if strategy.check else None


def strategy_in_mode(c: Checker, path: str, strategy: str, mode: str) -> None:
    """A strategy that exists and applies in ``mode``."""
    if strategy not in STRATEGIES:
        c.name_in(path, strategy, STRATEGIES)
    elif strategy not in strategies_for(mode):
        c.add(path, f"strategy '{strategy}' does not apply in {mode} mode; allowed: {', '.join(strategies_for(mode))}")


def _value(c: Checker, path: str, name: str, value: Any, mode: str) -> None:
    if name == "strategy":
        strategy_in_mode(c, path, value, mode)
    else:
        setting = SETTINGS[name]
        problem = setting.problem(value)
        if problem:
            c.add(path, problem)
        elif mode and setting.modes and mode not in setting.modes and value != setting.default:
            c.add(path, f"{name} {value!r} does not apply in {mode} mode (it is for {', '.join(setting.modes)}); "
                  f"use its default {setting.default!r} or remove it")


def _model_checks(c: Checker, path: str, spec: SweepSpec, values: dict[str, tuple]) -> None:
    """Every strategy the axes may pick, with every value of its own settings, against the model; a rescale on a
    model with nothing to rescale."""
    if mode_of_arch(spec.model.arch) is None or MODES.get(spec.mode) is not mode_of_arch(spec.model.arch):
        return
    rescales = [v for v in values.get("rescale", ()) if v != 1.0]
    if rescales and spec.mode in SETTINGS["rescale"].modes:
        facts = model_facts(spec.model.arch, spec.original.channels, spec.original.image_size)
        if not facts.norm_pairs:
            c.add(f"{path}.rescale", f"rescale {rescales[0]:g} does nothing on {spec.model.arch}: it has no convolution "
                  "feeding a BatchNorm; use rescale 1 or a BatchNorm model (convnet, resnet18)")
    for j, strategy in enumerate(values.get("strategy", ())):
        if strategy not in strategies_for(spec.mode) or STRATEGIES.get(strategy).check is None:
            continue
        own = STRATEGIES.get(strategy).settings
        for combo in itertools.product(*(values.get(n) or (SETTINGS[n].default,) for n in own)):
            problem = strategy_problem(spec.model.arch, AttackConfig(strategy=strategy, **dict(zip(own, combo))),
                                       spec.original.channels, spec.original.image_size)
            if problem:
                c.add(f"{path}.strategy.{j}", f"{problem} (model.arch {spec.model.arch})")
                break


def grid(c: Checker, path: str, g: Any, spec: SweepSpec) -> None:
    """An attack grid: every axis non-empty, every value valid for its setting, every strategy for the mode and
    the model."""
    for f in fields(g):
        values = getattr(g, f.name)
        if not values:
            c.add(f"{path}.{f.name}", "is empty: give at least one value")
        for j, value in enumerate(values):
            _value(c, f"{path}.{f.name}.{j}", f.name, value, spec.mode)
    _model_checks(c, path, spec, {f.name: getattr(g, f.name) for f in fields(g)})
    _benign_warm_start(c, path, g.warm_start, spec)


def numeric_range(c: Checker, path: str, r: Range, name: str) -> None:
    """A numeric search dimension: a known distribution, a non-empty range inside the setting's bounds."""
    if r.distribution not in DISTRIBUTIONS:
        c.add(f"{path}.distribution", f"unknown distribution '{r.distribution}'"
              f"{did_you_mean(r.distribution, list(DISTRIBUTIONS))}; allowed: {', '.join(DISTRIBUTIONS)}")
        return
    if r.distribution == "choice":
        if not r.values:
            c.add(f"{path}.values", "a choice needs at least one value, e.g. values: [0.0, 0.1]")
        for j, v in enumerate(r.values):
            _value(c, f"{path}.values.{j}", name, v, "")
        return
    if r.low is None or r.high is None:
        c.add(path, f"a {r.distribution} range needs low and high, e.g. {{distribution: {r.distribution}, "
              "low: 1.0e-4, high: 1.0e-1}")
        return
    if r.low > r.high:
        c.add(path, f"low > high ({r.low:g} > {r.high:g}): swap them")
    elif r.low == r.high:
        c.add(path, f"empty range (low = high = {r.low:g}): widen it, or use {{distribution: choice, values: [{r.low:g}]}}")
    if r.distribution == "loguniform" and r.low <= 0:
        c.add(f"{path}.low", f"must be > 0 for loguniform, got {r.low:g}")
        return
    for end in ("low", "high"):
        problem = SETTINGS[name].problem(getattr(r, end))
        if problem:
            c.add(f"{path}.{end}", problem)


def space(c: Checker, path: str, searched: Any, spec: SweepSpec) -> None:
    """A search space (an attacker's, a red team's or a simulated attacker's): every dimension derived from its
    setting (choices non-empty and valid, ranges inside the setting's bounds), every strategy it may draw against
    the mode and the model."""
    values: dict[str, tuple] = {}
    for f in fields(searched):
        value, p = getattr(searched, f.name), f"{path}.{f.name}"
        if isinstance(value, Range):
            numeric_range(c, p, value, f.name)
            continue
        values[f.name] = value
        if not value:
            c.add(p, "is empty: give at least one value")
        for j, v in enumerate(value):
            _value(c, f"{p}.{j}", f.name, v, spec.mode)
    _model_checks(c, path, spec, values)
    _benign_warm_start(c, path, searched.warm_start, spec)


UNSIMULATED = {"adapt": "none", "warm_start": "none"}   # settings the simulated attacker cannot run, at their no-op


def simulable(c: Checker, path: str, values: dict[str, Any]) -> None:
    """What a simulated attacker (``environments.recipes`` / ``environments.known``) can run: a strategy that
    keeps the model's modules (not lora), no label-free adaptation, no warm start."""
    for j, strategy in enumerate(values.get("strategy", ())):
        if strategy == "lora":
            c.add(f"{path}.strategy.{j}", "the simulated attacker cannot run lora (it wraps the model's modules); "
                  "list the other strategies")
    for name, default in UNSIMULATED.items():
        for j, value in enumerate(values.get(name, ())):
            if value != default:
                c.add(f"{path}.{name}.{j}", f"the simulated attacker cannot run {name} {value} (inner steps are "
                      f"fine-tuning steps on protection batches); use {default} or leave it out")


def _benign_warm_start(c: Checker, path: str, kinds: tuple[str, ...], spec: SweepSpec) -> None:
    if "benign" in kinds and not spec.benign:
        c.add(f"{path}.warm_start", "warm_start benign fine-tunes on the first benign domain first and this spec has "
              "none: add `benign: [{dataset: ..., ...}]` or use warm_start: original")
