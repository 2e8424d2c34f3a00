"""Spec validation: every problem at once (field path, bad value, what is allowed, did-you-mean), before anything
expensive starts; and advisories (protocol warnings) that do not stop a run. The mode table answers the
mode-specific questions (its models, its losses, its own settings: ``problems(spec)``), the recipe table the
attack ones (:mod:`sophon_ray.run.checks`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sophon_ray.core.data import DATASETS
from sophon_ray.core.simulation import INNER_OPTIMIZERS
from sophon_ray.modes import MODES, all_archs, mode_of_arch
from sophon_ray.recipes import OPTIMIZERS
from sophon_ray.registry import did_you_mean
from sophon_ray.run import checks
from sophon_ray.run.checks import Checker
from sophon_ray.spec import (DATA_POOLS, DEFEND_OBJECTIVES, RESTRICTED_VAL_FRACTION, SCHEDULERS, SEARCH_ALGORITHMS,
                             SUBJECTS, DefendSpec, DomainSpec, GridSpec, Problem, ProtectSpec, Range, SearchSpec, SpecError,
                             SweepSpec, build_spec, read_spec_data)
from sophon_ray.spec.schema import SELECT_PREFER


def _domains(c: Checker, spec: SweepSpec) -> None:
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


def _domain(c: Checker, path: str, d: DomainSpec, original: DomainSpec) -> None:
    c.name_in(f"{path}.dataset", d.dataset, DATASETS)
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


def _pretrain(c: Checker, spec: SweepSpec) -> None:
    p = spec.pretrain
    c.name_in("pretrain.optimizer", p.optimizer, OPTIMIZERS)
    for key in ("epochs", "lr", "batch_size"):
        c.positive(f"pretrain.{key}", getattr(p, key))
    if p.weights and p.weights != "torchvision" and not (Path(p.weights) / "model.json").is_file():
        c.add("pretrain.weights", f"no sophon-ray checkpoint at {Path(p.weights).resolve()} (expected model.json + "
              "model.safetensors); give a checkpoint directory, 'torchvision' for published ImageNet weights, "
              "or null to pretrain")
    if not 0 < p.val_fraction < 1:
        c.add("pretrain.val_fraction", f"must be in (0, 1), got {p.val_fraction}")


def _protect(c: Checker, spec: SweepSpec) -> None:
    labels = [v.label for v in spec.protect]
    for i, v in enumerate(spec.protect):
        path = f"protect.{i}"
        _variant(c, path, v, spec)
        if labels.count(v.label) > 1:
            c.add(f"{path}.name", f"variant name '{v.label}' is used twice: give each protect entry a unique name")
        if not v.seeds:
            c.add(f"{path}.seeds", "needs at least one protection seed, e.g. [0, 1, 2]")
        if len(set(v.seeds)) < len(v.seeds):
            c.add(f"{path}.seeds", f"lists a seed twice: {list(v.seeds)}")
        if v.defend is not None:
            _defend(c, f"{path}.defend", v, spec)


def _defend(c: Checker, path: str, v: ProtectSpec, spec: SweepSpec) -> None:
    """A defender search: its settings, its objective (development data only), and every value its space may
    give a protection setting, checked as the variant would be with that value (the field named in the space)."""
    from sophon_ray.run.defend import candidate  # noqa: PLC0415

    d = v.defend
    assert d is not None
    if d.objective not in DEFEND_OBJECTIVES:
        c.add(f"{path}.objective", f"objective '{d.objective}' would choose the protection on "
              f"{'evaluation data (the evaluation grids, the attacker pool or the test split)' if d.objective != '' else 'nothing'}"
              f"; the defender may only read development data: use {', '.join(DEFEND_OBJECTIVES)}")
    _tune_settings(c, path, d)
    c.at_least_zero(f"{path}.guard", d.guard)
    c.positive(f"{path}.rounds", d.rounds)
    if d.rounds > 1 and d.red_team is None:
        c.add(f"{path}.rounds", f"{d.rounds} rounds carry the red team's finds from round to round: add "
              "red_team: {num_samples: 8} or set rounds: 1")
    if d.red_team is not None:
        red, where = d.red_team, f"{path}.red_team"
        if red.algorithm not in SEARCH_ALGORITHMS:
            c.add(f"{where}.algorithm", f"unknown search algorithm '{red.algorithm}'"
                  f"{did_you_mean(red.algorithm, list(SEARCH_ALGORITHMS))}; allowed: {', '.join(SEARCH_ALGORITHMS)}")
        for key in ("num_samples", "join"):
            c.positive(f"{where}.{key}", getattr(red, key))
        c.at_least_zero(f"{where}.random_start", red.random_start)
        c.fraction(f"{where}.share", red.share, low_open=False)
        checks.space(c, f"{where}.space", red.space, spec)
        if d.rounds > 1:   # its finds join the simulated attacker
            checks.simulable(c, f"{where}.space", {f.name: getattr(red.space, f.name) for f in fields(red.space)
                                                   if isinstance(getattr(red.space, f.name), tuple)})
    if not spec.attack.development:
        c.add(f"{path}", "a defender search scores candidates on the development grid: add attack.development")
    base = Checker()
    _variant(base, "", v, spec)
    known = {(p.path, p.message) for p in base.problems}
    for f in fields(d.space):
        value, where = getattr(d.space, f.name), f"{path}.space.{f.name}"
        if value is None:
            continue
        if f.name == "suppression_t" and MODES.get(spec.mode).timesteps() is None:   # once, not per value
            c.add(where, f"the suppression losses' timestep policies are generation mode only ({spec.mode} mode's "
                  "suppression losses take no timestep); remove it")
            continue
        if isinstance(value, Range):
            if value.distribution not in ("uniform", "loguniform") or value.low is None or value.high is None:
                c.add(where, "a range needs distribution uniform or loguniform with low and high, or give a list")
                continue
            if value.low >= value.high:
                c.add(where, f"needs low < high, got {value.low:g} .. {value.high:g}")
            if value.distribution == "loguniform" and value.low <= 0:
                c.add(f"{where}.low", f"must be > 0 for loguniform, got {value.low:g}")
            items = [(f"{where}.low", value.low), (f"{where}.high", value.high)]
        else:
            if not value:
                c.add(where, "is empty: give at least one value, or leave the field out")
            items = [(f"{where}.{j}", x) for j, x in enumerate(value)]
        for item_path, item in items:
            one = Checker()
            _variant(one, "", candidate(v, {f.name: item}, d.seed), spec)
            for problem in one.problems:
                if (problem.path, problem.message) not in known:
                    c.add(item_path, f"{item!r} is not a valid value of protect.{problem.path.lstrip('.')}: "
                          f"{problem.message}")


def _variant(c: Checker, path: str, v: ProtectSpec, spec: SweepSpec) -> None:
    """One protection's own settings (no name or seed checks)."""
    _loss(c, f"{path}.loss", v.loss, spec.mode)
    _timesteps(c, f"{path}.suppression_t", v.suppression_t, spec)
    for key in ("iterations", "inner_steps", "base_lr", "beta", "batch_size", "clip_norm",
                "eval_every", "probe_every", "probe_epochs"):
        c.positive(f"{path}.{key}", getattr(v, key))
    for key in ("alpha", "ntr_steps", "max_rollbacks", "max_drop", "select_drop", "select_tolerance"):
        c.at_least_zero(f"{path}.{key}", getattr(v, key))
    if v.select_prefer not in SELECT_PREFER:
        c.add(f"{path}.select_prefer", f"unknown rule '{v.select_prefer}'"
              f"{did_you_mean(v.select_prefer, list(SELECT_PREFER))}; allowed: {', '.join(SELECT_PREFER)} (which "
              "probed state checkpoint selection returns: the best original score among probes within "
              "select_tolerance of the lowest, or the lowest probe)")
    if v.checkpoint_every < 0:
        c.add(f"{path}.checkpoint_every", f"must be >= 0 (iterations between protection state checkpoints; 0 "
              f"turns them off), got {v.checkpoint_every}")
    if not 0 < v.query_fraction < 1:
        c.add(f"{path}.query_fraction", f"must be in (0, 1), got {v.query_fraction}")
    elif v.batch_size < 4:
        c.add(f"{path}.batch_size", f"support and query need >= 2 samples each (BatchNorm): raise batch_size "
              f"({v.batch_size}) to 4 or more")
    if not v.probes:
        c.add(f"{path}.probes", "needs at least one probe attack (they choose the returned checkpoint)")
    for j, probe in enumerate(v.probes):
        checks.strategy_in_mode(c, f"{path}.probes.{j}.strategy", probe.strategy, spec.mode)
        c.name_in(f"{path}.probes.{j}.optimizer", probe.optimizer, OPTIMIZERS)
        c.positive(f"{path}.probes.{j}.lr", probe.lr)
        c.positive(f"{path}.probes.{j}.batch_size", probe.batch_size)
        c.fraction(f"{path}.probes.{j}.data_fraction", probe.data_fraction)
    env = v.environments
    if not env.optimizers:
        c.add(f"{path}.environments.optimizers", "needs at least one optimizer")
    for j, opt in enumerate(env.optimizers):
        c.name_in(f"{path}.environments.optimizers.{j}", opt, INNER_OPTIMIZERS)
    if env.lr[0] <= 0 or env.lr[0] > env.lr[1]:
        c.add(f"{path}.environments.lr", f"needs 0 < low <= high, got {list(env.lr)}")
    c.fraction(f"{path}.environments.head_reinit", env.head_reinit, low_open=False)
    c.fraction(f"{path}.environments.head_only", env.head_only, low_open=False)
    if env.recipes is not None:
        checks.space(c, f"{path}.environments.recipes", env.recipes, spec)
        checks.simulable(c, f"{path}.environments.recipes",
                         {f.name: getattr(env.recipes, f.name) for f in fields(env.recipes)
                          if isinstance(getattr(env.recipes, f.name), tuple)})
    for j, recipe in enumerate(env.known):
        one = {f.name: (getattr(recipe, f.name),) for f in fields(recipe)}
        checks.grid(c, f"{path}.environments.known.{j}", SimpleNamespace(**one), spec)
        checks.simulable(c, f"{path}.environments.known.{j}", one)
    c.fraction(f"{path}.environments.known_share", env.known_share, low_open=False)


def _tune_settings(c: Checker, path: str, s: SearchSpec | DefendSpec) -> None:
    """What a Ray Tune search needs, for an attacker's search and a defender's alike: a known algorithm and
    scheduler, positive budgets, ASHA's reduction factor."""
    if s.algorithm not in SEARCH_ALGORITHMS:
        c.add(f"{path}.algorithm", f"unknown search algorithm '{s.algorithm}'"
              f"{did_you_mean(s.algorithm, list(SEARCH_ALGORITHMS))}; allowed: {', '.join(SEARCH_ALGORITHMS)}")
    if s.scheduler not in SCHEDULERS:
        c.add(f"{path}.scheduler", f"unknown scheduler '{s.scheduler}'"
              f"{did_you_mean(s.scheduler, list(SCHEDULERS))}; allowed: {', '.join(SCHEDULERS)}")
    for key in ("num_samples", "max_concurrent", "grace_period"):
        c.positive(f"{path}.{key}", getattr(s, key))
    c.at_least_zero(f"{path}.random_start", s.random_start)
    if s.reduction_factor <= 1:
        c.add(f"{path}.reduction_factor", f"must be > 1 (ASHA keeps 1/reduction_factor of the trials at each "
              f"rung), got {s.reduction_factor}")


def _search(c: Checker, path: str, search: SearchSpec, spec: SweepSpec) -> None:
    """An adaptive attacker's settings and space: names against the registries, ranges, budgets, and every
    strategy the space may pick against the model (e.g. more blocks than the architecture has)."""
    _tune_settings(c, path, search)
    if not 0 < search.val_fraction < 1:
        c.add(f"{path}.val_fraction", f"must be in (0, 1) (the attacker's own validation share of its pool), "
              f"got {search.val_fraction}")
    checks.space(c, f"{path}.space", search.space, spec)
    epochs = search.space.epochs
    if search.scheduler == "asha" and epochs and search.grace_period > max(epochs):
        c.add(f"{path}.grace_period", f"{search.grace_period} epochs is more than the longest trial "
              f"({max(epochs)} epochs): lower it, or use scheduler: none")


def _attack(c: Checker, spec: SweepSpec) -> None:
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
            checks.grid(c, f"attack.{name}.{i}", g, spec)
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
    _pack(c, a.pack)


def _pack(c: Checker, pack: int | str) -> None:
    """``attack.pack``: an integer >= 1 or ``auto``."""
    from sophon_ray.run.packing import AUTO  # noqa: PLC0415

    if pack == AUTO or (isinstance(pack, int) and not isinstance(pack, bool) and pack >= 1):
        return
    c.add("attack.pack", f"must be an integer >= 1 (the most grid trials run as one Tune trial; 1: each alone) or "
          f"'{AUTO}', got {pack!r}; e.g. `pack: 8` or `pack: {AUTO}`")


def _resources(c: Checker, spec: SweepSpec) -> None:
    r = spec.resources
    c.positive("resources.protect_workers", r.protect_workers)
    c.positive("resources.protect_parallel", r.protect_parallel)
    c.positive("resources.cpus_per_trial", r.cpus_per_trial)
    c.at_least_zero("resources.max_failures", r.max_failures)
    c.at_least_zero("resources.gpus_per_trial", r.gpus_per_trial)


def check(spec: SweepSpec) -> list[Problem]:
    """Every problem of a typed spec against the modes, the recipe table, the registries and the rules between
    fields."""
    c = Checker()
    if spec.mode not in MODES:
        c.add("mode", MODES.miss_message(spec.mode))
        return c.problems
    _model(c, spec)
    c.positive("model.num_classes", spec.model.num_classes)
    for part in (_domains, _pretrain, _protect, _attack, _resources, _weights_files):
        part(c, spec)
    for path, message in MODES.get(spec.mode).plugin.problems(spec):
        c.add(path, message)
    return c.problems


def _weights_files(c: Checker, spec: SweepSpec) -> None:
    """generation.fid_inception, when set, is the standard FID network's weights file: checked here (keys and
    shapes, the file memory-mapped) rather than after the first attack."""
    path = spec.generation.fid_inception if spec.mode == "generation" else None
    if path is None:
        return
    from sophon_ray.modes.generation.fid_inception import weights_problem  # noqa: PLC0415 - torch, generation only

    problem = weights_problem(path)
    if problem is not None:
        c.add("generation.fid_inception", problem.removeprefix("fid_inception: "))


def _model(c: Checker, spec: SweepSpec) -> None:
    """The model family follows the mode: each mode builds only its own architectures."""
    arch, mode = spec.model.arch, MODES.get(spec.mode)
    owner = mode_of_arch(arch)
    if owner is None:
        c.add("model.arch", f"unknown model '{arch}'{did_you_mean(arch, all_archs())}; allowed in {mode.name} mode: "
              f"{', '.join(mode.models().names())}")
    elif owner is not mode:
        c.add("model.arch", f"'{arch}' is a {owner.model_noun}; {mode.name} mode needs a {mode.model_noun}: "
              f"{', '.join(mode.models().names())} (or set mode: {owner.name})")


def _loss(c: Checker, path: str, loss: str, mode: str) -> None:
    """A suppression loss of the mode (classification: ICE/KLU on logits; generation: DoS / negative MSE on the
    predicted noise)."""
    own = MODES.get(mode).losses()
    other = next((m for m in MODES.names() if m != mode and loss in MODES.get(m).losses()), None)
    if other is not None:
        c.add(path, f"'{loss}' is a {other} loss and this is {mode} mode; allowed: {', '.join(own.names())}")
    else:
        c.name_in(path, loss, own)


def _timesteps(c: Checker, path: str, policy: Any, spec: SweepSpec) -> None:
    """A variant's own timestep policy of the suppression losses: one of the mode's named ones (generation:
    ``uniform``, ``one``), a fixed timestep or a band [t_min, t_max] inside the schedule; a mode whose losses take
    no timestep (classification) has none to choose. A defender space's values reach here through :func:`_defend`
    (each checked as the variant with that value)."""
    if policy is None:
        return
    mode = MODES.get(spec.mode)
    policies = mode.timesteps()
    if policies is None:
        c.add(path, f"the suppression losses' timestep policy is generation mode only ({spec.mode} mode's "
              "suppression losses take no timestep); remove it")
    elif isinstance(policy, str):
        c.name_in(path, policy, policies)
    else:
        problem = mode.plugin.timestep_problem(policy, max(spec.generation.timesteps, 2))
        if problem is not None:
            c.add(path, f"{problem}; or leave it out for generation.suppression_t")


def _cells(grids: Iterable[GridSpec]) -> set[tuple[Any, ...]]:
    """(strategy, optimizer, lr, batch size) of every cell of the grids."""
    return {cell for g in grids for cell in itertools.product(g.strategy, g.optimizer, g.lr, g.batch_size)}


def advisories(spec: SweepSpec) -> list[Problem]:
    """Protocol warnings that do not stop a run: a probe attack (which chooses the returned checkpoint) that is
    also an evaluation cell lets checkpoint selection look at what the report scores; checkpoint selection by
    ``select_prefer: original`` with a tolerance (the default, kept for the keys' sake) can return a less
    protected state than the most protected one probed."""
    evaluation = _cells(spec.attack.evaluation)
    out = []
    leaning = [i for i, v in enumerate(spec.protect) if v.select_prefer == "original" and v.select_tolerance > 0]
    if leaning:   # one warning for all such variants
        where = (f"protect.{leaning[0]}.select_prefer" if len(leaning) == 1
                 else "protect (" + ", ".join(f"{i}: {spec.protect[i].label}" for i in leaning) + ")")
        out.append(Problem(where, "checkpoint selection counts probe scores within select_tolerance (default 5) "
                           "points of the lowest as equal and returns the best original-domain score among them, so "
                           "it may return a less protected state (each protection logs why and at what cost). Fix: "
                           "select_prefer: protection (the lowest probe; a new protection key)"))
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
