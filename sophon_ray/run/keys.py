"""The keys a sweep's results are stored under: the sweep id, model keys, search keys (hashes of the spec slice
each result depends on, so a changed slice means a new result and an unchanged one is reused)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from sophon_ray import names
from sophon_ray.modes import MODES
from sophon_ray.spec import TIMESTEP_STAGES, SweepSpec, spec_hash

if TYPE_CHECKING:
    from sophon_ray.run.context import RunOptions
    from sophon_ray.run.plan import Trial


def _stages(spec: SweepSpec, which: tuple[str, ...] = TIMESTEP_STAGES) -> tuple:
    """The generation stages among ``which`` whose timestep policy differs from the default protocol's, as one more
    hashed item: () when none does (every key made before the stages existed stays) or the mode draws no timesteps
    (classification ignores ``generation``)."""
    if MODES.get(spec.mode).timesteps() is None:
        return ()
    changed = spec.generation.changed_stages(which)
    return (changed,) if changed else ()


def sweep_id(spec: SweepSpec) -> str:
    """Hash of everything that defines the sweep's results (not tracking, resources or paths)."""
    return spec_hash((spec.name, spec.seed, spec.mode, spec.model, spec.original, spec.restricted, spec.pretrain,
                      spec.protect, spec.attack, *_stages(spec)))


def pretrain_key(spec: SweepSpec) -> str:
    return spec_hash((spec.seed, spec.model, spec.original, spec.restricted, spec.pretrain,
                      *_stages(spec, ("fit_t",))))


def protect_key(spec: SweepSpec, index: int, seed: int) -> str:
    """Key of one protection: the normal model's key, the variant's settings (not its seed list) and the seed,
    so that adding a seed to a variant reuses the protections of the seeds it had; in generation mode also the
    stages a protection runs (simulated attacker, suppression, probes, score) when they differ from the default."""
    return spec_hash((pretrain_key(spec), replace(spec.protect[index], seeds=()), seed,
                      *_stages(spec, ("simulate_t", "suppression_t", "attack_t", "score_t"))))


def search_key(sid: str, template: Trial) -> str:
    """Key of the search run of one (search, attacked model, domain) in one sweep."""
    return spec_hash((sid, template.search, template.subject.label, template.domain_name))


def protected_models(spec: SweepSpec, options: RunOptions) -> list[tuple[str, int]]:
    """(variant, protection seed) of every protected model the attacks run against."""
    if options.audit:
        return [("audited", names.NO_PROTECT_SEED)]
    return [(v.label, seed) for v in spec.protect for seed in v.seeds]
