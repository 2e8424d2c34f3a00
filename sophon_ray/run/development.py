"""The development side of the protocol as the defender search uses it: the protector's data
(:class:`DevelopmentData`: no attacker pool, no test split), the best development attack on a model over a grid of
recipes, and the estimate a protection reports at each probe checkpoint. Used by the Ray Train worker (which
attacks a defender candidate right after protecting it) and by the defender's driver (the scratch baseline)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sophon_ray import names
from sophon_ray.core.metrics import defend_objective

if TYPE_CHECKING:
    from torch.utils.data import Dataset


@dataclass(frozen=True)
class DevelopmentData:
    """What a defender trial may read: the original domain (protection) and the protector's restricted share and
    validation split; the attacker's pool and the test splits are not in it."""

    original_train: Dataset
    original_val: Dataset
    restricted_train: list[Dataset]
    restricted_val: list[Dataset]


def development_data(splits: Any) -> DevelopmentData:
    """The defender's share of a sweep's splits (:class:`sophon_ray.core.data.Splits`)."""
    return DevelopmentData(splits.original_train, splits.original_val, splits.restricted_train, splits.restricted_val)


def development_best(model: Any, configs: Sequence[Any], data: DevelopmentData, task: Any, chance: float,
                     device: str = "cpu", scratch: bool = False) -> float:
    """The best final development score over ``configs`` on every restricted domain (fine-tuning on the
    protector's share, scored on validation), floored at ``chance``; ``scratch``: a fresh init per recipe."""
    from sophon_ray.core.attack import finetune, scratch_model  # noqa: PLC0415
    from sophon_ray.recipes import SCRATCH_STRATEGY  # noqa: PLC0415

    best = chance
    for config in (list(dict.fromkeys(replace(c, strategy=SCRATCH_STRATEGY) for c in configs)) if scratch
                   else configs):
        for train, val in zip(data.restricted_train, data.restricted_val, strict=True):
            start = scratch_model(model, config.seed) if scratch else model
            warm = data.original_train if config.warm_start == "original" else None
            best = max(best, finetune(start, train, val, config, device=device, task=task, warm=warm).final)
    return best


def red_team_search(model: Any, red: Any, data: DevelopmentData, task: Any, chance: float,
                    device: str = "cpu") -> list[tuple[Any, float]]:
    """The development attacker search on one model (``red``: :class:`~sophon_ray.spec.RedTeamSpec`): Optuna draws
    ``red.num_samples`` recipes from ``red.space`` (conditional dimensions as the attacker's search has them), each
    fine-tunes the model on the protector's share of every restricted domain and scores its best validation
    epoch there (the best over domains, floored at ``chance``: the attacker keeps its best-validation epoch). Returns
    (recipe, score) per trial in trial order. Never the attacker's pool, never test data."""
    import optuna  # noqa: PLC0415

    from sophon_ray.core.attack import finetune  # noqa: PLC0415
    from sophon_ray.recipes import AttackConfig, normalise  # noqa: PLC0415
    from sophon_ray.run.plan import fixed_values  # noqa: PLC0415
    from sophon_ray.run.search_space import DefineByRun, sampler  # noqa: PLC0415

    fixed = {**fixed_values(red), "seed": red.seed}
    space = DefineByRun(red.space, fixed.get("strategy", AttackConfig().strategy), scratch=False)
    study = optuna.create_study(direction="maximize", sampler=sampler(red))
    out: list[tuple[Any, float]] = []
    for _ in range(red.num_samples):
        trial = study.ask()
        space(trial)
        config = normalise(AttackConfig(**{**fixed, **trial.params}))
        score = chance
        warm = data.original_train if config.warm_start == "original" else None
        for train, val in zip(data.restricted_train, data.restricted_val, strict=True):
            score = max(score, finetune(model, train, val, config, device=device, task=task, warm=warm).best)
        study.tell(trial, score)
        out.append((config, score))
    return out


def found_text(found: Sequence[tuple[Any, float]], join: int) -> str:
    """The ``join`` best recipes of a red team as JSON (each its settings off their defaults), best first."""
    from sophon_ray.recipes import AttackConfig  # noqa: PLC0415
    from sophon_ray.spec import to_dict  # noqa: PLC0415

    default = to_dict(AttackConfig())
    best = sorted(found, key=lambda f: -f[1])[:join]
    return json.dumps([{k: v for k, v in to_dict(c).items() if v != default[k]} for c, _ in best])


def found_recipes(text: str) -> tuple[Any, ...]:
    """:func:`found_text` read back: the recipes."""
    from sophon_ray.recipes import AttackConfig  # noqa: PLC0415

    return tuple(AttackConfig(**d) for d in json.loads(text or "[]"))


def probe_report(row: Mapping[str, float], normal_val: float, scratch_best: float, guard: float,
                 probe_key: str, original_key: str) -> dict[str, float] | None:
    """What a protection reports to its defender trial at a probe checkpoint (None for other rows): the probe's
    development estimate of the objective (the probe score minus scratch's best development score), or the
    infeasible value when the original-domain drop already exceeds the guard; and that drop (so that a candidate
    ASHA stops at the probe still has one, for the report's table and Pareto figure)."""
    if probe_key not in row:
        return None
    drop = normal_val - row.get(original_key, normal_val)
    value, feasible = defend_objective(row[probe_key], scratch_best, drop, guard)
    return {names.DEFEND_OBJECTIVE: value, names.FEASIBLE: float(feasible), probe_key: row[probe_key],
            names.DEFEND_DROP: drop}


__all__ = ["DevelopmentData", "development_best", "development_data", "found_recipes", "found_text", "probe_report", "red_team_search"]
