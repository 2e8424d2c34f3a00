"""Attack recipes: the one table of recipe settings, strategies, optimizers and schedules
(:mod:`.table`, the built-ins in :mod:`.builtin`), and what derives from it: :class:`AttackConfig`,
:class:`GridSpec`, :class:`SearchSpace`, :func:`grid_configs`, MLflow params and casts.

Plugins: ``SOPHON_RAY_PLUGINS`` (comma-separated module names) are imported before the table is frozen, in every
process that imports sophon-ray (the driver and every Ray worker, which inherit the variable), so a strategy
registered there (``@TABLE.strategy(...)``, its own settings included) is one a spec can name. Torch-free.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import os
import random
from collections.abc import Sequence
from typing import Any

from sophon_ray.recipes.builtin import TABLE
from sophon_ray.recipes.table import EVERY_MODE, HASHED, PLAIN, UNLESS_DEFAULT, ModelFacts, Range, Setting, Strategy

PLUGINS_ENV = "SOPHON_RAY_PLUGINS"


def _load_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"{PLUGINS_ENV}: cannot import plugin module '{name}' ({err}); fix the module name "
                              f"or unset {PLUGINS_ENV}") from err


_load_plugins()
AttackConfig, GridSpec, SearchSpace = TABLE.freeze()
STRATEGIES, OPTIMIZERS, SCHEDULES, BN_MODES = TABLE.strategies, TABLE.optimizers, TABLE.schedules, TABLE.bn_modes
SETTINGS = TABLE.settings
# scratch trains every parameter of a fresh init, whatever the cell's strategy
SCRATCH_STRATEGY = "direct-all"


def strategies_for(mode: str) -> list[str]:
    """The strategies that apply in ``mode``."""
    return TABLE.strategies_for(mode)


def normalise(config: Any) -> Any:
    """``config`` with every strategy-specific setting its strategy does not use at its default (so two cells
    that train the same way are one cell)."""
    unused = {n: s.default for n, s in SETTINGS.items() if not TABLE.applies(n, config.strategy)}
    return dataclasses.replace(config, **unused) if unused else config


def grid_configs(grids: Sequence[Any]) -> list[Any]:
    """Every cell of a union of grids (each the cross product of its axes, in :meth:`RecipeTable.grid_order`),
    in a fixed order, each cell once."""
    order = TABLE.grid_order()
    configs = [normalise(AttackConfig(**dict(zip(order, values))))
               for g in grids for values in itertools.product(*(getattr(g, n) for n in order))]
    return list(dict.fromkeys(configs))


def draw(space: Any, rng: random.Random, seed: int = 0) -> Any:
    """One recipe drawn from a search space (``attack.search[].space`` syntax) with ``rng``: a list or a ``choice``
    uniformly, a ``loguniform`` / ``uniform`` range by its distribution (an integer setting rounded); every setting
    its strategy does not use at its default. What a simulated attacker (``protect[].environments.recipes``)
    fine-tunes with; the dimensions are drawn in the space's field order."""
    values = {f.name: _draw_one(getattr(space, f.name), rng) for f in dataclasses.fields(space)}
    values = {n: round(v) if SETTINGS[n].type is int else SETTINGS[n].type(v) for n, v in values.items()}
    return normalise(AttackConfig(**values, seed=seed))


def _draw_one(value: Any, rng: random.Random) -> Any:
    if not isinstance(value, Range):
        return value[0] if len(value) == 1 else rng.choice(value)
    if value.distribution == "choice":
        return value.values[0] if len(value.values) == 1 else rng.choice(value.values)
    if value.distribution == "loguniform":
        return math.exp(rng.uniform(math.log(value.low), math.log(value.high)))
    return rng.uniform(value.low, value.high)


def param_casts() -> dict[str, Any]:
    """Attack-run MLflow param name -> the type its string is read back as."""
    return TABLE.casts()


def legacy_defaults() -> dict[str, Any]:
    """What a run that did not log a recipe setting meant."""
    return TABLE.legacy_defaults()


__all__ = ["AttackConfig", "BN_MODES", "EVERY_MODE", "GridSpec", "HASHED", "ModelFacts", "OPTIMIZERS",
           "PLAIN", "PLUGINS_ENV", "Range", "SCHEDULES", "SCRATCH_STRATEGY", "SETTINGS", "STRATEGIES", "SearchSpace", "Setting",
           "Strategy", "TABLE", "UNLESS_DEFAULT", "draw", "grid_configs", "legacy_defaults", "normalise", "param_casts",
           "strategies_for"]


def _values(value: Any) -> str:
    if isinstance(value, Range):
        return (f"{value.distribution} {value.low:g}..{value.high:g}" if value.distribution != "choice"
                else "choice of " + ", ".join(f"{v:g}" for v in value.values))
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


def settings_markdown() -> str:
    """The recipe settings as the markdown table ``docs/attacks.md`` shows (a test keeps the two equal):
    name, type, default, default grid axis, default search dimension, the strategies it belongs to."""
    rows = ["| setting | type | default | grid default | search default | used by | what |", "|---|---|---|---|---|---|---|"]
    space = SearchSpace()
    for name, s in SETTINGS.items():
        search = _values(getattr(space, name)) if hasattr(space, name) else "-"
        rows.append(f"| `{name}` | {s.type.__name__} | {s.default!r} | {_values(s.grid_default)} | {search} | "
                    f"{', '.join(s.strategies) or 'every strategy'} | {s.doc} |")
    return "\n".join(rows)
