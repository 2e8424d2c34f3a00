"""The keys a sweep's results are stored under: the sweep id, model keys, search keys (hashes of the spec slice
each result depends on, so a changed slice means a new result and an unchanged one is reused)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from sophon_ray import names
from sophon_ray.spec import SweepSpec, spec_hash

if TYPE_CHECKING:
    from sophon_ray.run.context import RunOptions
    from sophon_ray.run.plan import Trial


def sweep_id(spec: SweepSpec) -> str:
    """Hash of everything that defines the sweep's results (not tracking, resources or paths)."""
    return spec_hash((spec.name, spec.seed, spec.mode, spec.model, spec.original, spec.restricted, spec.pretrain,
                      spec.protect, spec.attack))


def pretrain_key(spec: SweepSpec) -> str:
    return spec_hash((spec.seed, spec.model, spec.original, spec.restricted, spec.pretrain))


def protect_key(spec: SweepSpec, index: int, seed: int) -> str:
    """Key of one protection: the normal model's key, the variant's settings (not its seed list) and the seed,
    so that adding a seed to a variant reuses the protections of the seeds it had."""
    return spec_hash((pretrain_key(spec), replace(spec.protect[index], seeds=()), seed))


def search_key(sid: str, template: Trial) -> str:
    """Key of the search run of one (search, attacked model, domain) in one sweep."""
    return spec_hash((sid, template.search, template.subject.label, template.domain_name))


def protected_models(spec: SweepSpec, options: RunOptions) -> list[tuple[str, int]]:
    """(variant, protection seed) of every protected model the attacks run against."""
    if options.audit:
        return [("audited", names.NO_PROTECT_SEED)]
    return [(v.label, seed) for v in spec.protect for seed in v.seeds]
