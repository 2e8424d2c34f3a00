"""Packed attack trials, the planning side: which grid trials run together as one Tune trial (``attack.pack``).

A *pack* is up to ``attack.pack`` grid trials trained as one :func:`~sophon_ray.core.packed.finetune_pack` call in
one Tune trial: trials of one subject model (one protected variant and seed, normal, or scratch of one seed: a
scratch model is re-initialised from its trial's seed), one grid, domain and data pool, whose recipes have one
:func:`~sophon_ray.core.packed.pack_key` (they differ only in per-member settings). Every member keeps its own key
and MLflow run. A trial that cannot pack (its recipe, the architecture, a generation sweep) runs alone as before;
:func:`plan_packs` says why. ``attack.pack: 1`` (the default) makes no pack. A group larger than the pack size is
cut into the fewest packs of near-equal size (:func:`balanced_chunks`), and Tune gets the largest packs first
(:func:`largest_first`), so its slots finish close together.

``auto`` (:func:`pack_size`) sizes each group's packs from the model's :class:`~sophon_ray.core.packed.Footprint`
(one probe forward), the group's batch size and the trial's device. On the CPU a pack gives back per-operation
overhead, not arithmetic, and loses once a layer's working set leaves the cache: as many members as keep
``members x batch x widest activation`` (float32) within :data:`CPU_PACK_BYTES`, at least :data:`CPU_PACK_FLOOR`
while they stay within :data:`CPU_PACK_LIMIT_BYTES`, at most :data:`CPU_PACK_CAP` (:func:`cpu_pack_size`; the
convnet at 16 px: 16 at batch 16, 8 at batch 32, 4 at batch 64 to 256; bench/pack_size.py measures the rule
against every pack size), and none for a model only the vmap formulation packs (its packs ran slower than
lone trials on the CPU). With GPUs per trial: as many members as fit ``GPU_MEMORY_SHARE`` of the trial's
share of the GPU's memory, a member costing :data:`BYTES_PER_PARAMETER` per parameter plus its training batch's
activations and their gradients, at most :data:`GPU_PACK_CAP` (not measured on a GPU).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sophon_ray.core.packed import Footprint
    from sophon_ray.run.plan import Trial
    from sophon_ray.spec import SweepSpec

T = TypeVar("T")
AUTO = "auto"
FLOAT_BYTES = 4
CPU_PACK_BYTES = 4 * 2**20            # members x batch x widest activation x 4 B of a CPU pack (bench/pack_size.py)
CPU_PACK_FLOOR = 4                    # members at least, while they stay within CPU_PACK_LIMIT_BYTES
CPU_PACK_LIMIT_BYTES = 16 * 2**20
CPU_PACK_CAP = 32
GPU_PACK_CAP = 64
GPU_MEMORY_SHARE = 0.5
# params, grads, 2 optimizer states, the optimizer's update, the member's prepared copy, one spare: bench/pack_memory.py
# measured resnet18 members at ~6 parameter copies (381 MiB a member on the CPU against 327 MiB estimated at 5)
BYTES_PER_PARAMETER = FLOAT_BYTES * 7
ACTIVATION_COPIES = 2                 # a training step keeps every activation and gets its gradient
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
    sizes: dict[int, int] = field(default_factory=dict)  # auto's pack size by batch size (empty for a number)

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


def plan_packs(trials: list[Trial], size: int | Callable[[Trial], int], mode: str = CLASSIFICATION,
               model_problem: str | None = None) -> PackPlan:
    """Group ``trials`` (the ones still to run) into packs of at most ``size`` members (a number, or a function of
    a group's first trial: every trial of a group has one batch size), in the trials' order (a pack of one is no
    pack: that trial runs alone). ``model_problem``: why the architecture cannot pack
    (:func:`~sophon_ray.core.packed.why_model_not_packable`), then nothing packs."""
    from sophon_ray.core.packed import pack_key, why_not_packable  # noqa: PLC0415

    if mode != CLASSIFICATION:
        why = f"mode: packing is {CLASSIFICATION}-only (generation draws from the global RNG)"
        return PackPlan({}, [(t, why) for t in trials])
    if not callable(size) and size <= 1:
        return PackPlan({}, [(t, None) for t in trials])
    if model_problem is not None:
        return PackPlan({}, [(t, f"model: {model_problem}") for t in trials])
    size_of = size if callable(size) else (lambda _trial: size)
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
        if (most := size_of(members[0])) <= 1:
            why = (f"attack.pack: auto packs nothing at batch {members[0].config.batch_size} (two members' activations "
                   "or state would not fit the pack's budget on the trial's device)")
            alone += [(t, why) for t in members]
            continue
        for chunk in balanced_chunks(members, most):
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


def pack_size(spec: SweepSpec, batch_size: int, model: Footprint | None = None, gpu_bytes: int | None = None) -> int:
    """``attack.pack`` as a number for trials of ``batch_size``: itself, or for ``auto`` :func:`cpu_pack_size` on the
    CPU and, with ``resources.gpus_per_trial`` > 0, :func:`gpu_pack_size` in the trial's share of ``gpu_bytes``
    (default: the driver's GPU, else :data:`DEFAULT_GPU_BYTES`). ``model``: the attacked model's footprint (needed
    for ``auto``)."""
    pack = spec.attack.pack
    if pack != AUTO:
        return int(pack)
    if model is None:
        raise ValueError("model: attack.pack: auto sizes packs from the model's footprint; pass "
                         "core.packed.footprint(model, channels, image_size)")
    if auto_refusal(spec, model) is not None:
        return 1
    share = spec.resources.gpus_per_trial
    if share <= 0:
        return cpu_pack_size(batch_size, model.widest)
    memory = gpu_bytes if gpu_bytes is not None else _gpu_bytes()
    return gpu_pack_size(batch_size, model, int(memory * min(1.0, share)))


def auto_refusal(spec: SweepSpec, model: Footprint) -> str | None:
    """Why ``auto`` packs no trial of ``model`` under ``spec`` (on the CPU, a model only vmap packs), or None."""
    if spec.attack.pack != AUTO or spec.resources.gpus_per_trial > 0 or model.vmap_only is None:
        return None
    return (f"attack.pack: auto packs on the CPU only models the grouped formulation runs ({model.vmap_only}); "
            "vmap packs ran slower than lone trials there (bench/packed.py: resnet18 0.56-0.73x). A number packs it "
            "anyway")


def cpu_pack_size(batch_size: int, widest: int) -> int:
    """Members whose stacked widest activation (``members x batch_size x widest`` float32 values) fits
    :data:`CPU_PACK_BYTES`, but at least :data:`CPU_PACK_FLOOR` while those fit :data:`CPU_PACK_LIMIT_BYTES`, at most
    :data:`CPU_PACK_CAP` (1: no pack). Chosen on bench/pack_size.py's first shapes (bench/NOTES.md): packs beyond
    about 4 MiB lost to the cache, except that packs of 4 gained wherever they stayed within 16 MiB; on held-out
    shapes the pick was within 10 % of the best size in 4 of 6 (a pack of 4 at 12 px and batch 128 ran 0.94x)."""
    per_member = max(1, batch_size * widest * FLOAT_BYTES)
    fit = CPU_PACK_BYTES // per_member
    floor = min(CPU_PACK_FLOOR, CPU_PACK_LIMIT_BYTES // per_member)
    return max(1, min(CPU_PACK_CAP, max(fit, floor)))


def gpu_pack_size(batch_size: int, model: Footprint, memory: int) -> int:
    """Members of :func:`member_bytes` each that fit :data:`GPU_MEMORY_SHARE` of ``memory`` bytes, at most
    :data:`GPU_PACK_CAP` (1: no pack)."""
    return max(1, min(GPU_PACK_CAP, int(memory * GPU_MEMORY_SHARE // member_bytes(batch_size, model))))


def member_bytes(batch_size: int, model: Footprint) -> int:
    """What one member of a pack is estimated to hold on a GPU: its parameters' state (:data:`BYTES_PER_PARAMETER`
    a parameter) and its training batch's activations with their gradients (every module's output, float32)."""
    return (max(1, model.parameters) * BYTES_PER_PARAMETER
            + batch_size * model.activations * FLOAT_BYTES * ACTIVATION_COPIES)


def _gpu_bytes() -> int:
    import torch  # noqa: PLC0415

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else DEFAULT_GPU_BYTES


def spec_model_problem(spec: SweepSpec) -> tuple[str | None, Footprint]:
    """(why the spec's architecture cannot pack or None, its :class:`~sophon_ray.core.packed.Footprint`): the model
    is built, untrained, and run once on a zero sample."""
    from sophon_ray.core.packed import footprint, why_model_not_packable  # noqa: PLC0415
    from sophon_ray.modes import build_model  # noqa: PLC0415

    model = build_model(spec.model, spec.original.channels, spec.original.image_size)
    return why_model_not_packable(model), footprint(model, spec.original.channels, spec.original.image_size)


def plan_for(spec: SweepSpec, trials: list[Trial]) -> PackPlan:
    """:func:`plan_packs` of ``trials`` under the spec's ``attack.pack`` (building the model only when it packs;
    ``auto``: a size per batch size, kept in the plan's ``sizes``)."""
    if spec.attack.pack == 1 or not trials:
        return plan_packs(trials, 1)
    if spec.mode != CLASSIFICATION:
        return plan_packs(trials, 1, spec.mode)
    problem, model = spec_model_problem(spec)
    problem = problem or auto_refusal(spec, model)
    sizes = {b: pack_size(spec, b, model) for b in sorted({t.config.batch_size for t in trials})}
    plan = plan_packs(trials, lambda trial: sizes[trial.config.batch_size], spec.mode, problem)
    return replace(plan, sizes=sizes if spec.attack.pack == AUTO else {})


def pack_lines(spec: SweepSpec, plan: PackPlan) -> list[str]:
    """The dry run's packing lines: the size (``auto``'s per batch size), how many packs of how many trials, the
    lone trials and why."""
    if spec.attack.pack == 1:
        return []
    members = sum(len(k) for k in plan.packs.values())
    sizes = ", ".join(f"{n} at batch {b}" for b, n in plan.sizes.items())
    lines = [f"  packing (attack.pack: {spec.attack.pack}{f': {sizes}' if sizes else ''}): {members} trials in "
             f"{len(plan.packs)} packs (Tune trials), {len(plan.alone)} trials alone"]
    reasons = plan.reasons()
    lines += [f"    {n} alone: {why}" for why, n in reasons.most_common()]
    unpaired = len(plan.alone) - sum(reasons.values())
    if unpaired:
        lines.append(f"    {unpaired} alone: no other trial of the same model, grid, domain and shared recipe "
                     "settings left to pack with")
    return lines


__all__ = ["AUTO", "CPU_PACK_BYTES", "CPU_PACK_CAP", "CPU_PACK_FLOOR", "CPU_PACK_LIMIT_BYTES", "PackPlan",
           "auto_refusal", "balanced_chunks", "cpu_pack_size", "gpu_pack_size", "largest_first", "member_bytes",
           "pack_id", "pack_lines", "pack_size", "plan_for", "plan_packs", "spec_model_problem"]
