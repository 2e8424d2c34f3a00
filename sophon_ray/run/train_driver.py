"""Ray Train: pretraining and protection (one job per protect variant and seed).

With ``resources.protect_parallel = 1`` every job runs in one TorchTrainer run (its start, ~10-25 s, is paid
once per sweep); with P > 1 pretraining runs first, then the protection jobs in P TorchTrainer runs at
once, each launched from its own Ray task on the driver's node (so Ctrl-C cancels them; each job on its own
``protect_workers`` workers). The workers' side is :mod:`sophon_ray.run.train_worker`. Every worker regenerates or reads the domains
locally, trains on its own shard, and averages gradients and BatchNorm statistics with
``torch.distributed`` (gloo on CPU, nccl on GPU), so all ranks hold identical weights; rank 0 reports each
finished model as a Ray Train checkpoint (weights, card and metric history), which the driver copies into
the sweep's checkpoint store. While a job runs, its rank 0 sends its progress (step, latest losses and
accuracy) to a :class:`~sophon_ray.console.progress.ProgressBoard` actor that the driver's console display polls.

Fault tolerance: every ``protect[i].checkpoint_every`` iterations all ranks report the protection's whole state
(:class:`~sophon_ray.core.protection.ProtectState`) as a Ray Train checkpoint, and every reported checkpoint carries a
``resume/`` folder (the jobs finished so far, the normal model and, for a state checkpoint, the metric history).
A restarted worker group (``FailureConfig``) reads Ray Train's latest checkpoint, skips the finished jobs and
continues the protection from its state. The run's name is a hash of its jobs' keys, so after a driver crash
``--resume`` restores the same Ray Train run (Ray Train V2 reloads the checkpoints of a run with the same name and
storage path). A job whose group changed (another ``protect_parallel``, a group member finished, a seed added) is in
a run of another name: ``--resume`` also finds each job's newest state checkpoint in any earlier run of another name
(:func:`~sophon_ray.run.train_states.find_states`) and the worker continues from it when its own run has no newer state of that job. A run without
``--resume`` deletes its own run's folder and every earlier run holding a state of its jobs, and starts over.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sophon_ray import names
from sophon_ray.modes import metric_for
from sophon_ray.spec import SweepSpec, spec_hash
from sophon_ray.run.train_states import find_states, forget_run, forget_states, storage
from sophon_ray.run.train_worker import (HISTORY, KEEP, RESUME, STATE_STAGE, TrainingJob,  # noqa: F401
                                         job_total, protected_label, train_loop)

log = logging.getLogger(__name__)


def run_training(spec: SweepSpec, jobs: list[TrainingJob], store: Path, storage_path: str,
                 normal_dir: Path | None = None, progress: Any = None, resume: bool = False) -> list[dict[str, Any]]:
    """Run ``jobs`` (pretrain first, if there) on Ray Train, ``resources.protect_parallel`` protection runs at
    once; copy each reported checkpoint to ``store/<dir>``; return their metrics (with ``dir``).

    ``normal_dir`` is the finished normal model when only protect jobs remain. ``progress``: a
    :class:`~sophon_ray.console.progress.ProgressBoard` actor that rank 0 of every job sends its progress to.
    ``resume``: continue the Ray Train runs of these jobs from their checkpoints, and each job from its newest state
    checkpoint in an earlier run of another group (:func:`~sophon_ray.run.train_states.find_states`); else start them
    over (:func:`~sophon_ray.run.train_states.forget_states`).
    """
    protect_jobs = [j for j in jobs if j.stage == "protect"]
    parallel = min(spec.resources.protect_parallel, len(protect_jobs))
    first = jobs if parallel <= 1 else [j for j in jobs if j.stage != "protect"]  # the protections need its model
    groups = balance(protect_jobs, parallel, lambda job: protection_cost(spec, job)) if parallel > 1 else []
    if not resume:
        forget_states(storage_path, [j.key for j in jobs])
    states = {key: state for group in [first, *groups] if group and resume
              for key, state in _states_to_resume(spec, group, storage_path).items()}
    out = _fit(spec, first, store, storage_path, normal_dir, progress, resume, states) if first else []
    if not groups:
        return out
    if first:
        normal_dir = Path(next(r["dir"] for r in out if r["stage"] == "pretrain"))
    return out + _fit_at_once(groups, spec, store, storage_path, normal_dir, progress, resume, states)


def _fit_at_once(groups: list[list[TrainingJob]], *args: Any, fit: Callable[..., list[dict[str, Any]]] | None = None
                 ) -> list[dict[str, Any]]:
    """``fit(spec, group, *args)`` (default :func:`_fit`) of every group at once, each in a Ray task on this
    node (its checkpoint store is local); the results in group order. Ctrl-C (or any error) cancels the tasks,
    which ends their TorchTrainer runs."""
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(fit or _fit)
    spec, rest = args[0], args[1:]
    refs = [remote.remote(spec, group, *rest) for group in groups]
    results: dict[Any, list[dict[str, Any]]] = {}
    try:
        pending = list(refs)
        while pending:  # the first error stops the wait (ray.get of the whole list would wait for every run)
            done, pending = ray.wait(pending, num_returns=1)
            results[done[0]] = ray.get(done[0])
    except BaseException:
        for ref in refs:  # force: the task's worker process ends, and with it the Train controller it owns
            ray.cancel(ref, force=True)
        raise
    return [r for ref in refs for r in results[ref]]


def protection_cost(spec: SweepSpec, job: TrainingJob) -> float:
    """Relative cost of a protection job: samples through the model per run (simulation and NTR)."""
    v = spec.protect[job.variant_index]
    return v.iterations * v.batch_size * (2 * v.inner_steps + v.ntr_steps)


def balance(jobs: list[Any], groups: int, cost: Callable[[Any], float]) -> list[list[Any]]:
    """Split ``jobs`` into ``groups`` lists of similar total cost: the costliest first, each to the lightest group
    (longest-processing-time first); within a group the original order is kept."""
    loads, out = [0.0] * groups, [[] for _ in range(groups)]
    for index in sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])):
        lightest = loads.index(min(loads))
        loads[lightest] += cost(jobs[index])
        out[lightest].append(index)
    return [[jobs[i] for i in sorted(group)] for group in out if group]


def run_name(jobs: list[TrainingJob]) -> str:
    """The Ray Train run of ``jobs``: the same jobs, the same run (what ``--resume`` restores)."""
    return f"train-{spec_hash([j.key for j in jobs])}"


def _states_to_resume(spec: SweepSpec, group: list[TrainingJob], storage_path: str) -> dict[str, tuple[str, int]]:
    """:func:`find_states` for the jobs of one Ray Train run, logged per job: job key -> (the state checkpoint's
    folder, its iteration). The run's own folder is left to Ray Train's restore (the checkpoint it registered, as
    ever for a resume in the same group; a newer one it had not registered is not taken)."""
    found = find_states(storage_path, [j.key for j in group], spec.resources.protect_workers, run_name(group))
    for job in group:
        if job.key in found:
            log.info("%s %s: newest state checkpoint in another Ray Train run: %s %d in %s", job.stage, job.label,
                     "epoch" if job.stage == "pretrain" else "iteration", found[job.key].iteration, found[job.key].path)
    return {key: (state.path, state.iteration) for key, state in found.items()}


def _fit(spec: SweepSpec, jobs: list[TrainingJob], store: Path, storage_path: str,
         normal_dir: Path | None, progress: Any = None, resume: bool = False,
         states: dict[str, tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    """Run ``jobs`` in order in one TorchTrainer run; copy each finished job's checkpoint (without its resume
    folder) to ``store/<dir>``. Ray Train keeps every finished job's checkpoint and the latest state checkpoint.
    ``states``: job key -> (a state checkpoint's folder on the storage, its iteration) to continue from
    (:func:`~sophon_ray.run.train_states.find_states`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    from sophon_ray.run.checkpoint import load_checkpoint  # noqa: PLC0415

    config: dict[str, Any] = {"spec": spec, "jobs": jobs, "threads": spec.resources.cpus_per_trial,
                              "progress": progress}
    if wanted := {j.key: states[j.key] for j in jobs if j.key in (states or {})}:
        config |= {"states": wanted, "states_fs": storage(storage_path)[0]}
    if normal_dir is not None:
        model, card = load_checkpoint(normal_dir)
        score = metric_for(spec.mode).key("original_val")
        config |= {"normal_state": model.state_dict(), "normal_val_acc": card["metrics"][score]}
    r = spec.resources
    name = run_name(jobs)
    if not resume and forget_run(storage_path, name):
        log.info("Ray Train run %s: its earlier checkpoints deleted (a run without --resume starts over)", name)
    trainer = _without_sigint_handler(TorchTrainer)(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=r.protect_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_trial, **({"GPU": 1} if r.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=len(jobs), checkpoint_score_attribute=KEEP,
                                                                checkpoint_score_order="max"),
                             failure_config=FailureConfig(max_failures=1)),
    )
    result = trainer.fit()
    out = []
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics["stage"] == STATE_STAGE:
            continue
        dest = store / jobs_dir(metrics["stage"], metrics["label"], metrics["key"])
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint.to_directory(str(tmp))
        shutil.rmtree(tmp / RESUME, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        out.append({**metrics, "dir": str(dest)})
    return out


def _without_sigint_handler(trainer: type) -> type:
    """``trainer`` (a Ray Train V2 trainer class) without the SIGINT handler its ``fit`` installs in the main thread:
    that handler aborts the run and exits the process with status 0 (or 1), before the pipeline can keep what
    finished and say so; the pipeline's own handler (:mod:`sophon_ray.console.signals`) stops the run instead, on
    Ctrl-C as on SIGTERM, and the run's worker group ends with the driver's Ray session (tests/test_signals.py)."""

    class Trainer(trainer):  # type: ignore[misc, valid-type]
        def _register_sigint_handler(self, controller: Any) -> None:  # noqa: ARG002 - Ray Train's signature
            return None

    if not callable(getattr(trainer, "_register_sigint_handler", None)):
        log.warning("%s has no _register_sigint_handler (a Ray version this was not written for): Ctrl-C during "
                    "pretraining or protection may end the process without the clean stop", trainer.__name__)
    return Trainer


def jobs_dir(stage: str, label: str, key: str) -> str:
    return f"{stage}-{label}-{key}"


def model_jobs(spec: SweepSpec, store: Path, audit: Path | None = None) -> dict[str, tuple[Path, TrainingJob | None]]:
    """Every model the attacks start from: ``normal`` and each protected model (``protected/<variant>/s<seed>``, the
    key a trial's ``Subject.model`` names) -> (its checkpoint folder under ``store``, the job that trains it); an
    ``audit``-ed checkpoint is its own folder, with no job."""
    from sophon_ray.run.keys import pretrain_key, protect_key  # noqa: PLC0415
    from sophon_ray.run.plan import Subject  # noqa: PLC0415

    pkey = pretrain_key(spec)
    out: dict[str, tuple[Path, TrainingJob | None]] = {
        "normal": (store / jobs_dir("pretrain", "normal", pkey), TrainingJob("pretrain", "normal", pkey))}
    if audit is not None:
        out[Subject("protected", "audited", names.NO_PROTECT_SEED).model] = (Path(audit).resolve(), None)
        return out
    for i, variant in enumerate(spec.protect):
        for seed in variant.seeds:
            job = protect_job(spec, i, seed, protect_key(spec, i, seed))
            out[Subject("protected", variant.label, seed).model] = (store / jobs_dir("protect", job.label, job.key), job)
    return out


def protect_job(spec: SweepSpec, index: int, seed: int, key: str) -> TrainingJob:
    """One protection: variant ``index`` with protection seed ``seed``."""
    return TrainingJob("protect", protected_label(spec.protect[index].label, seed), key, index, seed)
