"""Packed attack trials, the planning side: which grid trials run together as one Tune trial (``attack.pack``).

A *pack* is up to ``attack.pack`` grid trials trained as one :func:`~sophon_ray.core.packed.finetune_pack` call in
one Tune trial: trials of one subject model (one protected variant and seed, normal, or scratch of one seed: a
scratch model is re-initialised from its trial's seed), one grid, domain and data pool, whose recipes have one
:func:`~sophon_ray.core.packed.pack_key` (they differ only in per-member settings). Every member keeps its own key
and MLflow run. A trial that cannot pack (its recipe, the architecture, a generation sweep) runs alone as before;
:func:`plan_packs` says why. ``attack.pack: 1`` (the default) makes no pack. A group larger than the pack size is
cut into the fewest packs of near-equal size (:func:`balanced_chunks`), and Tune gets the largest packs first
(:func:`largest_first`), so its slots finish close together.

``auto`` (:func:`pack_size`): on the CPU ``CPU_PACK`` members (bench/packed.py: grouped packs of about 8 halved the
time per member on the convnet, larger ones gained little); with GPUs per trial, as many members as fit
``GPU_MEMORY_SHARE`` of the trial's share of the GPU at ``BYTES_PER_PARAMETER`` bytes per model parameter per
member (parameters, gradients, two optimizer states, a working copy, activations), at most ``GPU_PACK_CAP``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sophon_ray.run.plan import Trial
    from sophon_ray.spec import SweepSpec

T = TypeVar("T")
AUTO = "auto"
CPU_PACK = 8
GPU_PACK_CAP = 64
GPU_MEMORY_SHARE = 0.5
BYTES_PER_PARAMETER = 4 * 16          # float32 x (params, grads, 2 optimizer states, copy, activations margin)
DEFAULT_GPU_BYTES = 16 * 2**30        # the GPU's memory when the driver sees none
PACK_PREFIX = "pack-"
CLASSIFICATION = "classification"


@dataclass(frozen=True)
class PackPlan:
    """The trials still to run as Tune trials: ``packs`` (pack id -> its members' keys, two or more) and ``alone``
    (trials that run as one Tune trial each), with why each of those could not pack (None: no other trial to
    pack it with, or packing is off)."""

    packs: dict[str, tuple[str, ...]]
    alone: list[tuple[Trial, str | None]]

    @property
    def units(self) -> list[str]:
        """The Tune trials' keys: every pack id, then every lone trial's key."""
        return [*self.packs, *(t.key for t, _ in self.alone)]

    def reasons(self) -> Counter[str]:
        """How many lone trials each reason kept alone."""
        return Counter(why for _, why in self.alone if why is not None)


def pack_id(keys: Iterable[str]) -> str:
    """The id of the pack of ``keys`` (stable: a retry or a rerun of the same members gets the same id)."""
    return PACK_PREFIX + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:12]


def _group(trial: Trial, key: Any) -> tuple:
    """What members of one pack share besides the pack key: the subject model, grid, domain and data pool."""
    scratch_seed = trial.config.seed if trial.subject.kind == "scratch" else None  # a scratch model is seeded
    return trial.subject, scratch_seed, trial.grid, trial.domain, trial.data_pool, key


def plan_packs(trials: list[Trial], size: int, mode: str = CLASSIFICATION,
               model_problem: str | None = None) -> PackPlan:
    """Group ``trials`` (the ones still to run) into packs of at most ``size`` members, in the trials' order
    (a pack of one is no pack: that trial runs alone). ``model_problem``: why the architecture cannot pack
    (:func:`~sophon_ray.core.packed.why_model_not_packable`), then nothing packs."""
    from sophon_ray.core.packed import pack_key, why_not_packable  # noqa: PLC0415

    if size <= 1:
        return PackPlan({}, [(t, None) for t in trials])
    if mode != CLASSIFICATION:
        why = f"mode: packing is {CLASSIFICATION}-only (generation draws from the global RNG)"
        return PackPlan({}, [(t, why) for t in trials])
    if model_problem is not None:
        return PackPlan({}, [(t, f"model: {model_problem}") for t in trials])
    groups: dict[tuple, list[Trial]] = {}
    alone: list[tuple[Trial, str | None]] = []
    for trial in trials:
        key = pack_key(trial.config)
        if key is None:
            alone.append((trial, why_not_packable(trial.config)))
        else:
            groups.setdefault(_group(trial, key), []).append(trial)
    packs: dict[str, tuple[str, ...]] = {}
    for members in groups.values():
        for chunk in balanced_chunks(members, size):
            if len(chunk) == 1:
                alone.append((chunk[0], None))
            else:
                keys = tuple(t.key for t in chunk)
                packs[pack_id(keys)] = keys
    return PackPlan(largest_first(packs), alone)


def balanced_chunks(items: list[T], size: int) -> list[list[T]]:
    """``items`` in order, cut into the fewest chunks of at most ``size`` whose sizes differ by at most one (9 at
    size 8: 5 + 4, not 8 and a trial left alone; the pack's wall is its largest chunk's)."""
    count = -(-len(items) // size)
    small, extra = divmod(len(items), count) if count else (0, 0)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + small + (i < extra))
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def largest_first(packs: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """``packs`` ordered by size, largest first (ties in their order). Tune starts trials in this order (then the
    lone trials): the small packs and lone trials come last, so the slots finish close together instead of one
    running a large pack alone at the end (the quickstart's 3-member scratch packs were interleaved with its
    6-member packs)."""
    return dict(sorted(packs.items(), key=lambda item: -len(item[1])))


def pack_size(spec: SweepSpec, parameters: int = 0, gpu_bytes: int | None = None) -> int:
    """``attack.pack`` as a number: itself, or for ``auto`` :data:`CPU_PACK` on the CPU and, with
    ``resources.gpus_per_trial`` > 0, the members whose ``parameters`` (of the attacked model) fit the trial's
    share of ``gpu_bytes`` (default: the driver's GPU, else :data:`DEFAULT_GPU_BYTES`), capped."""
    pack = spec.attack.pack
    if pack != AUTO:
        return int(pack)
    share = spec.resources.gpus_per_trial
    if share <= 0:
        return CPU_PACK
    memory = gpu_bytes if gpu_bytes is not None else _gpu_bytes()
    per_member = max(1, parameters) * BYTES_PER_PARAMETER
    return max(1, min(GPU_PACK_CAP, int(memory * min(1.0, share) * GPU_MEMORY_SHARE // per_member)))


def _gpu_bytes() -> int:
    import torch  # noqa: PLC0415

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else DEFAULT_GPU_BYTES


def spec_model_problem(spec: SweepSpec) -> tuple[str | None, int]:
    """(why the spec's architecture cannot pack or None, its parameter count): the model is built, untrained."""
    from sophon_ray.core.packed import why_model_not_packable  # noqa: PLC0415
    from sophon_ray.modes import build_model  # noqa: PLC0415

    model = build_model(spec.model, spec.original.channels, spec.original.image_size)
    return why_model_not_packable(model), sum(p.numel() for p in model.parameters())


def plan_for(spec: SweepSpec, trials: list[Trial]) -> PackPlan:
    """:func:`plan_packs` of ``trials`` under the spec's ``attack.pack`` (building the model only when it packs)."""
    if spec.attack.pack == 1 or not trials:
        return plan_packs(trials, 1)
    problem, parameters = spec_model_problem(spec) if spec.mode == CLASSIFICATION else (None, 0)
    return plan_packs(trials, pack_size(spec, parameters), spec.mode, problem)


def pack_lines(spec: SweepSpec, plan: PackPlan) -> list[str]:
    """The dry run's packing lines: the size, how many packs of how many trials, the lone trials and why."""
    if spec.attack.pack == 1:
        return []
    members = sum(len(k) for k in plan.packs.values())
    lines = [f"  packing (attack.pack: {spec.attack.pack}): {members} trials in {len(plan.packs)} packs "
             f"(Tune trials), {len(plan.alone)} trials alone"]
    reasons = plan.reasons()
    lines += [f"    {n} alone: {why}" for why, n in reasons.most_common()]
    unpaired = len(plan.alone) - sum(reasons.values())
    if unpaired:
        lines.append(f"    {unpaired} alone: no other trial of the same model, grid, domain and shared recipe "
                     "settings left to pack with")
    return lines


__all__ = ["AUTO", "CPU_PACK", "PackPlan", "balanced_chunks", "largest_first", "pack_id", "pack_lines", "pack_size",
           "plan_for", "plan_packs", "spec_model_problem"]
