"""The pipeline's model and grid stages: [1/4] pretrain and protect (Ray Train, reusing stored models), their
MLflow runs, and [2/4] the attack grid (Ray Tune, reusing finished trials; the trials still to run packed by
``attack.pack``, :mod:`sophon_ray.run.packing`). Every MLflow write of a stage goes through the sweep's journaled
outbox (:func:`through_outbox`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sophon_ray import names
from sophon_ray.console.terminal import environment
from sophon_ray.modes import metric_for
from sophon_ray.run.context import RunContext
from sophon_ray.run.texts import pending_text
from sophon_ray.spec import to_dict

if TYPE_CHECKING:
    from collections.abc import Callable

    from sophon_ray.console.progress import AttackProgress
    from sophon_ray.run.outbox import Outbox
    from sophon_ray.run.packing import PackPlan
    from sophon_ray.run.plan import Trial
    from sophon_ray.run.tracking import Tracker

log = logging.getLogger(__name__)
# Trials Tune gave up on get one more Tune run. Tune's own retries (resources.max_failures) can be cut short:
# when a node dies, Ray 2.60 may report one dead actor twice, and the second report errors a trial that the
# first had already queued for retry (measured in the two-node fault test).
RETRY_PASSES = 1


def train_stage(ctx: RunContext) -> dict[str, Path]:
    """Reuse or train the normal model and every protected model; return model key (``normal``,
    ``protected/<variant>/s<seed>``) -> checkpoint dir."""
    from sophon_ray.console.progress import TrainJob, TrainProgress, board_poll, start_board, stop_board  # noqa: PLC0415
    from sophon_ray.run.checkpoint import CARD  # noqa: PLC0415
    from sophon_ray.run.train_driver import job_total, model_jobs, run_training  # noqa: PLC0415

    spec, options = ctx.spec, ctx.options
    store = ctx.out / "checkpoints"
    store.mkdir(exist_ok=True)
    planned = model_jobs(spec, store, options.audit)
    jobs = [job for d, job in planned.values() if job is not None and not (d / CARD).is_file()]
    normal_dir = planned.pop("normal")[0]
    wanted = {key: d for key, (d, _) in planned.items()}
    reused = [d for d in [normal_dir, *wanted.values()] if (d / CARD).is_file()]
    for d in reused:
        ctx.say(f"[1/4] reuse {d.name} (finished earlier)")
    if jobs:
        ctx.say(f"[1/4] Ray Train: {', '.join(j.label for j in jobs)} on {spec.resources.protect_workers} "
                f"worker(s) each, {spec.resources.protect_parallel} protection(s) at once")
        ctx.view.start_ray(options.address)
        board = start_board()
        shown = TrainProgress([TrainJob(j.label, j.stage, job_total(spec, j)) for j in jobs], board_poll(board))
        try:
            with ctx.view.console.progress(shown, prefix="[1/4]"):
                results = run_training(spec, jobs, store, ctx.storage,
                                       normal_dir if (normal_dir / CARD).is_file() else None, progress=board,
                                       resume=options.resume)
        finally:
            stop_board(board)
        m = metric_for(spec.mode)
        for r in results:
            ctx.say(f"[1/4] {r['stage']} {r['label']} | original val {r[m.key('original_val')]:.1f} | test "
                    f"{r[m.key('original_test')]:.1f} | ranks identical: {r['ranks_identical']} | {r['dir']}")
    def work(outbox: Outbox, wait: float) -> None:  # noqa: ARG001 - through_outbox's signature
        replay_journal(ctx, outbox, "[1/4]")
        outbox.start()
        log_models(ctx, outbox, normal_dir, wanted)

    through_outbox(ctx, work, prefix="[1/4]", reads=False)   # the models' runs are journaled even if the store is down
    ctx.outcome.checkpoints = {"normal": str(normal_dir), **{k: str(v) for k, v in wanted.items()}}
    return {"normal": normal_dir, **wanted}


def log_models(ctx: RunContext, outbox: Outbox, normal_dir: Path, protected: dict[str, Path]) -> None:
    """Mirror the pretrain/protect results into MLflow child runs through ``outbox`` (once: runs MLflow holds
    FINISHED are left alone; when the store cannot say which, every model is journaled: replays log nothing twice)."""
    from sophon_ray.run.checkpoint import WEIGHTS, read_card  # noqa: PLC0415
    from sophon_ray.run.train_worker import HISTORY  # noqa: PLC0415

    spec, sid = ctx.spec, ctx.sweep_id
    done = finished_or_none(ctx.tracker, sid, ("pretrain", "protect")) | outbox.completed
    entries = [("pretrain", "pretrain", normal_dir, to_dict(spec.pretrain))]
    for key, d in protected.items():
        _, label, seed_text = key.split("/")
        seed = int(seed_text[1:])
        variant = next((v for v in spec.protect if v.label == label), None)
        params = {names.VARIANT: label, names.PROTECT_SEED: seed,
                  **({k: v for k, v in to_dict(variant, hashed_only=True).items()
                      if k not in ("environments", "seeds", "probes")}
                     if variant else {"checkpoint": str(d)})}
        if variant:
            params |= {f"env_{k}": v for k, v in to_dict(variant.environments).items()}
            params["probes"] = ", ".join(f"{p.strategy}/{p.optimizer}/lr{p.lr:g}/bs{p.batch_size}/f{p.data_fraction:g}"
                                         for p in variant.probes)
        entries.append(("protect", f"protect/{label}/s{seed}", d, params))
    for role, name, d, params in entries:
        card = read_card(d)
        key = f"{role}-{card['spec_hash']}"
        if key in done:
            continue
        outbox.open(key, ctx.parent, sid, name, params, role=role)
        history_file = d / HISTORY
        if history_file.is_file():
            rows = json.loads(history_file.read_text())
            outbox.rows(key, [(int(r["step"]), {k: v for k, v in r.items() if k != "step"}) for r in rows])
        outbox.rows(key, [(0, {k: v for k, v in card["metrics"].items() if isinstance(v, (int, float))})])
        if role == "protect":
            for f in (WEIGHTS, "model.json"):
                outbox.file(key, d / f, "checkpoint")
            if card.get(names.SELECTED_REASON):   # a checkpoint from before the reason was logged has none
                outbox.tag(key, names.SELECTED_REASON, card[names.SELECTED_REASON])
        outbox.finish(key, "FINISHED")


def finished_or_none(tracker: Tracker, sweep_id: str, roles: tuple[str, ...]) -> set[str]:
    """Keys of the sweep's FINISHED runs of ``roles``; none when the store does not answer (the caller journals
    everything then, and replays are idempotent)."""
    try:
        return set().union(*(tracker.finished_keys(sweep_id, role) for role in roles))
    except Exception as err:  # noqa: BLE001 - any store error: the outbox retries the writes, none is lost
        log.warning("the MLflow store did not say which runs finished (%s: %.200s); journaling them all",
                    type(err).__name__, err)
        return set()


def attack_stage(ctx: RunContext, trials: list[Trial], models: dict[str, Path]) -> None:
    """Attack trials whose MLflow writes go through the sweep's journaled outbox (:func:`through_outbox`)."""
    through_outbox(ctx, lambda outbox, wait: _attack_trials(ctx, trials, models, wait))


def replay_journal(ctx: RunContext, outbox: Outbox, prefix: str) -> int:
    """Queue an earlier run's undelivered writes (the journal's) ahead of this stage's, and say so: the first stage
    of a resumed run delivers every stage's leftovers, attack trials' results included, so a later stage finds them
    in MLflow. Returns how many runs they belong to."""
    runs = outbox.load_journal()
    if runs:
        ctx.say(f"{prefix} journal: {runs} run(s) with writes not yet in MLflow (an earlier run's), delivered first")
    return runs


def through_outbox(ctx: RunContext, work: Callable[[Outbox, float], bool | None], prefix: str = "[3/4]",
                   reads: bool = True) -> None:
    """``work(outbox, wait)`` with ``ctx.outbox``, an outbox journaled in the output folder (one ledger per sweep),
    then the wait for its deliveries (shorter when a signal is stopping the run: the rest stays in the journal).
    ``work`` returns False when it already gave the store its ``$SOPHON_TRACKING_WAIT_S`` in vain. A stage that
    ``reads`` the store first waits as long for it to answer (an outage of a few seconds or minutes is waited out).
    When the store stops answering for good, ``outcome.pending`` / ``outcome.journal`` (and ``outcome.store_down``
    when the stage could not even start) say what waits for ``sophon-ray sync`` / ``--resume``."""
    from sophon_ray.console.signals import STOP_WAIT_S, received  # noqa: PLC0415
    from sophon_ray.run.outbox import JOURNAL, Outbox  # noqa: PLC0415
    from sophon_ray.run.delivery import backoff, http_env, wait_seconds  # noqa: PLC0415

    wait = wait_seconds()
    outbox = ctx.outbox = Outbox(ctx.tracker, ctx.out / JOURNAL)
    with environment(http_env()):
        if reads and not ctx.tracker.answers(STOP_WAIT_S if received() else wait, backoff()):
            outbox.close()
            _incomplete(ctx, prefix, len({op.key for op in outbox.journal.pending()}), str(outbox.journal.path),
                        store_down=True)
            return
        delivered, gone = None, False
        try:
            delivered = work(outbox, wait)
        except Exception as err:
            if ctx.tracker.answers(0.0, [0.0]):
                raise                        # the store answers: the error is the stage's own
            log.warning("the MLflow store stopped answering during the stage (%s: %.300s)", type(err).__name__, err)
            delivered, gone = False, True    # an outage, not a bug: what is journaled waits for sync / --resume
        finally:
            if delivered is not False:
                delivered = outbox.drain(STOP_WAIT_S if received() else wait)
            outbox.close()
    stats = outbox.stats
    log.info("MLflow outbox: %d operation(s) delivered, %d failed write(s) retried, %.1f s busy, peak queue %d%s",
             stats.delivered, stats.failures, stats.busy_s, stats.peak_queue,
             f", last error {stats.last_error}" if stats.last_error else "")
    if not delivered:
        refused = stats.last_error if not gone and ctx.tracker.answers(0.0, [0.0]) else ""
        _incomplete(ctx, prefix, len(outbox.pending_keys()), str(outbox.journal.path), store_down=gone,
                    refused=refused)


def _incomplete(ctx: RunContext, prefix: str, pending: int, journal: str, store_down: bool, refused: str = "") -> None:
    """The stage ends the run (exit 3): the store did not answer, or answered but kept failing the writes
    (``refused``, their last error); ``pending`` runs' writes wait in ``journal``."""
    outcome = ctx.outcome
    outcome.pending, outcome.journal, outcome.store_down = pending, journal, outcome.store_down or store_down
    outcome.refused = refused or outcome.refused
    ctx.say(f"{prefix} warning: {pending_text(pending, journal, refused=refused)}")


def _attack_trials(ctx: RunContext, trials: list[Trial], models: dict[str, Path], wait: float) -> None:
    """The attack stage's trials through ``ctx.outbox`` (started here): the journal's undelivered results of an
    earlier run first (a trial finished there is never rerun), then every trial not finished, as a sequence of Tune
    runs of at most ``$SOPHON_TUNE_CHUNK`` Tune trials (:func:`~sophon_ray.run.tune_driver.chunk_plan`: the driver's
    memory stays that of one chunk), then one retry pass over every chunk's unfinished trials."""
    from sophon_ray.console.signals import Interrupted, received  # noqa: PLC0415
    from sophon_ray.console.progress import AttackProgress  # noqa: PLC0415
    from sophon_ray.core.data import load_domain, make_splits  # noqa: PLC0415
    from sophon_ray.run.packing import plan_for  # noqa: PLC0415
    from sophon_ray.run.trials_worker import attack_data  # noqa: PLC0415
    from sophon_ray.run.tune_driver import (CHUNK_ENV, chunk_plan, chunk_size, put_inputs,  # noqa: PLC0415
                                            release_memory)

    spec, outbox, outcome = ctx.spec, ctx.outbox, ctx.outcome
    assert outbox is not None
    size = chunk_size()  # a bad $SOPHON_TUNE_CHUNK fails here, before Ray starts
    journaled = outbox.load_journal()
    outbox.start()
    if journaled:
        delivered = outbox.drain(wait)
        ctx.say(f"[2/4] journal: {journaled} trial(s) with results not yet in MLflow, "
                + ("delivered now" if delivered else f"{len(outbox.pending_keys())} still undelivered"))
    finished = ctx.tracker.finished_keys(ctx.sweep_id, "attack") | outbox.completed
    todo = [t for t in trials if t.key not in finished]
    ctx.say(f"[2/4] attack grid: {len(trials)} trials, {len(trials) - len(todo)} finished earlier, {len(todo)} to run")
    if not todo:
        return
    ctx.view.start_ray(ctx.options.address)
    inputs = put_inputs(  # once for every chunk's Tune run
        models=load_models(models),
        data=attack_data(make_splits(spec), [load_domain(d) for d in spec.benign],
                         warm_original=any(t.config.warm_start == "original" for t in todo)))
    table = {t.key: t for t in todo}
    for attempt in range(1 + RETRY_PASSES):
        plan = plan_for(spec, todo)  # packs of the trials still to run (attack.pack; none by default)
        if plan.packs:
            ctx.say(f"[2/4] packed: {len(todo) - len(plan.alone)} trials in {len(plan.packs)} Tune trials, "
                    f"{len(plan.alone)} alone")
        chunks = chunk_plan(plan, size)
        if len(chunks) > 1:
            ctx.say(f"[2/4] {len(plan.units)} Tune trials in {len(chunks)} Tune runs of at most {size} "
                    f"(${CHUNK_ENV})")
        counts = AttackProgress(len(plan.units))  # one display over every chunk of the pass
        errored, first_error = 0, None
        with ctx.view.console.progress(counts, prefix="[2/4]" if attempt == 0 else "[2/4] retry pass:"):
            for number, chunk in enumerate(chunks):
                if received():   # a stop Tune's loop swallowed (it can catch the interrupt and end its run normally)
                    raise Interrupted(received())
                n, error = _attack_chunk(ctx, chunk, table, inputs, counts,
                                         f"attack-{ctx.sweep_id}-{int(time.time())}-{attempt}-{number}")
                errored += n
                first_error = first_error or error
                release_memory()  # what the chunk's Tune run freed goes back to the OS before the next
        todo = [t for t in todo if t.key not in outbox.completed]  # MLflow's view once the outbox delivers
        if not todo or attempt == RETRY_PASSES:
            break
        why = f": {first_error!r:.200}" if first_error else ""
        ctx.say(f"      {len(todo)} trial(s) not finished after Tune's retries (e.g. {todo[0].name}{why}); "
                "one more pass for them")
    outcome.trials_run = len(trials) - len(finished) - len(todo)
    missing = [t.name for t in todo]
    ctx.say(f"[3/4] attack grid done | {outcome.trials_run} run now, {errored} errored in the last pass, "
            f"{len(trials) - len(missing)}/{len(trials)} finished")
    if missing:
        raise RuntimeError(f"{len(missing)} trials did not finish (e.g. {missing[:3]}); rerun with --resume")


def _attack_chunk(ctx: RunContext, chunk: PackPlan, table: dict[str, Trial], inputs: dict, counts: AttackProgress,
                  name: str) -> tuple[int, BaseException | None]:
    """One Tune run of the grid (its own MLflow callback: per-trial state lives as long as the run); returns how
    many of its Tune trials errored and the first error. Raises KeyboardInterrupt when Tune stopped the run early
    (Ctrl-C): the chunks after it must not start."""
    from sophon_ray.run.tune_driver import (chunk_trials, make_callback, make_progress_callback,  # noqa: PLC0415
                                            run_attacks, stopped_early)

    spec, units = ctx.spec, len(chunk.units)
    log.info("Tune run %s: %d Tune trial(s)", name, units)
    grid = run_attacks(spec, chunk_trials(chunk, table), inputs["models"], inputs["data"], ctx.storage, name,
                       [make_callback(ctx.tracker, ctx.parent, ctx.sweep_id, ctx.outbox, metric=metric_for(spec.mode)),
                        make_progress_callback(counts)],
                       spec.resources.max_failures, verbose=1 if ctx.options.verbose else 0, packs=chunk.packs)
    if stopped_early(grid, units):
        raise KeyboardInterrupt(f"Ray Tune stopped {name} before its {units} trial(s) ended (Ctrl-C)")
    errors = grid.errors
    return len(errors), (errors[0] if errors else None)


def load_models(models: dict[str, Path]) -> dict[str, tuple[dict, dict]]:
    """Every checkpoint the attacks start from, as (state dict, card) by model key."""
    from sophon_ray.run.checkpoint import load_checkpoint  # noqa: PLC0415

    loaded = {}
    for key, d in models.items():
        model, card = load_checkpoint(d)
        loaded[key] = (model.state_dict(), card)
    return loaded
