"""The attack trials of a sweep: one typed record per fine-tuning run, planned once, crossing the Ray boundary
as it is (Tune's param space holds these records), logged to MLflow by :meth:`Trial.params`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

from sophon_ray import names
from sophon_ray.recipes import SCRATCH_STRATEGY, TABLE, AttackConfig, grid_configs
from sophon_ray.spec import Range, SearchSpec, SweepSpec, spec_hash


@dataclass(frozen=True)
class Subject:
    """A model the attacks run against: ``normal``, ``scratch`` (a random init of the normal model's
    architecture) or ``protected`` (one variant, one protection seed)."""

    kind: str
    variant: str = names.NO_VARIANT
    protect_seed: int = names.NO_PROTECT_SEED

    @property
    def model(self) -> str:
        """Key of the checkpoint the trial starts from (scratch re-initialises the normal model's)."""
        return f"protected/{self.variant}/s{self.protect_seed}" if self.kind == "protected" else "normal"

    @property
    def label(self) -> str:
        return f"protected/{self.variant}/s{self.protect_seed}" if self.kind == "protected" else self.kind


@dataclass(frozen=True)
class Trial:
    """One fine-tuning attack: who, on which grid and restricted domain, with which recipe."""

    subject: Subject
    grid: str                 # one of names.GRIDS, or names.SEARCH_GRID
    domain: int               # index into spec.restricted (spec.benign on the benign grid)
    domain_name: str          # its name in MLflow and the report
    data_pool: str            # attack.data_pool
    config: AttackConfig
    search: str = ""          # search trials: attack.search[i].name ...
    search_trial: int = -1    # ... and the trial's place in that search (0, 1, ...)

    def params(self) -> dict[str, object]:
        """The MLflow params of the trial's run (names from :mod:`sophon_ray.names`)."""
        where = {names.SEARCH: self.search, names.SEARCH_TRIAL: self.search_trial} if self.search else {}
        return {names.SUBJECT: self.subject.kind, names.VARIANT: self.subject.variant,
                names.PROTECT_SEED: self.subject.protect_seed, names.GRID: self.grid, names.DOMAIN: self.domain_name,
                names.DATA_POOL: self.data_pool, **where, **self.config.as_params()}

    @property
    def key(self) -> str:
        """Deterministic id of the trial (its MLflow run is found again by it)."""
        return spec_hash(self.params())

    @property
    def name(self) -> str:
        c = self.config
        what = "all" if self.subject.kind == "scratch" else c.strategy
        wd = f"/wd{c.weight_decay:g}" if c.weight_decay else ""
        extra = "".join(f"/{k}{getattr(c, k):g}" for k in ("label_smoothing",) if getattr(c, k))
        extra += "".join(f"/{getattr(c, k)}" for k, plain in (("augment", "none"), ("bn_mode", "train"))
                         if getattr(c, k) != plain)
        how = {"lora": f"lora-r{c.lora_rank}a{c.lora_alpha:g}", "last-k": f"last-{c.blocks}",
               "reinit-last-k": f"reinit-last-{c.blocks}"}.get(what, what)
        extra += "".join(f"/{n}={_short(getattr(c, n))}" for n, s in TABLE.settings.items()
                         if n not in _NAMED and getattr(c, n) != s.default)
        where = f"{self.grid[:3]}/{self.search}#{self.search_trial}" if self.search else self.grid[:3]
        return (f"{where}/{self.domain_name}/{self.subject.label}/{how}/{c.optimizer}/lr{c.lr:.3g}/"
                f"bs{c.batch_size}/f{c.data_fraction:g}/e{c.epochs}/{c.schedule}{wd}{extra}/s{c.seed}")


# the settings a trial's name spells in its own way; every other one shows as /name=value when off its default
_NAMED = frozenset({"strategy", "optimizer", "lr", "batch_size", "data_fraction", "epochs", "schedule", "weight_decay",
                    "label_smoothing", "augment", "bn_mode", "blocks", "lora_rank", "lora_alpha", "seed"})


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _unique_names(datasets: list[str]) -> list[str]:
    return [f"{name}#{i}" if datasets.count(name) > 1 else name for i, name in enumerate(datasets)]


def domain_names(spec: SweepSpec) -> list[str]:
    """Each restricted domain's name: its dataset, with ``#i`` where two domains share a dataset."""
    return _unique_names([d.dataset for d in spec.restricted])


def benign_names(spec: SweepSpec) -> list[str]:
    """Each benign domain's name, like :func:`domain_names` (``benign:`` prefixed so it never equals a
    restricted domain's)."""
    return [f"benign:{name}" for name in _unique_names([d.dataset for d in spec.benign])]


def subjects(spec: SweepSpec, protected: list[tuple[str, int]]) -> list[Subject]:
    """The attacked models: every (variant, protection seed) in ``protected``, then normal (scratch is added
    per cell by :func:`plan_trials`)."""
    out = [Subject("protected", v, s) for v, s in protected] if "protected" in spec.attack.subjects else []
    return out + ([Subject("normal")] if "normal" in spec.attack.subjects else [])


def plan_trials(spec: SweepSpec, protected: list[tuple[str, int]]) -> list[Trial]:
    """Every grid trial of the sweep, in a fixed order: per grid (development, evaluation, budget, benign), per
    domain, per cell, the protected models and normal; scratch once per cell-without-strategy. (Search trials
    are proposed while a search runs: :func:`search_templates`.)"""
    models, trials = subjects(spec, protected), []
    a = spec.attack
    for grid, grids, domains in ((names.DEVELOPMENT, a.development, domain_names(spec)),
                                 (names.EVALUATION, a.evaluation, domain_names(spec)),
                                 (names.BUDGET, a.budget, domain_names(spec)),
                                 (names.BENIGN, a.benign, benign_names(spec))):
        seen: set[AttackConfig] = set()
        for d, config in itertools.product(range(len(domains)), grid_configs(grids)):
            cells = [(subject, config) for subject in models]
            scratch = replace(config, strategy=SCRATCH_STRATEGY)
            if "scratch" in spec.attack.subjects and (d, scratch) not in seen:
                seen.add((d, scratch))
                cells.append((Subject("scratch"), scratch))
            trials += [Trial(subject, grid, d, domains[d], spec.attack.data_pool, cfg) for subject, cfg in cells]
    return trials


def development_configs(spec: SweepSpec, scratch: bool = False) -> list[AttackConfig]:
    """The development grid's recipes (``scratch``: once per recipe without strategy, as scratch runs them)."""
    configs = grid_configs(spec.attack.development)
    if scratch:
        configs = list(dict.fromkeys(replace(c, strategy=SCRATCH_STRATEGY) for c in configs))
    return configs


def search_budget(spec: SweepSpec, protected: list[tuple[str, int]]) -> int:
    """How many search trials the sweep's searches run in all (each search: every attacked model, every
    restricted domain, ``num_samples`` trials)."""
    attacked = len(search_subjects(spec, protected)) * len(spec.restricted)
    return sum(s.num_samples for s in spec.attack.search) * attacked


def search_subjects(spec: SweepSpec, protected: list[tuple[str, int]]) -> list[Subject]:
    """The models each search attacks: :func:`subjects`, then scratch when the spec attacks it."""
    return subjects(spec, protected) + ([Subject("scratch")] if "scratch" in spec.attack.subjects else [])


def search_templates(spec: SweepSpec, protected: list[tuple[str, int]]) -> list[Trial]:
    """One template per (search, attacked model, restricted domain): the Trial every trial of that search
    starts from (its config holds the space's fixed values and the search seed; the searcher fills the rest)."""
    domains, out = domain_names(spec), []
    for search in spec.attack.search:
        fixed = fixed_values(search)
        for subject, d in itertools.product(search_subjects(spec, protected), range(len(spec.restricted))):
            config = AttackConfig(seed=search.seed, **fixed)
            if subject.kind == "scratch":
                config = replace(config, strategy=SCRATCH_STRATEGY)
            out.append(Trial(subject, names.SEARCH_GRID, d, domains[d], spec.attack.data_pool, config, search.name))
    return out


def fixed_values(search: SearchSpec) -> dict[str, object]:
    """The space's one-value dimensions: fixed in every trial of the search, never searched."""
    space, out = search.space, {}
    for f in fields(space):
        value = getattr(space, f.name)
        if isinstance(value, tuple) and len(value) == 1:
            out[f.name] = value[0]
        elif isinstance(value, Range) and value.distribution == "choice" and len(value.values) == 1:
            out[f.name] = value.values[0]
    return out
