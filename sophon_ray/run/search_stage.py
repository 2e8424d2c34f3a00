"""The pipeline's [3/4] search stage: every adaptive search (``attack.search``) against every attacked model and
restricted domain, one Tune experiment each under its own MLflow search run, continued from the trials that run
has (its params decoded back from MLflow's strings)."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sophon_ray import names
from sophon_ray.modes import metric_for
from sophon_ray.recipes import SETTINGS
from sophon_ray.run.context import RunContext
from sophon_ray.run.keys import protected_models, search_key

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from sophon_ray.core.data import Splits
    from sophon_ray.run.tracking import Tracker
    from sophon_ray.spec import SweepSpec

CASTS = {name: s.type for name, s in SETTINGS.items() if s.type is int}  # searched params that are integers


def warm_sets(spec: SweepSpec, splits: Splits, kinds: set[str]) -> dict[str, Dataset | None]:
    """The allowed data a search's warm_start choices need (the original training split, the first benign
    domain's training split), loaded only when the space can draw them."""
    from sophon_ray.core.data import load_domain  # noqa: PLC0415
    from sophon_ray.run.trials_worker import warm_data  # noqa: PLC0415

    benign = [load_domain(spec.benign[0])] if "benign" in kinds and spec.benign else []
    return {k: warm_data(k, splits.original_train, benign) for k in kinds - {"none"}}


def search_history(tracker: Tracker, search_run: str, scratch: bool, metric: names.Metric = names.ACCURACY
                   ) -> tuple[list[tuple[int, dict, float, float]], int]:
    """The finished trials of a search run as (search_trial, searched params, objective, test score at the
    best-validation epoch), in search order, and the next free trial number. Trials an interrupted run left
    unfinished are marked KILLED (their number is not reused)."""
    from sophon_ray.spec import SearchSpace  # noqa: PLC0415

    searched = [f.name for f in fields(SearchSpace) if not (scratch and f.name == "strategy")]
    done, numbers = [], [-1]
    for run in tracker.child_runs(search_run):
        numbers.append(int(run.data.params.get(names.SEARCH_TRIAL, -1)))
        metrics, params = run.data.metrics, run.data.params
        if run.info.status != "FINISHED" or metric.val_best not in metrics:
            if run.info.status == "RUNNING":
                tracker.finish(run.info.run_id, "KILLED")
            continue
        values = {k: decode_param(params[k], CASTS.get(k)) for k in searched if k in params}
        done.append((int(params[names.SEARCH_TRIAL]), values, metrics[metric.val_best],
                     metrics.get(metric.at_val_best, metrics[metric.final])))
    return sorted(done, key=lambda row: row[0]), max(numbers) + 1


def decode_param(text: str, cast: Any) -> Any:
    """An MLflow param (a string) back to the value the searcher gave: int, float, or the string itself."""
    if cast is not None:
        return cast(float(text))
    try:
        return float(text)
    except ValueError:
        return text


def search_stage(ctx: RunContext, models: dict[str, Path]) -> None:
    """Every search (attack.search) against every attacked model and restricted domain, one Tune experiment
    each, under its own MLflow search run; a resumed search continues with the trials it has (warm start).

    The search trials' MLflow writes go through an outbox journaled in the grid's journal (``ctx.outbox``, one
    ledger per sweep): a store that stops answering, or a driver that dies, loses no finished search trial; the
    journal is delivered (here, by ``sophon-ray sync`` or by ``--resume``'s grid stage) before a search's history
    is read, so nothing finished is rerun. When the store does not answer for ``$SOPHON_TRACKING_WAIT_S`` the
    stage stops and ``outcome.pending`` / ``outcome.journal`` say what waits in the journal."""
    from sophon_ray.run.stages import through_outbox  # noqa: PLC0415

    def work(outbox: Any, wait: float) -> bool:
        outbox.load_journal()
        outbox.start()
        return outbox.drain(wait) and _searches(ctx, models, outbox, wait)

    through_outbox(ctx, work)


def _searches(ctx: RunContext, models: dict[str, Path], outbox: Any, wait: float) -> bool:
    """The searches, their trials through ``outbox``; False (stopping early) when a search's trials could not be
    delivered within ``wait`` seconds (its history, and so the next search's plan, cannot be read)."""
    from sophon_ray.console.progress import AttackProgress  # noqa: PLC0415
    from sophon_ray.core.data import make_splits  # noqa: PLC0415
    from sophon_ray.run.plan import search_templates  # noqa: PLC0415
    from sophon_ray.run.search_space import best_found  # noqa: PLC0415
    from sophon_ray.run.stages import load_models  # noqa: PLC0415
    from sophon_ray.run.trials_worker import search_data  # noqa: PLC0415
    from sophon_ray.run.tune_driver import (SearchNumbering, make_callback, make_progress_callback,  # noqa: PLC0415
                                            run_search)

    spec, tracker, sid = ctx.spec, ctx.tracker, ctx.sweep_id
    searches, m = {s.name: s for s in spec.attack.search}, metric_for(spec.mode)
    templates = search_templates(spec, protected_models(spec, ctx.options))
    plan = []
    for template in templates:
        search = searches[template.search]
        run_id = tracker.child_run(ctx.parent, sid, "search", search_key(sid, template),
                                   f"search/{search.name}/{template.domain_name}/{template.subject.label}",
                                   {**{k: v for k, v in template.params().items() if k in
                                       (names.SUBJECT, names.VARIANT, names.PROTECT_SEED, names.DOMAIN, names.SEARCH)},
                                    "algorithm": search.algorithm, "scheduler": search.scheduler,
                                    "num_samples": search.num_samples, "val_fraction": search.val_fraction})
        history, first = search_history(tracker, run_id, template.subject.kind == "scratch", m)
        plan.append((template, search, run_id, history, first))
    todo = sum(max(0, s.num_samples - len(h)) for _, s, _, h, _ in plan)
    ctx.say(f"[3/4] search: {len(plan)} searches (search x attacked model x domain), {todo} trials to run")
    splits = make_splits(spec) if todo else None
    loaded = load_models(models) if todo else {}
    counts = AttackProgress(todo)
    with ctx.view.console.progress(counts, prefix="[3/4]"):
        for template, search, run_id, history, first in plan:
            remaining = search.num_samples - len(history)
            if remaining > 0:
                ctx.view.start_ray(ctx.options.address)
                kinds = set(search.space.warm_start) | {template.config.warm_start}
                data = search_data(splits, template.domain, search.val_fraction, search.seed,
                                   warm_sets(spec, splits, kinds))
                name = f"search-{search_key(sid, template)}-{int(time.time())}"
                run_search(spec, search, template, remaining, [(p, v) for _, p, v, _ in history], loaded, data,
                           ctx.storage, name, [make_callback(tracker, run_id, sid, outbox,
                                                             trial_of=SearchNumbering(template, first), metric=m),
                                               make_progress_callback(counts)],
                           spec.resources.max_failures, verbose=1 if ctx.options.verbose else 0)
                if not outbox.drain(wait):   # the history is MLflow's: what the journal holds must be there first
                    return False
                history, _ = search_history(tracker, run_id, template.subject.kind == "scratch", m)
                ctx.outcome.trials_run += remaining
            key = search_key(sid, template)   # its summary through the journal too (points already there are kept)
            outbox.attach(key, run_id)
            outbox.rows(key, [(f.n, {m.found_val: f.val, m.found_test: f.test})
                              for f in best_found([(n, v, t) for n, _, v, t in history])])
            outbox.finish(key, "FINISHED" if len(history) >= search.num_samples else "FAILED")
    ctx.say(f"[3/4] search done | {todo} trials run now")
    return True
