"""Building a :class:`SweepSpec` from YAML: typed building with every problem collected (field path,
did-you-mean), dotted ``--set`` overrides, and the stable hashes that key every stage's cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from sophon_ray.errors import SophonError
from sophon_ray.registry import did_you_mean
from sophon_ray.spec.schema import HASHED, UNLESS_DEFAULT, DomainSpec, SweepSpec

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


def _strip_optional(tp: Any, value: Any) -> tuple[Any, bool]:
    """``tp`` without its None (and whether it had one); of a union of a dataclass and another type, the dataclass
    for a mapping and the other type for anything else (a search dimension: a Range or a list of values); of a
    union of several plain types (a timestep policy: a name, an integer or a list), the one the value is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        fits = [a for a in args if dataclasses.is_dataclass(a) == isinstance(value, dict)] or args
        optional = len(args) < len(typing.get_args(tp))
        if len(fits) > 1:
            exact = [a for a in fits if _is(a, value)]
            if not exact:   # none fits: the problem names every type the field takes
                return typing.Union[tuple(fits)], optional
            fits = exact
        return fits[0], optional
    return tp, False


def _is(tp: Any, value: Any) -> bool:
    """Whether a YAML value is already of the plain type ``tp`` (a list for a tuple type; a bool is no number)."""
    if typing.get_origin(tp) is tuple:
        return isinstance(value, list)
    if tp in (int, float):
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return isinstance(tp, type) and isinstance(value, tp)


def _build(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Convert a YAML value to ``tp``; append a Problem (and return None) where it does not fit."""
    tp, optional = _strip_optional(tp, value)
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
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return "a list" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} values"
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


__all__ = ["Problem", "SpecError", "_join", "_strip_optional", "_build", "_build_scalar", "_type_name", "_build_dataclass", "apply_overrides", "_lookup", "build_spec", "read_spec_data", "to_dict", "_hashed", "spec_hash", "domain_from_dict"]
