"""The adaptive attacker's search, as plain functions: the space as Optuna distributions (conditional on the
strategy), the searcher and scheduler Ray Tune runs it with, the warm start that lets ``--resume`` continue a
search from the trials MLflow already holds, and the attacker's pick (best validation accuracy so far).

Ray Tune drives the search (:func:`sophon_ray.run.tune_driver.run_search`): Optuna's TPE sampler (or a random
one) through ``ray.tune.search.optuna.OptunaSearch`` with a define-by-run space, at most ``max_concurrent``
trials at once, and ASHA stopping trials whose validation curve lags at its rungs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sophon_ray import names
from sophon_ray.spec import DefendSpec, Range, SearchSpace, SearchSpec

log = logging.getLogger(__name__)

LAST_K = ("last-k", "reinit-last-k")
# searched only for some strategies: dimension -> the strategies it means something for
CONDITIONAL = {"blocks": LAST_K, "lora_rank": ("lora",), "lora_alpha": ("lora",)}


def distribution(value: tuple | Range) -> Any | None:
    """The Optuna distribution of one space field (an attacker's or a defender's); None when it has one value
    (fixed, not searched)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution  # noqa: PLC0415

    if isinstance(value, Range):
        if value.distribution == "choice":
            return CategoricalDistribution(list(value.values)) if len(value.values) > 1 else None
        return FloatDistribution(value.low, value.high, log=value.distribution == "loguniform")
    return CategoricalDistribution(list(value)) if len(value) > 1 else None


def dimensions(space: SearchSpace, strategy: str | None, scratch: bool = False) -> dict[str, Any]:
    """The searched dimensions (name -> Optuna distribution), in a fixed order, for a trial whose strategy is
    ``strategy`` (None: the unconditional ones only). Scratch has no strategy: it trains everything."""
    out = {}
    for f in fields(space):
        if (f.name == "strategy" and scratch) or (f.name in CONDITIONAL and strategy not in CONDITIONAL[f.name]):
            continue
        dist = distribution(getattr(space, f.name))
        if dist is not None:
            out[f.name] = dist
    return out


def _suggest(trial: Any, name: str, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution  # noqa: PLC0415

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


class DefineByRun:
    """Optuna define-by-run space: the unconditional dimensions, then those the drawn strategy needs. A class,
    not a closure: Tune pickles the searcher (and so this) into its experiment state."""

    def __init__(self, space: SearchSpace, fixed_strategy: str, scratch: bool) -> None:
        self.space, self.fixed_strategy, self.scratch = space, fixed_strategy, scratch

    def __call__(self, trial: Any) -> None:
        unconditional = dimensions(self.space, None, self.scratch)
        chosen = {name: _suggest(trial, name, dist) for name, dist in unconditional.items()}
        strategy = chosen.get("strategy", self.fixed_strategy)
        for name, dist in dimensions(self.space, strategy, self.scratch).items():
            if name not in chosen:
                _suggest(trial, name, dist)


def sampler(search: SearchSpec | DefendSpec) -> Any:
    """Optuna's TPE sampler (``random_start`` random trials first) or a random sampler, seeded by the search (an
    attacker's or a defender's)."""
    import optuna  # noqa: PLC0415

    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.random_start)


def warm_study(search: SearchSpec, fixed_strategy: str, scratch: bool, history: Sequence[tuple[dict, float]],
               study_name: str) -> Any:
    """An in-memory Optuna storage holding a study with the finished trials of an earlier run of this search
    (their searched params and objective), so a resumed search continues where it was. Trials whose params
    the current space cannot hold (the space changed) are skipped with a warning."""
    import optuna  # noqa: PLC0415

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                sampler=sampler(search))
    for params, value in history:
        dims = dimensions(search.space, params.get("strategy", fixed_strategy), scratch)
        picked = {name: params[name] for name in dims if name in params}
        try:
            study.add_trial(optuna.trial.create_trial(params=picked, distributions=dims, value=value))
        except ValueError as err:
            log.warning("search %s: an earlier trial does not fit the current space (%s); not used", search.name,
                        err)
    return storage


def searcher(search: SearchSpec, fixed_strategy: str, scratch: bool, history: Sequence[tuple[dict, float]],
             study_name: str, objective: str = names.VAL_BEST) -> Any:
    """The Tune search algorithm: OptunaSearch over the define-by-run space, warm-started, concurrency-limited,
    maximising ``objective`` (the best validation score of a trial: accuracy, or generation's denoising skill)."""
    from ray.tune.search import ConcurrencyLimiter  # noqa: PLC0415
    from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

    optuna_search = OptunaSearch(space=DefineByRun(search.space, fixed_strategy, scratch), metric=objective,
                                 mode="max", sampler=sampler(search), study_name=study_name,
                                 storage=warm_study(search, fixed_strategy, scratch, history, study_name))
    return ConcurrencyLimiter(optuna_search, max_concurrent=search.max_concurrent)


def scheduler(search: SearchSpec) -> Any:
    """ASHA on the per-epoch validation curve (``epoch`` is the time unit), or FIFO (no early stopping)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: PLC0415

    if search.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=max(search.space.epochs), grace_period=search.grace_period,
                         reduction_factor=search.reduction_factor)


@dataclass(frozen=True)
class Found:
    """After ``n`` trials of a search: the attacker's pick so far (the trial with the best validation
    accuracy; ties: the earlier), its validation accuracy and its test accuracy (at its best-validation epoch)."""

    n: int
    trial: int
    val: float
    test: float


def best_found(trials: Sequence[tuple[int, float, float]]) -> list[Found]:
    """The attacker's pick after each trial: ``trials`` are (search_trial, val_acc_best, test accuracy at that
    epoch), in any order; the result has one row per n = 1..len(trials) in search order."""
    out: list[Found] = []
    best: tuple[int, float, float] | None = None
    for n, (index, val, test) in enumerate(sorted(trials), start=1):
        if best is None or val > best[1]:
            best = (index, val, test)
        out.append(Found(n, best[0], best[1], best[2]))
    return out
