"""The one table of attack recipe settings. Every setting of a fine-tuning attack (the strategy, the optimizer,
the learning rate, ..., a strategy's own settings such as ``blocks``) is declared here once, with its type, its
valid values, its default and its default grid axis and search dimension; everything else derives from it:
:class:`AttackConfig` (one recipe), the spec's grid axes (``GridSpec``) and search space (``SearchSpace``), the
MLflow params of an attack run and the casts that read them back, validation, and ``sophon-ray ls``.

A strategy, an optimizer and a schedule are registered once (:meth:`RecipeTable.strategy`,
:attr:`RecipeTable.optimizers`, :attr:`RecipeTable.schedules`), a strategy declaring the modes it applies to and
its own settings. The table is torch-free; implementations import torch when they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sophon_ray.registry import Registry

HASHED = "hashed"                  # the spec's field-metadata key (spec.schema re-exports these two)
UNLESS_DEFAULT = "unless-default"  # hashed (and logged) only when it differs from its default
PLAIN = "plain"                    # the family of a recipe that moves no family setting
EVERY_MODE: tuple[str, ...] = ()   # a strategy or setting for every mode (the mode table sits above this one)


@dataclass(frozen=True)
class Range:
    """A numeric search dimension: ``loguniform`` / ``uniform`` over [low, high], or ``choice`` of ``values``."""

    distribution: str = "loguniform"
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Setting:
    """One recipe setting.

    ``type`` is int, float or str; ``choices`` (str settings) returns the names it may take; ``low``/``high``
    bound numbers (``low_open``: low itself excluded). ``grid`` is the spec grid's default axis and ``search``
    the default search dimension (a tuple of choices, or a :class:`Range`); None means the default alone.
    ``strategies``: the strategies that use it (empty: every strategy); elsewhere a grid collapses it to its
    default and a search does not draw it. ``modes``: the modes it applies in (empty: every mode).

    ``since`` keeps trial keys and sweep ids stable as settings are added: 0, a setting of the first attack
    grids (always logged, always in a grid's hash); 1, added before the table (always logged; older runs lack it
    and mean its default; in a grid's hash only when not at its default); 2, added since (logged, keyed and
    hashed only when not at its default).

    ``family``: the defence-aware attack family the setting belongs to (``shrink``, ``adapt``, ...; empty: an
    ordinary fine-tuning setting). The first setting of a family leads it: a recipe's family
    (:meth:`RecipeTable.family`) names every lead it moves off its default (the others, such as ``adapt_epochs``,
    only tune their lead), so the report can say how much each family recovers."""

    name: str
    type: type
    default: Any
    doc: str
    grid: tuple | None = None
    search: tuple | Range | Callable[[], tuple] | None = None
    choices: Callable[[], Sequence[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    strategies: tuple[str, ...] = ()
    modes: tuple[str, ...] = EVERY_MODE
    since: int = 2
    family: str = ""

    @property
    def grid_default(self) -> tuple:
        return self.grid if self.grid is not None else (self.default,)

    @property
    def search_default(self) -> tuple | Range:
        value = self.search() if callable(self.search) else self.search
        return value if value is not None else (self.default,)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid value of this setting (what is allowed), or None."""
        if self.choices is not None:
            allowed = list(self.choices())
            if value not in allowed:
                from sophon_ray.registry import did_you_mean  # noqa: PLC0415

                return f"unknown {self.name} '{value}'{did_you_mean(str(value), allowed)}; allowed: {', '.join(allowed)}"
            return None
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value:g}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}, got {value:g}"
        return None


@dataclass(frozen=True)
class Strategy:
    """A fine-tuning strategy: ``apply(model, generator, config)`` re-initialises (or wraps) what it says and
    returns the names of the parameters that train; ``check(facts, config)`` says why it cannot run on a model
    (facts: :class:`ModelFacts`) with ``config``'s settings, or None."""

    name: str
    doc: str
    apply: Callable[..., list[str]]
    modes: tuple[str, ...]
    settings: tuple[str, ...]
    check: Callable[[ModelFacts, Any], str | None] | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What a strategy may need to know of a model to say whether it can run on it."""

    arch: str
    mode: str
    blocks: int          # len(model.blocks())
    lora_targets: int    # convs / hidden Linears LoRA can wrap
    grouped_convs: int   # grouped convolutions (LoRA cannot wrap them)
    norm_pairs: int = 0  # convolutions feeding a BatchNorm (what rescale rescales)


class RecipeTable:
    """Settings, strategies, optimizers and schedules, each registered once. :meth:`freeze` builds the
    dataclasses the rest of the code uses; registering after that is an error (register in a plugin module:
    ``SOPHON_RAY_PLUGINS``)."""

    def __init__(self) -> None:
        self.settings: dict[str, Setting] = {}
        self.strategies: Registry[Strategy] = Registry("strategy")
        self.optimizers: Registry[Callable[..., Any]] = Registry("optimizer")
        self.schedules: Registry[Callable[[int], Callable[[int], float]]] = Registry("lr schedule")
        self.bn_modes: Registry[bool] = Registry("BN mode")
        self.search_order: tuple[str, ...] = ()   # the order a search suggests dimensions in (TPE's draws follow it)
        self.frozen = False

    # ------------------------------------------------------------------------------------------ registration
    def _open(self, what: str) -> None:
        if self.frozen:
            raise RuntimeError(f"{what}: the recipe table is frozen (AttackConfig, GridSpec and SearchSpace are "
                               "built); register in a plugin module named in SOPHON_RAY_PLUGINS, which sophon-ray "
                               "imports before building them")

    def setting(self, setting: Setting) -> Setting:
        """Declare a setting; a second declaration of the same name is an error."""
        self._open(f"setting {setting.name}")
        if setting.name in self.settings:
            raise ValueError(f"recipe setting '{setting.name}' is declared twice")
        self.settings[setting.name] = setting
        return setting

    def strategy(self, name: str, *, modes: tuple[str, ...] = EVERY_MODE, settings: Sequence[Setting | str] = (),
                 check: Callable[[ModelFacts, Any], str | None] | None = None,
                 doc: str | None = None) -> Callable[[Callable[..., list[str]]], Callable[..., list[str]]]:
        """Decorator registering ``apply`` as strategy ``name``, for ``modes``, with its own ``settings`` (a
        :class:`Setting` declares a new one; a name reuses one another strategy declared)."""

        def add(apply: Callable[..., list[str]]) -> Callable[..., list[str]]:
            self._open(f"strategy {name}")
            own = []
            for s in settings:
                if isinstance(s, Setting):
                    self.setting(dataclasses.replace(s, strategies=(*s.strategies, name), modes=modes))
                    own.append(s.name)
                else:
                    old = self.settings[s]
                    self.settings[s] = dataclasses.replace(old, strategies=(*old.strategies, name))
                    own.append(s)
            first = (doc or apply.__doc__ or "").strip().splitlines()
            self.strategies.register(name, first[0] if first else "")(
                Strategy(name, first[0] if first else "", apply, tuple(modes), tuple(own), check))
            return apply

        return add

    def order(self, *names: str) -> None:
        """Put the named settings first, in this order (the order of MLflow params, report columns and the grid
        product); the others follow in registration order."""
        self._open("order")
        rest = [n for n in self.settings if n not in names]
        self.settings = {n: self.settings[n] for n in (*names, *rest)}

    def _search_names(self) -> list[str]:
        named = [n for n in self.search_order if n in self.settings]
        return named + [n for n in self.settings if n not in named and n != "seed"]

    # ------------------------------------------------------------------------------------------- questions
    def strategies_for(self, mode: str) -> list[str]:
        """The strategies that apply in ``mode``, in registration order."""
        return [n for n in self.strategies.names()
                if not self.strategies.get(n).modes or mode in self.strategies.get(n).modes]

    def applies(self, name: str, strategy: str) -> bool:
        """Whether setting ``name`` means something for ``strategy`` (a strategy's own settings do only there)."""
        owners = self.settings[name].strategies
        return not owners or strategy in owners

    def grid_order(self) -> list[str]:
        """The settings in grid-product order: the table's order, ``seed`` last (cells of one recipe with
        different seeds are neighbours)."""
        names = [n for n in self.settings if n != "seed"]
        return names + (["seed"] if "seed" in self.settings else [])

    def family(self, values: Any) -> str:
        """The attack family of a recipe (an AttackConfig, or a mapping such as a report row): its family settings
        off their defaults, joined with `` + `` (a text setting with its value: ``adapt entropy``); ``plain`` when
        none is."""
        get = values.get if isinstance(values, Mapping) else (lambda n, d=None: getattr(values, n, d))
        leads = {s.family: s for s in reversed(self.settings.values()) if s.family}.values()
        moved = [s for s in self.settings.values() if s in leads and get(s.name, s.default) != s.default]
        return " + ".join(f"{s.family} {get(s.name)}" if s.type is str else s.family for s in moved) or PLAIN

    def params(self, config: Any) -> dict[str, Any]:
        """An attack's MLflow params: every setting, except one added since the table (``since`` 2) at its default
        (so the keys of trials that do not use it stay what they were)."""
        return {n: getattr(config, n) for n, s in self.settings.items()
                if not (s.since >= 2 and getattr(config, n) == s.default)}

    def casts(self) -> dict[str, Callable[[str], Any]]:
        """MLflow param (a string) -> its type, per setting."""
        return {n: s.type for n, s in self.settings.items()}

    def legacy_defaults(self) -> dict[str, Any]:
        """What a run that did not log a setting meant: its default, for every setting added after the first
        grids (``since`` >= 1)."""
        return {n: s.default for n, s in self.settings.items() if s.since >= 1}

    # ------------------------------------------------------------------------------------------- the classes
    def freeze(self) -> tuple[type, type, type]:
        """Build (AttackConfig, GridSpec, SearchSpace) from the table and close it to registration."""
        self.frozen = True
        config = dataclasses.make_dataclass(
            "AttackConfig", [(n, s.type, field(default=s.default)) for n, s in self.settings.items()],
            frozen=True, namespace={"__doc__": "One attack recipe (one fine-tuning run): every setting of the "
                                    "recipe table, with its default.", "as_params": lambda c: self.params(c)})
        grid = dataclasses.make_dataclass(
            "GridSpec", [(n, tuple[self.settings[n].type, ...],
                          field(default=self.settings[n].grid_default,
                                metadata={HASHED: UNLESS_DEFAULT} if self.settings[n].since >= 1 else {}))
                         for n in self.grid_order()],
            frozen=True, namespace={"__doc__": "An attack grid: every key is a list of values of one recipe "
                                    "setting; the grid is their cross product (a strategy's own settings collapse "
                                    "to their default where the strategy does not use them)."})
        space = dataclasses.make_dataclass(
            "SearchSpace", [(n, _dimension_type(s),
                             field(default=s.search_default,
                                   metadata={HASHED: UNLESS_DEFAULT} if s.since >= 2 else {}))
                            for n, s in ((n, self.settings[n]) for n in self._search_names())],
            frozen=True, namespace={"__doc__": "What the adaptive attacker may choose: every list is a categorical "
                                    "choice (one value: fixed, not searched), every Range a numeric dimension. A "
                                    "strategy's own settings are searched only when that strategy is drawn; a "
                                    "scratch search has no strategy (it trains everything)."})
        for cls in (config, grid, space):
            cls.__module__ = "sophon_ray.recipes"
        return config, grid, space


def _dimension_type(setting: Setting) -> Any:
    """A search dimension's type: a list of values, or for a number also a Range (a mapping in the spec)."""
    values = tuple[setting.type, ...]
    return values | Range if setting.type in (int, float) else values
