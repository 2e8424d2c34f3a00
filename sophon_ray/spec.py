"""The sweep spec: frozen, typed dataclasses built from YAML, with dotted overrides.

Precedence: dataclass defaults < YAML file < ``--set a.b=v`` overrides (< grid point, in the drivers).
This module only types the document (every type problem collected, field path, did-you-mean); the checks
against the registries live in :mod:`sophon_ray.validation` (``load_spec``), so that the modules the
registries come from can import these dataclasses without an import circle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sophon_ray.errors import SophonError
from sophon_ray.registry import did_you_mean

SUBJECTS = ("protected", "normal", "scratch")
MODES = ("classification", "generation")
DATA_POOLS = ("disjoint", "shared")
RESTRICTED_VAL_FRACTION = 0.2  # of each restricted training split: the protector's validation data
HASHED = "hashed"  # field metadata key: False for a field that does not change results (no hash depends on it)
UNLESS_DEFAULT = "unless-default"  # HASHED value: hashed only when it differs from its default (a field added later
                                   # that leaves the ids of the sweeps that do not use it unchanged)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "convnet"
    num_classes: int = 10
    # NHWC ("channels last") weights and activations: same function, other rounding. Measured faster for the
    # convnet (1.4x) and ResNet-18 (1.14x) training steps on CPU and for ResNet-18 on an H200 (1.3-1.5x);
    # BENCHMARKS.md. false keeps PyTorch's default (contiguous) layout.
    channels_last: bool = True


@dataclass(frozen=True)
class DomainSpec:
    """One data domain. Procedural sets use ``train_size``/``test_size``/``seed`` to generate; file-backed
    sets use ``root``/``download`` and treat the sizes as caps (a seeded subset)."""

    dataset: str = "shapes"
    image_size: int = 16
    channels: int = 3
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class PretrainSpec:
    """Supervised training of the normal model, or ``weights``: a sophon-ray checkpoint directory, or
    ``torchvision`` for the architecture's published ImageNet weights (downloads; body only)."""

    epochs: int = 5
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    weights: str | None = None
    val_fraction: float = 0.1


@dataclass(frozen=True)
class EnvironmentSpec:
    """The fine-tuning environments FTS samples from, one per simulation.

    ``lr`` is a log-uniform range [low, high]; ``head_reinit`` and ``head_only`` are probabilities.
    The official code's single environment is ``{optimizers: [sgd], lr: [1e-4, 1e-4]}``.
    """

    optimizers: tuple[str, ...] = ("sgd",)
    lr: tuple[float, float] = (1e-4, 1e-4)
    head_reinit: float = 0.0
    head_only: float = 0.0


@dataclass(frozen=True)
class ProbeSpec:
    """One probe attack: a short fine-tuning on the protector's restricted share, scored on restricted
    *validation* data, that rates a state of the protection for checkpoint selection. Probes belong to the
    development side of the protocol: ``validate`` warns when one is also an evaluation cell."""

    strategy: str = "initfc-all"
    optimizer: str = "momentum"
    lr: float = 3e-3
    batch_size: int = 64
    data_fraction: float = 0.2


DEFAULT_PROBES = (ProbeSpec("initfc-all", "momentum", 3e-3), ProbeSpec("direct-all", "adam", 3e-4))


@dataclass(frozen=True)
class ProtectSpec:
    """One SOPHON variant, protected once per seed in ``seeds`` (one Ray Train job and checkpoint each).

    ``max_drop`` (points below the normal model's original validation accuracy) is the rollback floor, a
    guard against collapse (the official code's floor is 80% absolute); ``select_drop`` is the stricter
    intactness bound a probed checkpoint must meet to be selected; ``probes`` rate the probed states.
    ``checkpoint_every``: iterations between state checkpoints that a restarted worker group or ``--resume``
    continue from (0: none); it does not change the result, so no key or sweep id depends on it.
    """

    name: str | None = None
    loss: str = "ice"
    iterations: int = 200
    inner_steps: int = 50
    base_lr: float = 1e-4
    alpha: float = 3.0
    beta: float = 5.0
    ntr_steps: int = 1
    batch_size: int = 100
    query_fraction: float = 0.1
    clip_norm: float = 0.5
    max_drop: float = 20.0
    select_drop: float = 2.0
    max_rollbacks: int = 10
    eval_every: int = 10
    probe_every: int = 50
    probe_epochs: int = 3
    probes: tuple[ProbeSpec, ...] = DEFAULT_PROBES
    seeds: tuple[int, ...] = (0,)
    environments: EnvironmentSpec = field(default_factory=EnvironmentSpec)
    checkpoint_every: int = field(default=50, metadata={HASHED: False})

    @property
    def label(self) -> str:
        return self.name or self.loss


@dataclass(frozen=True)
class GridSpec:
    """Every key is a list; the grid is their cross product."""

    strategy: tuple[str, ...] = ("direct-all", "initfc-all", "direct-fc", "initfc-fc")
    optimizer: tuple[str, ...] = ("sgd", "momentum", "adam")
    lr: tuple[float, ...] = (1e-3, 1e-2)
    batch_size: tuple[int, ...] = (32,)
    data_fraction: tuple[float, ...] = (0.1,)
    schedule: tuple[str, ...] = ("constant",)
    epochs: tuple[int, ...] = (10,)
    weight_decay: tuple[float, ...] = (0.0,)
    seed: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Range:
    """A numeric search dimension: ``loguniform`` / ``uniform`` over [low, high], or ``choice`` of ``values``."""

    distribution: str = "loguniform"
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] = ()


DISTRIBUTIONS = ("loguniform", "uniform", "choice")
ALL_STRATEGIES = ("direct-all", "direct-fc", "initfc-all", "initfc-fc", "rtal", "lora", "last-k", "reinit-last-k")
ALL_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adadelta")


@dataclass(frozen=True)
class SearchSpace:
    """What the adaptive attacker may choose: every list is a categorical choice (one value: fixed, not
    searched), every :class:`Range` a numeric dimension. ``blocks`` is searched only for the last-k strategies,
    ``lora_rank``/``lora_alpha`` only for ``lora``; a scratch search has no strategy (it trains everything)."""

    strategy: tuple[str, ...] = ALL_STRATEGIES
    optimizer: tuple[str, ...] = ALL_OPTIMIZERS
    lr: Range = Range("loguniform", 1e-4, 1e-1)
    weight_decay: Range = Range("choice", values=(0.0, 1e-4, 5e-4))
    batch_size: tuple[int, ...] = (16, 32, 64, 128)
    epochs: tuple[int, ...] = (10,)
    schedule: tuple[str, ...] = ("constant", "cosine", "warmup-cosine", "one-cycle")
    label_smoothing: Range = Range("choice", values=(0.0, 0.1))
    augment: tuple[str, ...] = ("none", "flip", "shift", "colour", "all")
    bn_mode: tuple[str, ...] = ("train", "frozen")
    blocks: tuple[int, ...] = (1, 2)
    lora_rank: tuple[int, ...] = (2, 4, 8)
    lora_alpha: tuple[float, ...] = (4.0, 8.0, 16.0)
    data_fraction: tuple[float, ...] = (0.1,)


@dataclass(frozen=True)
class SearchSpec:
    """An adaptive attacker: a Ray Tune search (``algorithm`` tpe: Optuna's TPE sampler, or random) of
    ``num_samples`` fine-tuning recipes per attacked model and restricted domain, ``max_concurrent`` at a
    time, bad trials stopped on their per-epoch validation curve by ``scheduler`` asha (or none: fifo).

    The attacker's objective is its own validation accuracy: ``val_fraction`` of its data pool is held out,
    the rest is what it fine-tunes on (``data_fraction`` of it), and each trial keeps its best-validation
    epoch. The restricted test split only scores the recipes found. Every attacked model (protected,
    normal, scratch) gets the same search with the same budget."""

    name: str = "search"
    algorithm: str = "tpe"
    num_samples: int = 32
    max_concurrent: int = 2
    random_start: int = 8         # tpe: trials drawn at random before the model of good recipes is used
    scheduler: str = "asha"
    grace_period: int = 2         # asha: epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0
    val_fraction: float = 0.2
    seed: int = 0
    space: SearchSpace = field(default_factory=SearchSpace)


SEARCH_ALGORITHMS = ("tpe", "random")
SCHEDULERS = ("asha", "none")


@dataclass(frozen=True)
class AttackSpec:
    """The attacks, on two grids (each a list of grids whose cells are united):

    - ``evaluation``: the reported grid. Attackers fine-tune on their own pool of the restricted training
      split and are scored on the restricted *test* split.
    - ``development``: the only grid that protection settings, probes and checkpoint choice may be tuned
      on. Attackers fine-tune on the protector's restricted share and are scored on restricted
      *validation* data.

    - ``budget``: how far an attacker gets with more epochs and data (the evaluation grid's data; one trial
      per recipe and data fraction, its per-epoch curve read at every epoch).
    - ``benign``: fine-tuning on the unrelated ``benign`` domains (their training split -> their test split),
      where the protected model should do as well as the normal one.
    - ``search``: adaptive attackers (:class:`SearchSpec`).

    ``data_pool``: ``disjoint`` (default) gives the attacker ``pool_fraction`` of the restricted training
    split that the protector never sees; ``shared`` lets the attacker draw from the whole split, the
    protector's share included.
    """

    subjects: tuple[str, ...] = SUBJECTS
    evaluation: tuple[GridSpec, ...] = (GridSpec(),)
    development: tuple[GridSpec, ...] = ()
    budget: tuple[GridSpec, ...] = ()
    benign: tuple[GridSpec, ...] = ()
    search: tuple[SearchSpec, ...] = ()
    data_pool: str = "disjoint"
    pool_fraction: float = 0.5


@dataclass(frozen=True)
class ResourcesSpec:
    """Ray resources. ``protect_workers``: data-parallel workers of one protection (Ray Train);
    ``protect_parallel``: protections (variants x seeds) run at once, each its own Ray Train run.
    ``storage_path``: where Ray Train/Tune keep their state (default ``<output_dir>/ray``); on a multi-node
    cluster a shared path (NFS, s3://...)."""

    protect_workers: int = 1
    protect_parallel: int = 1
    use_gpu: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    storage_path: str | None = None


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None


@dataclass(frozen=True)
class GenerationSpec:
    """Generation mode's DDPM settings (``mode: generation``; ignored in classification mode).

    ``suppression_t`` is the timestep policy of the suppression losses (DoS, negative MSE): ``uniform`` draws
    t ~ U{0..T-1} per image, as the paper's text and every DDPM fine-tuning attacker do; ``one`` is the official
    code's fixed t = 1. ``eval_t`` are the fixed timesteps of the denoising-error metric (common random noise,
    seeded by ``eval_seed``). ``samples`` images are drawn (``sample_steps`` respaced ancestral steps; null: all T)
    for the sample grids before and after an attack (0: none) and, with ``sample_quality``, scored by KID and
    recognisability in an offline-trained restricted-domain classifier's features; FID too when ``fid_weights``
    (or torchvision's cache) holds Inception-v3 weights."""

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    suppression_t: str = "uniform"
    eval_t: tuple[int, ...] = (1, 10, 100, 250, 500)
    eval_seed: int = 0
    samples: int = 16
    sample_steps: int | None = 100
    sample_quality: bool = True
    fid_weights: str | None = field(default=None, metadata={HASHED: False})  # torchvision inception_v3 state dict


@dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    seed: int = 0
    mode: str = "classification"
    output_dir: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    original: DomainSpec = field(default_factory=DomainSpec)
    restricted: tuple[DomainSpec, ...] = (DomainSpec(dataset="digits"),)
    benign: tuple[DomainSpec, ...] = ()   # unrelated domains for attack.benign (never protected against)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    protect: tuple[ProtectSpec, ...] = (ProtectSpec(),)
    attack: AttackSpec = field(default_factory=AttackSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec, metadata={HASHED: UNLESS_DEFAULT})

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# ----------------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<spec>'}: {self.message}"


class SpecError(SophonError, ValueError):
    """Every problem found in a spec, reported at once."""

    def __init__(self, problems: Sequence[Problem], source: str = "spec") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


# ------------------------------------------------------------------------------------- typed building
def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _build(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Convert a YAML value to ``tp``; append a Problem (and return None) where it does not fit."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        problems.append(Problem(path, f"must not be empty (expected {_type_name(tp)})"))
        return None
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            built = [_build(args[0], v, _join(path, i), problems) for i, v in enumerate(items)]
            return tuple(built)
        if len(items) != len(args):
            problems.append(Problem(path, f"expected a list of {len(args)} values, got {value!r}"))
            return None
        return tuple(_build(a, v, _join(path, i), problems) for i, (a, v) in enumerate(zip(args, items)))
    return _build_scalar(tp, value, path, problems)


def _build_scalar(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(Problem(path, f"expected {_type_name(tp)}, got {value!r}"))
    return None


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _build_dataclass(cls: type, value: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, dict):
        problems.append(Problem(path, f"expected a mapping with keys {[f.name for f in fields(cls)]}, got {value!r}"))
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in value:
        if key not in names:
            problems.append(
                Problem(_join(path, key), f"unknown key{did_you_mean(str(key), names)}; allowed: {', '.join(names)}")
            )
    kwargs = {}
    for f in fields(cls):
        if f.name in value:
            built = _build(hints[f.name], value[f.name], _join(path, f.name), problems)
            if built is not None:  # a bad value keeps its default so later checks still run
                kwargs[f.name] = built
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------ overrides
def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.0.c=value`` overrides (value parsed as YAML) to a copy of ``data``."""
    data = json.loads(json.dumps(data))
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, "an override is KEY=VALUE, e.g. protect.0.alpha=5"))
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        if any(part.isdigit() and not isinstance(_lookup(data, parts[:i]), list) for i, part in enumerate(parts)):
            problems.append(Problem(key, f"list items must exist in the YAML before an override indexes them ('{item}')"))
            continue
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = yaml.safe_load(raw)
            else:
                node[last] = yaml.safe_load(raw)
        except (IndexError, ValueError, TypeError, AttributeError):
            problems.append(Problem(key, f"cannot set this path in the spec (override '{item}')"))
    if problems:
        raise SpecError(problems, "overrides")
    return data


def _lookup(data: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


# ------------------------------------------------------------------------------------------ public API
def build_spec(data: Any) -> tuple[SweepSpec | None, list[Problem]]:
    """Type a plain mapping as a :class:`SweepSpec` (bad values keep their defaults); every type problem found."""
    problems: list[Problem] = []
    return _build(SweepSpec, data, "", problems), problems


def read_spec_data(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The YAML mapping of a spec file with dotted overrides applied; SpecError for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([Problem("", f"spec file not found: {path.resolve()}")], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError([Problem("", f"not valid YAML: {err}")], str(path)) from err
    return apply_overrides(data, overrides)


def to_dict(obj: Any, hashed_only: bool = False) -> Any:
    """A dataclass (or tuple of them) as plain JSON-able data; ``hashed_only``: without the fields that do not
    change results (``metadata={HASHED: False}``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name), hashed_only) for f in fields(obj)
                if not hashed_only or _hashed(obj, f)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v, hashed_only) for v in obj]
    return obj


def _hashed(obj: Any, f: dataclasses.Field) -> bool:
    how = f.metadata.get(HASHED, True)
    if how == UNLESS_DEFAULT:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return getattr(obj, f.name) != default
    return bool(how)


def spec_hash(obj: Any) -> str:
    """A stable 12-hex-digit hash of a spec or any slice of it (dataclass, tuple, mapping), over the fields that
    change results."""
    text = json.dumps(to_dict(obj, hashed_only=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def domain_from_dict(data: dict[str, Any]) -> DomainSpec:
    """Rebuild a DomainSpec from a checkpoint card's plain data."""
    problems: list[Problem] = []
    domain = _build(DomainSpec, data, "domain", problems)
    if problems:
        raise SpecError(problems, "checkpoint card")
    return domain
