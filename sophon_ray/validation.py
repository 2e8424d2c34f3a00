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
from sophon_ray.spec import (DATA_POOLS, DISTRIBUTIONS, MODES, RESTRICTED_VAL_FRACTION, SCHEDULERS, SEARCH_ALGORITHMS,
                             SUBJECTS, DomainSpec, GridSpec, Problem, Range, SearchSpec, SpecError, SweepSpec,
                             build_spec, read_spec_data)


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
    for path, d in domains + [(f"benign.{i}", d) for i, d in enumerate(spec.benign)]:
        _domain(c, path, d, spec.original)
    if spec.attack.benign and not spec.benign:
        c.add("attack.benign", "benign grids need benign domains: add e.g. `benign: [{dataset: digits, ...}]` "
              "(an unrelated domain, same image_size and channels) or remove attack.benign")
    if spec.benign and not spec.attack.benign:
        c.add("benign", "benign domains are only fine-tuned on by attack.benign grids: add one, or remove benign")


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
        _loss(c, f"{path}.loss", v.loss, spec.mode)
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
            _strategy(c, f"{path}.probes.{j}.strategy", probe.strategy, spec.mode)
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
        if spec.mode == "generation":
            for key in ("head_reinit", "head_only"):
                if getattr(env, key):
                    c.add(f"{path}.environments.{key}", "a denoiser has no classifier head: the simulated attacker "
                          f"fine-tunes every parameter in generation mode; set {key}: 0")


def _grid(c: _Checker, path: str, g: GridSpec, mode: str) -> None:
    for f in fields(GridSpec):
        if not getattr(g, f.name):
            c.add(f"{path}.{f.name}", "is empty: give at least one value")
    for j, value in enumerate(g.strategy):
        _strategy(c, f"{path}.strategy.{j}", value, mode)
    checks = {"optimizer": registries.OPTIMIZERS, "schedule": registries.SCHEDULES}
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


def _range(c: _Checker, path: str, r: Range, low_bound: float = 0.0) -> None:
    """A numeric search dimension: a known distribution, a non-empty range inside the allowed bounds."""
    if r.distribution not in DISTRIBUTIONS:
        c.add(f"{path}.distribution", f"unknown distribution '{r.distribution}'"
              f"{did_you_mean(r.distribution, list(DISTRIBUTIONS))}; allowed: {', '.join(DISTRIBUTIONS)}")
        return
    if r.distribution == "choice":
        if not r.values:
            c.add(f"{path}.values", "a choice needs at least one value, e.g. values: [0.0, 0.1]")
        for j, v in enumerate(r.values):
            if v < low_bound:
                c.add(f"{path}.values.{j}", f"must be >= {low_bound:g}, got {v}")
        return
    if r.low is None or r.high is None:
        c.add(path, f"a {r.distribution} range needs low and high, e.g. {{distribution: {r.distribution}, "
              "low: 1.0e-4, high: 1.0e-1}")
        return
    if r.low > r.high:
        c.add(path, f"low > high ({r.low:g} > {r.high:g}): swap them")
    elif r.low == r.high:
        c.add(path, f"empty range (low = high = {r.low:g}): widen it, or use {{distribution: choice, values: [{r.low:g}]}}")
    if r.low < low_bound or (r.distribution == "loguniform" and r.low <= 0):
        c.add(f"{path}.low", f"must be > 0 for loguniform, got {r.low:g}" if r.distribution == "loguniform"
              else f"must be >= {low_bound:g}, got {r.low:g}")


def _search(c: _Checker, path: str, search: SearchSpec, spec: SweepSpec) -> None:
    """An adaptive attacker's settings and space: names against the registries, ranges, budgets, and every
    strategy the space may pick against the model (e.g. more blocks than the architecture has)."""
    from sophon_ray.attack import AttackConfig, strategy_problem  # noqa: PLC0415

    if search.algorithm not in SEARCH_ALGORITHMS:
        c.add(f"{path}.algorithm", f"unknown search algorithm '{search.algorithm}'"
              f"{did_you_mean(search.algorithm, list(SEARCH_ALGORITHMS))}; allowed: {', '.join(SEARCH_ALGORITHMS)}")
    if search.scheduler not in SCHEDULERS:
        c.add(f"{path}.scheduler", f"unknown scheduler '{search.scheduler}'"
              f"{did_you_mean(search.scheduler, list(SCHEDULERS))}; allowed: {', '.join(SCHEDULERS)}")
    for key in ("num_samples", "max_concurrent", "grace_period"):
        c.positive(f"{path}.{key}", getattr(search, key))
    c.at_least_zero(f"{path}.random_start", search.random_start)
    if search.reduction_factor <= 1:
        c.add(f"{path}.reduction_factor", f"must be > 1 (ASHA keeps 1/reduction_factor of the trials at each "
              f"rung), got {search.reduction_factor}")
    if not 0 < search.val_fraction < 1:
        c.add(f"{path}.val_fraction", f"must be in (0, 1) (the attacker's own validation share of its pool), "
              f"got {search.val_fraction}")
    space, sp = search.space, f"{path}.space"
    for j, value in enumerate(space.strategy):
        _strategy(c, f"{sp}.strategy.{j}", value, spec.mode)
    if not space.strategy:
        c.add(f"{sp}.strategy", "is empty: give at least one value")
    choices = {"optimizer": registries.OPTIMIZERS, "schedule": registries.SCHEDULES, "augment": registries.AUGMENTS,
               "bn_mode": registries.BN_MODES}
    for key, registry in choices.items():
        if not getattr(space, key):
            c.add(f"{sp}.{key}", "is empty: give at least one value")
        for j, value in enumerate(getattr(space, key)):
            c.name_in(f"{sp}.{key}.{j}", value, registry)
    for key in ("batch_size", "epochs", "blocks", "lora_rank", "lora_alpha", "data_fraction"):
        if not getattr(space, key):
            c.add(f"{sp}.{key}", "is empty: give at least one value")
        for j, value in enumerate(getattr(space, key)):
            (c.fraction if key == "data_fraction" else c.positive)(f"{sp}.{key}.{j}", value)
    _range(c, f"{sp}.lr", space.lr, low_bound=1e-12)
    _range(c, f"{sp}.weight_decay", space.weight_decay)
    _range(c, f"{sp}.label_smoothing", space.label_smoothing)
    if space.label_smoothing.distribution != "choice" and (space.label_smoothing.high or 0) >= 1:
        c.add(f"{sp}.label_smoothing.high", f"must be < 1, got {space.label_smoothing.high}")
    if search.scheduler == "asha" and space.epochs and search.grace_period > max(space.epochs):
        c.add(f"{path}.grace_period", f"{search.grace_period} epochs is more than the longest trial "
              f"({max(space.epochs)} epochs): lower it, or use scheduler: none")
    if spec.model.arch in registries.MODELS or spec.model.arch in registries.DENOISERS:
        for j, strategy in enumerate(space.strategy):
            if strategy not in registries.STRATEGIES:
                continue
            for blocks, rank in itertools.product(space.blocks or (1,), space.lora_rank or (1,)):
                problem = strategy_problem(spec.model.arch, AttackConfig(strategy=strategy, blocks=blocks,
                                                                         lora_rank=rank),
                                           spec.original.channels, spec.original.image_size)
                if problem:
                    c.add(f"{sp}.strategy.{j}", f"{problem} (model.arch {spec.model.arch})")
                    break


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
    for name in ("evaluation", "development", "budget", "benign"):
        for i, g in enumerate(getattr(a, name)):
            _grid(c, f"attack.{name}.{i}", g, spec.mode)
    search_names = [s.name for s in a.search]
    for i, search in enumerate(a.search):
        _search(c, f"attack.search.{i}", search, spec)
        if search_names.count(search.name) > 1:
            c.add(f"attack.search.{i}.name", f"search name '{search.name}' is used twice: give each search its own name")
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
        c.add("mode", f"unknown mode '{spec.mode}'{did_you_mean(spec.mode, list(MODES))}; allowed: {', '.join(MODES)}")
        return c.problems
    _model(c, spec)
    c.positive("model.num_classes", spec.model.num_classes)
    for part in (_domains, _pretrain, _protect, _attack, _resources, _generation):
        part(c, spec)
    return c.problems


def _model(c: _Checker, spec: SweepSpec) -> None:
    """The model family follows the mode: classifiers (MODELS) classify, denoisers (DENOISERS) generate; a
    denoiser must take the original domain's image size."""
    arch, generation = spec.model.arch, spec.mode == "generation"
    if generation and arch in registries.MODELS:
        c.add("model.arch", f"'{arch}' is a classifier; generation mode needs a denoiser: "
              f"{', '.join(registries.DENOISERS.names())} (or set mode: classification)")
    elif not generation and arch in registries.DENOISERS:
        c.add("model.arch", f"'{arch}' is a denoiser; classification mode needs a classifier: "
              f"{', '.join(registries.MODELS.names())} (or set mode: generation)")
    elif arch not in (registries.DENOISERS if generation else registries.MODELS):
        c.name_in("model.arch", arch, registries.DENOISERS if generation else registries.MODELS)
    elif generation:
        import torch  # noqa: PLC0415

        try:
            with torch.device("meta"):
                registries.DENOISERS.get(arch)(spec.original.channels, spec.original.image_size)
        except ValueError as err:
            c.add("original.image_size", f"{err} (model.arch {arch})")


def _loss(c: _Checker, path: str, loss: str, mode: str) -> None:
    """A suppression loss of the mode: ICE/KLU act on a classifier's logits, DoS / negative MSE on a denoiser's
    predicted noise."""
    own, other = ((registries.GENERATION_LOSSES, registries.LOSSES) if mode == "generation"
                  else (registries.LOSSES, registries.GENERATION_LOSSES))
    if loss in other:
        c.add(path, f"'{loss}' is a {'classification' if mode == 'generation' else 'generation'} loss and this is "
              f"{mode} mode; allowed: {', '.join(own.names())}")
    else:
        c.name_in(path, loss, own)


def _strategy(c: _Checker, path: str, strategy: str, mode: str) -> None:
    """An attack strategy that makes sense for the mode's models (``Task.strategies``)."""
    from sophon_ray.tasks import TASKS  # noqa: PLC0415

    allowed = TASKS.get(mode)().strategies  # the mode's task with default settings
    if strategy in registries.STRATEGIES and strategy not in allowed:
        c.add(path, f"strategy '{strategy}' does not apply in {mode} mode; allowed: {', '.join(allowed)}")
    else:
        c.name_in(path, strategy, registries.STRATEGIES)


def _generation(c: _Checker, spec: SweepSpec) -> None:
    """Generation mode's DDPM settings: a valid schedule, known timestep policy, timesteps inside it."""
    from sophon_ray.diffusion import TIMESTEP_POLICIES  # noqa: PLC0415

    g, path = spec.generation, "generation"
    if g.timesteps < 2:
        c.add(f"{path}.timesteps", f"must be >= 2 (the DDPM chain's length; the paper uses 1000), got {g.timesteps}")
    if not 0 < g.beta_start < g.beta_end < 1:
        c.add(f"{path}.beta_start", f"needs 0 < beta_start < beta_end < 1 (DDPM: 1e-4, 0.02), got "
              f"{g.beta_start}, {g.beta_end}")
    c.name_in(f"{path}.suppression_t", g.suppression_t, TIMESTEP_POLICIES)
    if not g.eval_t:
        c.add(f"{path}.eval_t", "needs at least one timestep, e.g. [1, 10, 100, 250, 500]")
    for j, t in enumerate(g.eval_t):
        if not 0 <= t < g.timesteps:
            c.add(f"{path}.eval_t.{j}", f"must be in 0..{g.timesteps - 1} (generation.timesteps - 1), got {t}")
    c.at_least_zero(f"{path}.samples", g.samples)
    if g.sample_steps is not None and not 2 <= g.sample_steps <= g.timesteps:
        c.add(f"{path}.sample_steps", f"must be in 2..{g.timesteps} (respaced sampling steps) or null (all "
              f"{g.timesteps}), got {g.sample_steps}")


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
