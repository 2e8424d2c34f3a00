"""The sweep spec: frozen, typed dataclasses loaded from YAML, with dotted overrides and one validation pass.

Precedence: dataclass defaults < YAML file < ``--set a.b=v`` overrides (< grid point, in the drivers).
Validation walks the whole document, collects every problem (field path, bad value, what is allowed,
did-you-mean) and raises a single :class:`SpecError`; nothing expensive starts before it passes.
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

from sophon_ray.registry import did_you_mean

SUBJECTS = ("protected", "normal", "scratch")
MODES = ("classification",)


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
class ProtectSpec:
    """One SOPHON variant.

    ``max_drop`` (points below the normal model's original validation accuracy) is the rollback floor, a
    guard against collapse (the official code's floor is 80% absolute); ``select_drop`` is the stricter
    intactness bound a probed checkpoint must meet to be selected.
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
    seed: int = 0
    environments: EnvironmentSpec = field(default_factory=EnvironmentSpec)

    @property
    def label(self) -> str:
        return self.name or self.loss


@dataclass(frozen=True)
class GridSpec:
    """Every key is a list; the attack grid is their cross product."""

    strategy: tuple[str, ...] = ("direct-all", "initfc-all", "direct-fc", "initfc-fc")
    optimizer: tuple[str, ...] = ("sgd", "momentum", "adam")
    lr: tuple[float, ...] = (1e-3, 1e-2)
    batch_size: tuple[int, ...] = (32,)
    data_fraction: tuple[float, ...] = (0.1,)
    schedule: tuple[str, ...] = ("constant",)
    epochs: tuple[int, ...] = (10,)
    seed: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class AttackSpec:
    subjects: tuple[str, ...] = SUBJECTS
    grid: GridSpec = field(default_factory=GridSpec)
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ResourcesSpec:
    """Ray resources. ``storage_path``: where Ray Train/Tune keep their state (default
    ``<output_dir>/ray``); on a multi-node cluster a shared path (NFS, s3://...)."""

    protect_workers: int = 1
    use_gpu: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    storage_path: str | None = None


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None


@dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    seed: int = 0
    mode: str = "classification"
    output_dir: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    original: DomainSpec = field(default_factory=DomainSpec)
    restricted: tuple[DomainSpec, ...] = (DomainSpec(dataset="digits"),)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    protect: tuple[ProtectSpec, ...] = (ProtectSpec(),)
    attack: AttackSpec = field(default_factory=AttackSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

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


class SpecError(ValueError):
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


# ------------------------------------------------------------------------------------------ semantics
def _check_semantics(spec: SweepSpec, problems: list[Problem]) -> None:
    from sophon_ray import registries  # noqa: PLC0415 - imports torch; only after typing passed

    def name_in(path: str, value: str, registry: Any) -> None:
        if value not in registry:
            problems.append(Problem(path, registry.miss_message(value)))

    def positive(path: str, value: float | None) -> None:
        if value is not None and value <= 0:
            problems.append(Problem(path, f"must be > 0, got {value}"))

    def fraction(path: str, value: float | None, low_open: bool = True) -> None:
        if value is not None and not ((0 < value <= 1) if low_open else (0 <= value <= 1)):
            problems.append(Problem(path, f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}"))

    if spec.mode not in MODES:
        problems.append(Problem("mode", f"'{spec.mode}' is not supported; allowed: {', '.join(MODES)} "
                                "(generation/DoS is not implemented yet)"))
    name_in("model.arch", spec.model.arch, registries.MODELS)
    positive("model.num_classes", spec.model.num_classes)
    domains = [("original", spec.original)] + [(f"restricted.{i}", d) for i, d in enumerate(spec.restricted)]
    if not spec.restricted:
        problems.append(Problem("restricted", "needs at least one restricted domain"))
    for path, d in domains:
        name_in(f"{path}.dataset", d.dataset, registries.DATASETS)
        positive(f"{path}.image_size", d.image_size)
        if d.channels not in (1, 3):
            problems.append(Problem(f"{path}.channels", f"must be 1 or 3, got {d.channels}"))
        for key in ("train_size", "test_size"):
            positive(f"{path}.{key}", getattr(d, key))
        for key in ("mean", "std"):
            if len(getattr(d, key)) not in (1, d.channels):
                problems.append(Problem(f"{path}.{key}", f"needs 1 or {d.channels} values, got {getattr(d, key)}"))
        if any(s <= 0 for s in d.std):
            problems.append(Problem(f"{path}.std", f"must be > 0, got {d.std}"))
        if (d.image_size, d.channels) != (spec.original.image_size, spec.original.channels):
            problems.append(Problem(f"{path}.image_size", "every domain feeds the same model: image_size and "
                                    f"channels must match original ({spec.original.image_size}, "
                                    f"{spec.original.channels}), got ({d.image_size}, {d.channels})"))
    p = spec.pretrain
    name_in("pretrain.optimizer", p.optimizer, registries.OPTIMIZERS)
    for key in ("epochs", "lr", "batch_size"):
        positive(f"pretrain.{key}", getattr(p, key))
    if p.weights and p.weights != "torchvision" and not (Path(p.weights) / "model.json").is_file():
        problems.append(Problem("pretrain.weights", f"no sophon-ray checkpoint at {Path(p.weights).resolve()} "
                                "(expected model.json + model.safetensors); give a checkpoint directory, "
                                "'torchvision' for published ImageNet weights, or null to pretrain"))
    if not 0 < p.val_fraction < 1:
        problems.append(Problem("pretrain.val_fraction", f"must be in (0, 1), got {p.val_fraction}"))
    labels = [v.label for v in spec.protect]
    for i, v in enumerate(spec.protect):
        path = f"protect.{i}"
        name_in(f"{path}.loss", v.loss, registries.LOSSES)
        for key in ("iterations", "inner_steps", "base_lr", "alpha", "beta", "batch_size", "clip_norm",
                    "eval_every", "probe_every", "probe_epochs"):
            positive(f"{path}.{key}", getattr(v, key))
        for key in ("ntr_steps", "max_rollbacks", "max_drop", "select_drop"):
            if getattr(v, key) < 0:
                problems.append(Problem(f"{path}.{key}", f"must be >= 0, got {getattr(v, key)}"))
        if not 0 < v.query_fraction < 1:
            problems.append(Problem(f"{path}.query_fraction", f"must be in (0, 1), got {v.query_fraction}"))
        elif v.batch_size < 4:
            problems.append(Problem(f"{path}.batch_size", "support and query need >= 2 samples each "
                                    f"(BatchNorm): raise batch_size ({v.batch_size}) to 4 or more"))
        if labels.count(v.label) > 1:
            problems.append(Problem(f"{path}.name", f"variant name '{v.label}' is used twice: give each "
                                    "protect entry a unique name"))
        env = v.environments
        if not env.optimizers:
            problems.append(Problem(f"{path}.environments.optimizers", "needs at least one optimizer"))
        for j, opt in enumerate(env.optimizers):
            name_in(f"{path}.environments.optimizers.{j}", opt, registries.INNER_OPTIMIZERS)
        if env.lr[0] <= 0 or env.lr[0] > env.lr[1]:
            problems.append(Problem(f"{path}.environments.lr", f"needs 0 < low <= high, got {list(env.lr)}"))
        fraction(f"{path}.environments.head_reinit", env.head_reinit, low_open=False)
        fraction(f"{path}.environments.head_only", env.head_only, low_open=False)
    a = spec.attack
    for i, s in enumerate(a.subjects):
        if s not in SUBJECTS:
            problems.append(Problem(f"attack.subjects.{i}", f"unknown subject '{s}'{did_you_mean(s, list(SUBJECTS))}; "
                                    f"allowed: {', '.join(SUBJECTS)}"))
    if "protected" in a.subjects and not spec.protect:
        problems.append(Problem("attack.subjects", "'protected' needs at least one protect variant"))
    if a.weight_decay < 0:
        problems.append(Problem("attack.weight_decay", f"must be >= 0, got {a.weight_decay}"))
    g = a.grid
    for f_ in fields(GridSpec):
        values = getattr(g, f_.name)
        if not values:
            problems.append(Problem(f"attack.grid.{f_.name}", "is empty: give at least one value"))
    checks = {"strategy": registries.STRATEGIES, "optimizer": registries.OPTIMIZERS,
              "schedule": registries.SCHEDULES}
    for key, registry in checks.items():
        for j, value in enumerate(getattr(g, key)):
            name_in(f"attack.grid.{key}.{j}", value, registry)
    for key in ("lr", "batch_size", "epochs"):
        for j, value in enumerate(getattr(g, key)):
            positive(f"attack.grid.{key}.{j}", value)
    for j, value in enumerate(g.data_fraction):
        fraction(f"attack.grid.data_fraction.{j}", value)
    r = spec.resources
    positive("resources.protect_workers", r.protect_workers)
    positive("resources.cpus_per_trial", r.cpus_per_trial)
    if r.max_failures < 0:
        problems.append(Problem("resources.max_failures", f"must be >= 0, got {r.max_failures}"))
    if r.gpus_per_trial < 0:
        problems.append(Problem("resources.gpus_per_trial", f"must be >= 0, got {r.gpus_per_trial}"))


# ------------------------------------------------------------------------------------------ public API
def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    """Build and validate a :class:`SweepSpec` from a plain mapping; raise :class:`SpecError` listing all problems."""
    problems: list[Problem] = []
    spec = _build(SweepSpec, data, "", problems)
    if not problems:
        _check_semantics(spec, problems)
    elif spec is not None:
        try:
            _check_semantics(spec, problems)
        except Exception:  # noqa: BLE001 - a half-built spec may not support every check; typing errors stand
            pass
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> SweepSpec:
    """Read a YAML sweep spec, apply dotted overrides, validate; raise :class:`SpecError` listing all problems."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([Problem("", f"spec file not found: {path.resolve()}")], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError([Problem("", f"not valid YAML: {err}")], str(path)) from err
    return parse_spec(apply_overrides(data, overrides), str(path))


def to_dict(obj: Any) -> Any:
    """A dataclass (or tuple of them) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def spec_hash(obj: Any) -> str:
    """A stable 12-hex-digit hash of a spec or any slice of it (dataclass, tuple, mapping)."""
    text = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def domain_from_dict(data: dict[str, Any]) -> DomainSpec:
    """Rebuild a DomainSpec from a checkpoint card's plain data."""
    problems: list[Problem] = []
    domain = _build(DomainSpec, data, "domain", problems)
    if problems:
        raise SpecError(problems, "checkpoint card")
    return domain
