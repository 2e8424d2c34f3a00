"""The attack trials of a sweep: one typed record per fine-tuning run, planned once, crossing the Ray boundary
as it is (Tune's param space holds these records), logged to MLflow by :meth:`Trial.params`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from sophon_ray import names
from sophon_ray.attack import SCRATCH_STRATEGY, AttackConfig, grid_configs
from sophon_ray.spec import SweepSpec, spec_hash


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
    grid: str                 # names.DEVELOPMENT or names.EVALUATION
    domain: int               # index into spec.restricted
    domain_name: str          # its name in MLflow and the report
    data_pool: str            # attack.data_pool
    config: AttackConfig

    def params(self) -> dict[str, object]:
        """The MLflow params of the trial's run (names from :mod:`sophon_ray.names`)."""
        return {names.SUBJECT: self.subject.kind, names.VARIANT: self.subject.variant,
                names.PROTECT_SEED: self.subject.protect_seed, names.GRID: self.grid, names.DOMAIN: self.domain_name,
                names.DATA_POOL: self.data_pool, **self.config.as_params()}

    @property
    def key(self) -> str:
        """Deterministic id of the trial (its MLflow run is found again by it)."""
        return spec_hash(self.params())

    @property
    def name(self) -> str:
        c = self.config
        what = "all" if self.subject.kind == "scratch" else c.strategy
        wd = f"/wd{c.weight_decay:g}" if c.weight_decay else ""
        return (f"{self.grid[:3]}/{self.domain_name}/{self.subject.label}/{what}/{c.optimizer}/lr{c.lr:g}/"
                f"bs{c.batch_size}/f{c.data_fraction:g}/e{c.epochs}/{c.schedule}{wd}/s{c.seed}")


def domain_names(spec: SweepSpec) -> list[str]:
    """Each restricted domain's name: its dataset, with ``#i`` where two domains share a dataset."""
    datasets = [d.dataset for d in spec.restricted]
    return [f"{name}#{i}" if datasets.count(name) > 1 else name for i, name in enumerate(datasets)]


def subjects(spec: SweepSpec, protected: list[tuple[str, int]]) -> list[Subject]:
    """The attacked models: every (variant, protection seed) in ``protected``, then normal (scratch is added
    per cell by :func:`plan_trials`)."""
    out = [Subject("protected", v, s) for v, s in protected] if "protected" in spec.attack.subjects else []
    return out + ([Subject("normal")] if "normal" in spec.attack.subjects else [])


def plan_trials(spec: SweepSpec, protected: list[tuple[str, int]]) -> list[Trial]:
    """Every attack trial of the sweep, in a fixed order: per grid (development first), per restricted domain,
    per cell, the protected models and normal; scratch once per cell-without-strategy."""
    models, domains, trials = subjects(spec, protected), domain_names(spec), []
    for grid, grids in ((names.DEVELOPMENT, spec.attack.development), (names.EVALUATION, spec.attack.evaluation)):
        seen: set[AttackConfig] = set()
        for d, config in itertools.product(range(len(spec.restricted)), grid_configs(grids)):
            cells = [(subject, config) for subject in models]
            scratch = replace(config, strategy=SCRATCH_STRATEGY)
            if "scratch" in spec.attack.subjects and (d, scratch) not in seen:
                seen.add((d, scratch))
                cells.append((Subject("scratch"), scratch))
            trials += [Trial(subject, grid, d, domains[d], spec.attack.data_pool, cfg) for subject, cfg in cells]
    return trials
