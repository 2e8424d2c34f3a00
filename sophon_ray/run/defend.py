"""The defender search (``protect[i].defend``): Ray Tune over Ray Train protections, judged by a development
attacker, so that a protect variant's setting is chosen by the tool on development data.

One Tune trial is one candidate: its protection runs as a Ray Train job launched inside the trial (its probe
estimates reach Tune through Ray Train's ``TuneReportCallback``, so ASHA stops hopeless candidates early) and the
same job then fine-tunes the protected candidate with every recipe of the sweep's development grid on the
protector's restricted share, scored on restricted *validation* data (:mod:`sophon_ray.run.development`). The
objective (lower is better) is the best development attack on the candidate minus the best on scratch, the same
grid; a candidate whose original-domain validation drop exceeds ``defend.guard`` is infeasible and skips its
attacks. Never the evaluation grids, never the attacker's pool, never the test split: the development attacks
get the protector's data only (``DevelopmentData``).

The pure parts (the space as Optuna distributions, a candidate from sampled values, the choice) are here with the
trial and the driver; the pipeline's stage is :func:`defend_stage`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sophon_ray import names
from sophon_ray.errors import SophonError
from sophon_ray.core.metrics import defend_protects as protects
from sophon_ray.run.development import development_best, development_data
from sophon_ray.run.placement import GroupReaper, worker_bundles
from sophon_ray.spec import DefendSpace, DefendSpec, ProtectSpec, SweepSpec, spec_hash, to_dict

if TYPE_CHECKING:
    from sophon_ray.run.context import RunContext

log = logging.getLogger(__name__)

OBJECTIVE, WORST_CASE, DROP, FEASIBLE = names.DEFEND_OBJECTIVE, names.DEV_WORST_CASE, names.DEFEND_DROP, names.FEASIBLE
ENV_FIELDS = {"env_optimizers": "optimizers", "env_head_reinit": "head_reinit", "env_head_only": "head_only"}
JOIN = "+"                            # an optimizer set as one categorical choice: "sgd+momentum"
# a candidate's trial only waits for its Ray Train job, whose workers hold the CPUs: its bundle holds no CPU (a
# bundle must hold something: 1 MiB of Ray's logical memory), so max_concurrent jobs of 1 CPU fit on as many CPUs
TRIAL_BUNDLE = {"CPU": 0, "memory": 1 << 20}
LAST = "last"                         # marks a candidate's final report (after its development attacks)
STOPPED = names.STOPPED                # a candidate ASHA stopped at a probe checkpoint (not attacked, not chosen)
LOGGED = (OBJECTIVE, WORST_CASE, DROP, FEASIBLE, LAST, names.RED_TEAM_BEST, "selected_iteration", "iteration",
          "time_total_s")


# ------------------------------------------------------------------------------------------------ the space
def dimensions(space: DefendSpace) -> dict[str, Any]:
    """The searched dimensions (name -> Optuna distribution), in the space's order; a field with one value is
    fixed, an unset one is the variant's own value. An optimizer set is one categorical choice (``sgd+adam``)."""
    from sophon_ray.run.search_space import distribution  # noqa: PLC0415

    out = {}
    for f in fields(space):
        value = getattr(space, f.name)
        if isinstance(value, tuple):
            value = tuple(JOIN.join(v) if isinstance(v, tuple) else v for v in value)
        dist = distribution(value) if value is not None else None
        if dist is not None:
            out[f.name] = dist
    return out


class DefineByRun:
    """Optuna define-by-run space of a defender search (a class: Tune pickles the searcher)."""

    def __init__(self, space: DefendSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        from optuna.distributions import CategoricalDistribution  # noqa: PLC0415

        for name, dist in dimensions(self.space).items():
            if isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            else:
                trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def candidate(base: ProtectSpec, values: Mapping[str, Any], seed: int) -> ProtectSpec:
    """``base`` with the sampled ``values`` (protection fields, ``env_*`` for its environments; the lr range's
    ends sorted), protected once with ``seed``, without its defend block."""
    direct = {k: v for k, v in values.items() if not k.startswith("env_")}
    env = base.environments
    changes: dict[str, Any] = {}
    for key, name in ENV_FIELDS.items():
        if key not in values:
            continue
        value = values[key]
        if key == "env_optimizers":   # a sampled choice is its joined text, a fixed one the list itself
            changes[name] = tuple(value.split(JOIN)) if isinstance(value, str) else tuple(value)
        else:
            changes[name] = float(value)
    low, high = float(values.get("env_lr_low", env.lr[0])), float(values.get("env_lr_high", env.lr[1]))
    changes["lr"] = (min(low, high), max(low, high))
    return replace(base, **direct, environments=replace(env, **changes), seeds=(seed,), defend=None)


def candidate_key(variant: ProtectSpec) -> str:
    """A candidate's key (its MLflow run is found again by it): its settings and seed."""
    return spec_hash(to_dict(variant, hashed_only=True))


# --------------------------------------------------------------------------------------------- the trial
def defend_trial(config: dict[str, Any], spec: SweepSpec, base: ProtectSpec, configs: list[Any],
                 normal: tuple[dict, dict], normal_val: float, scratch_best: float, chance: float,
                 storage_path: str) -> None:
    """The Tune function trainable of one candidate: its protection and development attacks as one Ray Train job
    (probe estimates reported to Tune on the way), then the candidate's objective reported. The trial itself
    reserves nothing: the Train job's workers hold the resources (so any ``max_concurrent`` queues, never
    deadlocks). ``base``: the variant as this round starts it (the red team's finds so far in its simulated
    attacker); ``configs``: the round's development grid."""
    from ray import tune  # noqa: PLC0415
    from ray.train import RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415
    from ray.tune.integration.ray_train import TuneReportCallback  # noqa: PLC0415

    from sophon_ray.modes import metric_for  # noqa: PLC0415
    from sophon_ray.run.train_driver import protect_job  # noqa: PLC0415
    from sophon_ray.run.train_worker import KEEP, STATE_STAGE, train_loop  # noqa: PLC0415
    from sophon_ray.run.trials_worker import unshare  # noqa: PLC0415

    defend = base.defend
    assert defend is not None
    chosen = candidate(base, {**defend.space.fixed(), **config}, defend.seed)
    key = candidate_key(chosen)
    # no state checkpoints: every report of the Train job reaches Tune, and a candidate reruns whole
    cand_spec = replace(spec, protect=(replace(chosen, checkpoint_every=0),),
                        resources=replace(spec.resources, protect_parallel=1))
    r = spec.resources
    state, _ = normal
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": cand_spec, "jobs": [protect_job(cand_spec, 0, defend.seed, key)],
                           "threads": r.cpus_per_trial, "progress": None, "normal_state": unshare(state),
                           "normal_val_acc": normal_val,
                           "defend": {"scratch_best": scratch_best, "guard": defend.guard, "chance": chance,
                                      "configs": configs, "red_team": defend.red_team}},
        scaling_config=ScalingConfig(num_workers=r.protect_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=worker_bundles(1, r.cpus_per_trial, r.use_gpu)[0]),
        run_config=RunConfig(name=f"defend-{key}", storage_path=storage_path, callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    metrics = next(m for _, m in reversed(result.best_checkpoints or []) if m.get("stage") != STATE_STAGE and m.get(KEEP))
    probe = metric_for(spec.mode).key("probe")
    red = {k: metrics[k] for k in (names.RED_TEAM_BEST, names.RED_TEAM_FOUND) if k in metrics}
    tune.report({OBJECTIVE: metrics[OBJECTIVE], WORST_CASE: metrics.get(WORST_CASE, math.nan), DROP: metrics[DROP],
                 FEASIBLE: metrics[FEASIBLE], "iteration": final_step(base), "candidate_key": key,
                 probe: metrics[probe], "selected_iteration": metrics["selected_iteration"], LAST: 1.0, **red})


# -------------------------------------------------------------------------------------------- the driver
def searcher(defend: DefendSpec, history: Sequence[tuple[dict, float]], name: str, round_: int = 1,
             start: Mapping[str, Any] | None = None) -> Any:
    """OptunaSearch over the defend space (TPE or random, seeded by the search's seed and the round), warm-started
    with ``history`` (this round's candidates), minimising the objective, at most ``max_concurrent`` candidates at
    once. ``start`` (the previous round's choice): the round's first candidate, so that a round reconsiders the
    winner so far under its larger threat model before it explores."""
    import optuna  # noqa: PLC0415
    from ray.tune.search import ConcurrencyLimiter  # noqa: PLC0415
    from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

    from sophon_ray.run.search_space import sampler as seeded_sampler  # noqa: PLC0415

    sampler = seeded_sampler(replace(defend, seed=defend.seed + round_ - 1))
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler)
    dims = dimensions(defend.space)
    for params, value in history:
        try:
            study.add_trial(optuna.trial.create_trial(params={k: params[k] for k in dims if k in params},
                                                      distributions=dims, value=value))
        except ValueError as err:
            log.warning("defend %s: an earlier candidate does not fit the current space (%s); not used", name, err)
    if start and not history:
        study.enqueue_trial({k: start[k] for k in dims if k in start})
    search = OptunaSearch(space=DefineByRun(defend.space), metric=OBJECTIVE, mode="min", sampler=sampler,
                          study_name=name, storage=storage)
    return ConcurrencyLimiter(search, max_concurrent=defend.max_concurrent)


def scheduler(defend: DefendSpec, variant: ProtectSpec) -> Any:
    """ASHA over protection iterations (rungs at probe checkpoints), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: PLC0415

    if defend.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="iteration", max_t=final_step(variant),
                         grace_period=defend.grace_period * variant.probe_every,
                         reduction_factor=defend.reduction_factor)


def final_step(variant: ProtectSpec) -> int:
    """The ``iteration`` of a candidate's final report: one past its longest protection (the development attacks
    come after the last probe, and ASHA stops a trial at this step, never before its attacks)."""
    defend = variant.defend
    return max((defend.space.iterations if defend and defend.space.iterations else ()) or (variant.iterations,)) + 1


class DefendLogger:
    """Tune callback: every candidate is one MLflow child run of the variant's defend run (found again by its key,
    so exactly once), its probe reports as steps and its final objective; finished when Tune says so. Its writes
    go through the sweep's journaled ``outbox`` (:mod:`sophon_ray.run.outbox`): they never block Tune and a store
    that is down loses none."""

    def __init__(self, outbox: Any, parent: str, sweep_id: str, variant: ProtectSpec,
                 say: Callable[[str], None] = log.info, done_before: int = 0, round_: int = 1) -> None:
        from ray.tune import Callback  # noqa: PLC0415

        self.outbox, self.parent, self.sweep_id, self.variant = outbox, parent, sweep_id, variant
        self.say, self.finished, self.round = say, done_before, round_
        self.runs: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.callback = type("DefendCallback", (Callback,), {
            "on_trial_result": lambda _, iteration, trials, trial, result, **kw: self.result(trial, result),
            "on_trial_complete": lambda _, iteration, trials, trial, **kw: self.done(trial, "FINISHED"),
            "on_trial_error": lambda _, iteration, trials, trial, **kw: self.done(trial, "FAILED")})()

    # Tune pickles its callbacks (and so this) into its experiment state; sophon-ray never restores Tune
    # experiments (MLflow is the ledger), so the console's writer is left out of what is pickled.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "say": log.info}

    def _run(self, trial: Any) -> str:
        if trial.trial_id not in self.runs:
            defend = self.variant.defend
            chosen = candidate(self.variant, {**defend.space.fixed(), **trial.config}, defend.seed)
            key = candidate_key(chosen)
            params = {"candidate": key, names.ROUND: self.round,
                      **{k: (JOIN.join(v) if isinstance(v, tuple) else v)
                         for k, v in {**defend.space.fixed(), **trial.config}.items()}}
            self.outbox.open(key, self.parent, self.sweep_id, f"defend/{self.variant.label}/{key[:8]}", params,
                             role=names.CANDIDATE_ROLE)
            self.runs[trial.trial_id] = key
        return self.runs[trial.trial_id]

    def result(self, trial: Any, result: Mapping[str, Any]) -> None:
        if "iteration" not in result:  # the protection's end (its probes and the trial's end have the step)
            return
        row = {k: v for k, v in result.items() if k in LOGGED or "probe" in k}
        self.last[trial.trial_id] = dict(result)
        self.outbox.rows(self._run(trial), [(int(result["iteration"]), {
            k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})])
        if names.RED_TEAM_FOUND in result:
            self.outbox.tag(self._run(trial), names.RED_TEAM_FOUND, result[names.RED_TEAM_FOUND])

    def done(self, trial: Any, status: str) -> None:
        run = self._run(trial)
        last = self.last.get(trial.trial_id, {})
        stopped = status == "FINISHED" and LAST not in last   # ASHA stopped it at a probe checkpoint
        if stopped:
            self.outbox.rows(run, [(0, {STOPPED: 1.0})])
        self.outbox.finish(run, status)
        self.finished += 1
        what = ("failed (see the logs)" if status != "FINISHED" else
                f"stopped by ASHA at iteration {last.get('iteration', '?')} (estimate {last.get(OBJECTIVE, math.nan):+.1f})"
                if stopped else "infeasible (original-domain drop over the guard)" if not last.get(FEASIBLE)
                else f"development worst case {last.get(WORST_CASE, math.nan):.1f}, objective "
                     f"{last.get(OBJECTIVE, math.nan):+.1f}, drop {last.get(DROP, math.nan):+.1f}")
        rounds = self.variant.defend.rounds
        where = f"round {self.round}/{rounds}, " if rounds > 1 else ""
        self.say(f"[defend] {self.variant.label}: {where}candidate {self.finished}/{self.variant.defend.num_samples} "
                 f"{what}")


def history(tracker: Any, parent: str, space: DefendSpace, round_: int = 1) -> list[tuple[dict, float, str, dict]]:
    """The finished candidates of one round of a defend run, those ASHA stopped early included (their objective:
    the last probe estimate): (searched params, objective, key, metrics and the red team's finds)."""
    searchable = [f.name for f in fields(space)]
    out = []
    for run in tracker.child_runs(parent):
        metrics, params = dict(run.data.metrics), run.data.params
        if int(params.get(names.ROUND, 1)) != round_:
            continue
        metrics[names.RED_TEAM_FOUND] = run.data.tags.get(names.RED_TEAM_FOUND, "")
        if run.info.status != "FINISHED" or OBJECTIVE not in metrics:
            if run.info.status == "RUNNING":
                tracker.finish(run.info.run_id, "KILLED")
            continue
        values = {k: decode(params[k]) for k in searchable if k in params}
        out.append((values, metrics[OBJECTIVE], params.get("candidate", ""), metrics))
    return out


def decode(text: str) -> Any:
    """An MLflow param back to its value: an int, else a float, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def choose(done: Sequence[tuple[dict, float, str, dict]]) -> tuple[dict, float, str, dict] | None:
    """The best feasible candidate that ran its development attacks (lowest objective; ties: the smaller
    original-domain drop, then the earlier); None when there is none."""
    feasible = [d for d in done if d[3].get(FEASIBLE, 0.0) == 1.0 and LAST in d[3]]
    return min(feasible, key=lambda d: (d[1], d[3].get(DROP, 0.0))) if feasible else None


class Undelivered(Exception):
    """The store took none of the journaled writes for ``$SOPHON_TRACKING_WAIT_S``: the candidates' history (and so
    the next choice) cannot be read; the stage stops, the writes wait in the journal."""


def run_defend(ctx: RunContext, index: int, normal_dir: Path, outbox: Any, wait: float) -> ProtectSpec:
    """The defender search of protect variant ``index``: per round, its baselines, the Tune experiment (continued
    from the candidates MLflow holds) and its choice, whose red team's best recipes join the next round; returns
    the last round's choice (a plain variant) and writes it out as a spec fragment (``defend/<variant>.yaml``) and
    on the defend run. Its writes go through ``outbox`` (the defend run attached by its key), delivered before each
    read of the candidates (else :class:`Undelivered`)."""
    from sophon_ray.core.data import make_splits  # noqa: PLC0415
    from sophon_ray.core.metrics import chance as chance_of  # noqa: PLC0415
    from sophon_ray.modes import MODES, task_for  # noqa: PLC0415
    from sophon_ray.run.checkpoint import load_checkpoint  # noqa: PLC0415
    from sophon_ray.run.development import found_recipes  # noqa: PLC0415
    from sophon_ray.run.plan import development_configs  # noqa: PLC0415

    spec, tracker = ctx.spec, ctx.tracker
    variant = spec.protect[index]
    defend = variant.defend
    assert defend is not None
    key = spec_hash((ctx.sweep_id, "defend", variant.label))
    run = tracker.child_run(ctx.parent, ctx.sweep_id, names.DEFEND_ROLE, key, f"defend/{variant.label}",
                            {"variant": variant.label, "objective": defend.objective, "guard": defend.guard,
                             "num_samples": defend.num_samples, "algorithm": defend.algorithm,
                             "scheduler": defend.scheduler, **({"rounds": defend.rounds} if defend.rounds > 1 else {})})
    outbox.attach(key, run)

    def delivered_history(round_: int) -> list[tuple[dict, float, str, dict]]:
        if not outbox.drain(wait):
            raise Undelivered(key)
        return history(tracker, run, defend.space, round_)
    model, card = load_checkpoint(normal_dir)
    task = task_for(spec)
    chance = chance_of(card["num_classes"]) if MODES.get(spec.mode).has_classes else 0.0
    normal_val = card["metrics"][task.metric.key("original_val")]
    data = Lazy(lambda: development_data(make_splits(spec)))
    known: tuple[Any, ...] = ()          # the red team's finds so far (each round's choice's best recipes)
    best: tuple[dict, float, str, dict] | None = None   # the previous round's choice
    for round_ in range(1, defend.rounds + 1):
        base = with_known(variant, known)
        configs = list(dict.fromkeys([*development_configs(spec), *known]))
        scratch_best, normal_best = baselines(ctx, outbox, (key, run), round_, model, configs, data, task, chance)
        done = delivered_history(round_)
        label = f"{variant.label} round {round_}/{defend.rounds}" if defend.rounds > 1 else variant.label
        ctx.say(f"[defend] {label}: development best scratch {scratch_best:.1f}, normal {normal_best:.1f}; "
                f"{len(done)} of {defend.num_samples} candidates finished earlier")
        if defend.num_samples > len(done):
            search_round(ctx, outbox, run, base, round_, configs, (model, card), normal_val, scratch_best, chance,
                         done, best[0] if best is not None else None)
            done = delivered_history(round_)
        if (unfinished := incomplete(len(done), defend.num_samples, f"protect.{index}.defend", label)) is not None:
            tracker.finish(run, "FAILED")
            raise unfinished
        best = choose(done)
        if best is None:
            tracker.finish(run, "FAILED")
            raise DefendError(f"protect.{index}.defend: no candidate of {label} kept its original-domain drop "
                              f"within guard {defend.guard:g} points ({len(done)} finished); widen the space toward "
                              "gentler settings (lower alpha or more NTR steps) or raise the guard")
        found = best[3].get(names.RED_TEAM_FOUND, "")
        outbox.rows(key, [(round_ - 1, {"round_chosen_objective": best[1], "round_candidates": float(len(done)),
                                        **({"round_red_team_best": best[3][names.RED_TEAM_BEST]}
                                           if names.RED_TEAM_BEST in best[3] else {})})])
        outbox.tag(key, f"round{round_}_chosen", best[2])
        ctx.say(f"[defend] {label}: chose candidate {best[2][:8]} (development worst case minus scratch "
                f"{best[1]:+.1f}) of {len(done)}" + (f"; its red team found {found}" if found else ""))
        if round_ < defend.rounds:
            if not found:
                raise DefendError(f"protect.{index}.defend.rounds: round {round_}'s chosen candidate has no red "
                                  "team finds to carry on; set defend.red_team (num_samples >= 1)")
            known = tuple(dict.fromkeys([*known, *found_recipes(found)]))
    chosen = replace(candidate(base, {**defend.space.fixed(), **best[0]}, defend.seed), seeds=variant.seeds)
    fragment = ctx.out / "defend" / f"{variant.label}.yaml"
    fragment.parent.mkdir(parents=True, exist_ok=True)
    fragment.write_text(yaml.safe_dump({"protect": [to_dict(chosen)]}, sort_keys=False))
    outbox.rows(key, [(0, {"chosen_objective": best[1], "candidates": float(len(done)),
                           "feasible_candidates": float(sum(d[3].get(FEASIBLE, 0) == 1.0 for d in done))})])
    outbox.tag(key, names.CHOSEN_TAG, best[2])
    outbox.file(key, fragment)
    outbox.finish(key, "FINISHED")
    ctx.say(f"[defend] {variant.label}: setting in {fragment}")
    if not protects(best[1], normal_best - scratch_best):
        ctx.say(f"[defend] warning: {variant.label}'s chosen candidate is no better than the unprotected model on the "
                f"development grid ({best[1]:+.1f} vs the normal model's {normal_best - scratch_best:+.1f}): the search "
                f"found no protection; protect.{index}.defend: widen the space toward gentler settings or raise "
                "num_samples")
    return chosen


def incomplete(finished: int, num_samples: int, where: str, label: str) -> DefendError | None:
    """The error for a round whose Tune experiment ended with fewer candidates than ``num_samples`` (Ctrl-C stops
    Tune gracefully, as does a candidate that failed), so that no setting is chosen from part of a round; None
    when the round is whole."""
    if finished >= num_samples:
        return None
    return DefendError(f"{where}: {finished} of {num_samples} candidates of {label} finished (the search was "
                       "interrupted, or candidates failed: see the log); rerun with --resume to run the rest (the "
                       "finished ones are kept)")


class Lazy:
    """A value computed on first use (the development data: a rerun whose baselines are logged never builds it)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.value = make, None

    def __call__(self) -> Any:
        if self.value is None:
            self.value = self.make()
        return self.value


def with_known(variant: ProtectSpec, known: Sequence[Any]) -> ProtectSpec:
    """``variant`` whose simulated attacker also draws the red team's finds ``known`` (with the red team's share)."""
    if not known:
        return variant
    share = variant.defend.red_team.share
    return replace(variant, environments=replace(variant.environments, known=tuple(known), known_share=share))


def baselines(ctx: RunContext, outbox: Any, run: tuple[str, str], round_: int, model: Any, configs: Sequence[Any],
              data: Lazy, task: Any, chance: float) -> tuple[float, float]:
    """(scratch's, the normal model's) best development attack over a round's grid, computed once: logged on the
    defend run (``run``: its key and id; step: the round - 1) through ``outbox`` and read back by a rerun or
    ``--resume``."""
    tracker, (key, run) = ctx.tracker, run
    logged = {k: {m.step: m.value for m in tracker.client.get_metric_history(run, k)}
              for k in ("dev_best_scratch", "dev_best_normal")}
    step = round_ - 1
    if all(step in v for v in logged.values()):
        return logged["dev_best_scratch"][step], logged["dev_best_normal"][step]
    t0 = time.perf_counter()
    scratch_best = development_best(model, configs, data(), task, chance, scratch=True)
    normal_best = development_best(model, configs, data(), task, chance)
    outbox.rows(key, [(step, {"dev_best_scratch": scratch_best, "dev_best_normal": normal_best})])
    ctx.say(f"[defend] development baselines of round {round_} in {time.perf_counter() - t0:.0f} s")
    return scratch_best, normal_best


def search_round(ctx: RunContext, outbox: Any, run: str, base: ProtectSpec, round_: int, configs: list[Any],
                 normal: tuple[Any, dict], normal_val: float, scratch_best: float, chance: float,
                 done: Sequence[tuple[dict, float, str, dict]], start: Mapping[str, Any] | None = None) -> None:
    """One round's Tune experiment: the candidates this round still needs (``done``: its finished ones, as
    :func:`history` read them; they warm-start the study), each a :func:`defend_trial`, the first of a later round
    the previous round's choice (``start``)."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.run.trials_worker import share  # noqa: PLC0415

    defend = base.defend
    model, card = normal
    logger = DefendLogger(outbox, run, ctx.sweep_id, base, ctx.say, len(done), round_)
    trainable = tune.with_resources(
        tune.with_parameters(defend_trial, spec=ctx.spec, base=base, configs=configs,
                             normal=(share(model.state_dict()), card), normal_val=normal_val,
                             scratch_best=scratch_best, chance=chance, storage_path=ctx.storage),
        tune.PlacementGroupFactory([TRIAL_BUNDLE]))
    suffix = f"-r{round_}" if round_ > 1 else ""
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        metric=OBJECTIVE, mode="min", num_samples=defend.num_samples - len(done),
        search_alg=searcher(defend, [(p, v) for p, v, _, _ in done], f"defend-{base.label}{suffix}", round_, start),
        scheduler=scheduler(defend, base)),
        run_config=tune.RunConfig(name=f"defend-{base.label}{suffix}-{len(done)}", storage_path=ctx.storage,
                                  callbacks=[logger.callback], verbose=0))
    r = ctx.spec.resources
    with GroupReaper(worker_bundles(r.protect_workers, r.cpus_per_trial, r.use_gpu), say=ctx.say):
        tuner.fit()


class DefendError(SophonError):
    """No feasible candidate: the message names the field and the fix (``sophon-ray`` prints it, exit 2)."""


def defend_stage(ctx: RunContext) -> RunContext:
    """Run every variant's defender search (pretraining first, when needed) and return the context whose spec
    has each defended variant replaced by its chosen setting (every other variant as it was)."""
    from sophon_ray.run.stages import train_stage  # noqa: PLC0415

    spec = ctx.spec
    if not any(v.defend for v in spec.protect):
        return ctx
    from sophon_ray.run.stages import through_outbox  # noqa: PLC0415

    normal_dir = train_stage(replace(ctx, spec=replace(spec, protect=())))["normal"]
    if ctx.outcome.incomplete:   # the normal model's run waits in the journal: the store is down
        return ctx
    chosen: list[ProtectSpec] = []

    def work(outbox: Any, wait: float) -> bool:
        outbox.load_journal()
        outbox.start()
        ctx.view.start_ray(ctx.options.address)
        try:
            chosen.extend(run_defend(ctx, i, normal_dir, outbox, wait) if v.defend else v
                          for i, v in enumerate(spec.protect))
        except Undelivered:
            return False
        return True

    through_outbox(ctx, work, prefix="[defend]")
    if ctx.outcome.incomplete:
        return ctx
    return replace(ctx, spec=replace(spec, protect=tuple(chosen)))


__all__ = ["DROP", "DefendError", "DefendLogger", "DefineByRun", "FEASIBLE", "LAST", "Lazy", "OBJECTIVE", "STOPPED",
           "WORST_CASE", "baselines", "candidate", "candidate_key", "choose", "decode", "defend_stage", "defend_trial",
           "dimensions", "final_step", "history", "run_defend", "scheduler", "search_round", "searcher", "with_known"]
