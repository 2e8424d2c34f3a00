"""Ray Train's worker side: what every worker of a pretraining/protection run does (:func:`train_loop`), the
jobs it runs (:class:`TrainingJob`) and the resume folder a reported checkpoint carries.
See :mod:`sophon_ray.run.train_driver` for the driver side."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sophon_ray import names
from sophon_ray.console.progress import ProgressSender
from sophon_ray.core.metrics import defend_objective
from sophon_ray.run.development import development_best, development_data, found_text, probe_report, red_team_search
from sophon_ray.spec import SweepSpec

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from sophon_ray.core.data import Splits
    from sophon_ray.core.protection import ProtectState, Sync

log = logging.getLogger(__name__)
HISTORY = "history.json"
RESUME, MANIFEST, NORMAL = "resume", "manifest.json", "normal"  # a reported checkpoint's folder to continue from
KEEP = "keep"  # reported metric: 1 for a finished job (always kept), 0 for a protection state (only the latest)
STATE_STAGE = "protect-state"


@dataclass(frozen=True)
class TrainingJob:
    """One model to train: the normal model (``stage`` pretrain) or one protection (variant ``variant_index`` of
    the spec with protection ``seed``); ``key`` names its checkpoint."""

    stage: str
    label: str
    key: str
    variant_index: int = -1
    seed: int = -1


@dataclass
class ResumePoint:
    """What a (re)started worker group finds in Ray Train's latest checkpoint."""

    done: list[str]                                  # keys of the jobs whose results are reported
    normal_val_acc: float | None = None
    normal_state: dict[str, torch.Tensor] | None = None  # when this run pretrained the normal model
    job: str | None = None                           # the protection a state checkpoint belongs to
    history: list[dict[str, Any]] = field(default_factory=list)  # its metric rows up to the state's iteration
    state: ProtectState | None = None                # its ProtectState (this rank's)


def write_resume(directory: Path, done: list[str], normal: torch.nn.Module | None, normal_val_acc: float | None,
                 job: str | None = None, history: list[dict[str, Any]] | None = None,
                 iteration: int | None = None) -> None:
    """Rank 0's part of ``directory/resume``: the manifest, and the normal model when this run trained it. A state
    checkpoint's manifest names its ``job`` and the state's ``iteration`` (what ``find_states`` reads)."""
    from sophon_ray.core.state import save_tree  # noqa: PLC0415

    folder = directory / RESUME
    folder.mkdir(parents=True, exist_ok=True)
    if normal is not None:
        save_tree(normal.state_dict(), folder, NORMAL)
    (folder / MANIFEST).write_text(json.dumps({"done": done, "normal_val_acc": normal_val_acc, "job": job,
                                               "iteration": iteration, "history": history or []}))


def read_resume(directory: Path, rank: int) -> ResumePoint:
    """The :class:`ResumePoint` in a checkpoint ``directory`` (the protection state of ``rank``)."""
    from sophon_ray.core.state import CheckpointError, load_tree  # noqa: PLC0415
    from sophon_ray.core.protection import load_state  # noqa: PLC0415

    folder = directory / RESUME
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"{directory}: Ray Train's latest checkpoint has no {RESUME}/{MANIFEST}, so this run "
                              "cannot continue from it; delete the Ray Train run folder it is in to start over")
    manifest = json.loads((folder / MANIFEST).read_text())
    normal = load_tree(folder, NORMAL) if (folder / f"{NORMAL}.json").is_file() else None
    state = load_state(folder, rank) if manifest["job"] else None
    return ResumePoint(manifest["done"], manifest["normal_val_acc"], normal, manifest["job"], manifest["history"],
                       state)


def read_found_state(path: str, filesystem: Any, key: str, rank: int) -> ResumePoint | None:
    """This rank's part of the state checkpoint of job ``key`` that the driver found in an earlier Ray Train run
    (``train_states.find_states``: ``path`` on the storage's ``filesystem``); None, with a warning, when it cannot be
    read any more (e.g. deleted since) or is not that job's."""
    from ray.train import Checkpoint  # noqa: PLC0415

    from sophon_ray.core.state import CheckpointError  # noqa: PLC0415

    try:
        with Checkpoint(path, filesystem=filesystem).as_directory() as d:
            point = read_resume(Path(d), rank)
    except (CheckpointError, OSError) as err:
        log.warning("rank %d | the state checkpoint %s of %s cannot be read (%s): the job starts over", rank, path,
                    key, err)
        return None
    if point.job != key or point.state is None:
        log.warning("rank %d | the state checkpoint %s is not one of %s: the job starts over", rank, path, key)
        return None
    return point


def agreed(ok: bool, world: int) -> bool:
    """Whether every rank says ``ok`` (collective when ``world`` > 1): ranks continue from a found state together or
    start over together, never some of each."""
    import torch.distributed as dist  # noqa: PLC0415

    if world == 1:
        return ok
    said: list[Any] = [None] * world
    dist.all_gather_object(said, ok)
    return all(said)


class AllReduce:
    """:class:`sophon_ray.core.protection.Sync` over ``torch.distributed``: flat buffers, one all-reduce each."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def _mean(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    grads = _mean
    buffers = _mean


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (to prove ranks agree)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    from sophon_ray.core.data import take  # noqa: PLC0415

    return dataset if world == 1 else take(dataset, torch.arange(rank, len(dataset), world))


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker function: run the jobs (pretrain, then each protect variant) in order."""
    import ray.train  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from ray.train import Checkpoint  # noqa: PLC0415

    from sophon_ray.run.checkpoint import initial_model, save_checkpoint  # noqa: PLC0415
    from sophon_ray.core.data import make_splits  # noqa: PLC0415
    from sophon_ray.core.protection import ProtectState, save_state  # noqa: PLC0415
    from sophon_ray.modes import task_for  # noqa: PLC0415

    spec: SweepSpec = config["spec"]
    task = task_for(spec)
    m = task.metric
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device() if spec.resources.use_gpu else torch.device("cpu")
    sync = AllReduce(world)
    splits = make_splits(spec)
    normal, needs_training = initial_model(spec)
    normal = normal.to(device)
    normal_acc = None
    trained_here = config.get("normal_state") is None  # then the resume folder carries the normal model
    if not trained_here:
        normal.load_state_dict(config["normal_state"])
        normal_acc = config["normal_val_acc"]
    point = ResumePoint([])
    latest = ray.train.get_checkpoint()
    if latest is not None:  # a restarted worker group, or a restored run (--resume)
        with latest.as_directory() as d:
            point = read_resume(Path(d), rank)
        if point.normal_state is not None:
            normal.load_state_dict(point.normal_state)
        normal_acc = point.normal_val_acc if point.normal_val_acc is not None else normal_acc
        log.info("rank %d | continuing from Ray Train's latest checkpoint: %d job(s) finished%s", rank,
                 len(point.done), f", protection {point.job} at iteration {point.state.iteration}" if point.job else "")
    done = list(point.done)
    defend = config.get("defend")  # a defender candidate: probe estimates to Tune, then its development attacks

    def resume_folder(out: Path, job: str | None = None, history: list[dict] | None = None,
                      iteration: int | None = None) -> None:
        if rank == 0:
            write_resume(out, done, normal if trained_here and normal_acc is not None else None, normal_acc, job,
                         history, iteration)

    def finish(job: TrainingJob, model: torch.nn.Module, card: dict[str, Any], history: list[dict],
               metrics: dict[str, Any]) -> None:
        digests: list[Any] = [state_digest(model)]
        if world > 1:
            digests = [None] * world
            dist.all_gather_object(digests, state_digest(model))
        metrics = {**metrics, "stage": job.stage, "key": job.key, "label": job.label,
                   "rank_digests": digests, "ranks_identical": len(set(digests)) == 1, KEEP: 1.0}
        if defend is not None and job.stage == "protect":  # a defender candidate: attacked right here
            metrics |= candidate_metrics(model, metrics)
        done.append(job.key)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ckpt"
            save_checkpoint(model, card, out)
            (out / HISTORY).write_text(json.dumps(history))
            resume_folder(out)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(out)))

    def report_state(job: TrainingJob, history: list[dict], state: ProtectState) -> None:
        """Every rank: its part of the protection state (rank 0: the shared part, the manifest, the history)."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            save_state(state, out / RESUME, rank)
            resume_folder(out, job.key, history, state.iteration)
            ray.train.report({"stage": STATE_STAGE, "key": job.key, "label": job.label,
                              "iteration": state.iteration, KEEP: 0.0}, checkpoint=Checkpoint.from_directory(tmp))
        log.info("%s %s | state checkpoint of %s %d reported in %.2f s", job.stage, job.label,
                 "epoch" if job.stage == "pretrain" else "iteration", state.iteration, time.perf_counter() - t0)

    latest: dict[str, float] = {}

    def report_probe(step: int, row: dict[str, float]) -> None:
        """Every rank (a report is collective): the probe's estimate of the defender's objective."""
        latest.update({k: v for k, v in row.items() if k == m.original})
        estimate = probe_report({**latest, **row}, normal_acc, defend["scratch_best"], defend["guard"],
                                m.key("probe"), m.original)
        if estimate is not None:
            ray.train.report({**estimate, "iteration": step, "stage": "probe"}, checkpoint=None)

    def candidate_metrics(model: torch.nn.Module, metrics: dict[str, Any]) -> dict[str, float]:
        """A defender candidate's objective: rank 0 attacks it with the development grid when its drop is within
        the guard (the other ranks report the probe estimate; Tune reads rank 0's)."""
        drop = normal_acc - metrics[m.key("original_val")]
        estimate = probe_report({m.key("probe"): metrics[m.key("probe")], m.original: metrics[m.key("original_val")]},
                                normal_acc, defend["scratch_best"], defend["guard"], m.key("probe"), m.original) or {}
        if rank != 0 or not estimate.get(names.FEASIBLE):
            return {**estimate, names.DEFEND_DROP: drop}
        data = development_data(splits)
        worst = development_best(model, defend["configs"], data, task, defend["chance"], device)
        red: dict[str, Any] = {}
        if defend.get("red_team") is not None:  # the development attacker search: its best counts too
            found = red_team_search(model, defend["red_team"], data, task, defend["chance"], device)
            red = {names.RED_TEAM_BEST: max(score for _, score in found),
                   names.RED_TEAM_FOUND: found_text(found, defend["red_team"].join)}
            worst = max(worst, red[names.RED_TEAM_BEST])
        value, feasible = defend_objective(worst, defend["scratch_best"], drop, defend["guard"])
        return {names.DEFEND_OBJECTIVE: value, names.FEASIBLE: float(feasible), names.DEV_WORST_CASE: worst,
                names.DEFEND_DROP: drop, **red}

    found_states: dict[str, tuple[str, int]] = config.get("states") or {}  # key -> (folder, iteration)

    def start_point(job: TrainingJob) -> ResumePoint | None:
        """Where ``job`` continues from: the newer of this run's latest checkpoint (when it is of ``job``; a tie
        keeps it) and the state the driver found in any earlier run (``--resume``: the job was in another group's
        run); None: from the start. Every rank takes the same branch (the manifest and ``found_states`` are
        shared), so the collective :func:`agreed` is reached by all."""
        own = point if point.job == job.key else None
        if job.key not in found_states:
            return own
        path, iteration = found_states[job.key]
        if own is not None and own.state.iteration >= iteration:
            return own
        other = read_found_state(path, config["states_fs"], job.key, rank)
        if not agreed(other is not None, world):
            return own
        log.info("rank %d | %s %s: continuing from the state checkpoint of %s %d found in an earlier Ray Train run "
                 "(%s)", rank, job.stage, job.label, "epoch" if job.stage == "pretrain" else "iteration",
                 other.state.iteration, path)
        return other

    for job in config["jobs"]:
        if job.key in done:
            continue
        start = start_point(job)
        resumed = start is not None
        history: list[dict[str, Any]] = list(start.history) if resumed else []
        progress = ProgressSender(config.get("progress") if rank == 0 else None, job.label, job.stage,
                                  job_total(spec, job))

        def record(step: int, row: dict[str, float], history: list = history, progress: Any = progress) -> None:
            history.append({"step": step, **row})
            progress(step, row)
            if defend is not None and job.stage == "protect":
                report_probe(step, row)

        if job.stage == "pretrain":
            metrics, card = pretrain_normal(
                spec, normal, splits, job.key, needs_training, device, record, sync, rank, world,
                on_checkpoint=lambda state, job=job, history=history: report_state(job, history, state),
                resume=start.state if resumed else None)
            normal_acc = metrics[m.key("original_val")]
            progress.finish(**{m.val: normal_acc})
            finish(job, normal, card, history, metrics)
            continue
        model, metrics, card = protect_variant(
            spec, normal, splits, job, normal_acc, device, record, sync, rank, world,
            on_checkpoint=lambda state, job=job, history=history: report_state(job, history, state),
            resume=start.state if resumed else None)
        progress.finish(**{m.original: metrics[m.key("original_val")], m.key("probe"): metrics[m.key("probe")]})
        finish(job, model, card, history, metrics)


def pretrain_normal(spec: SweepSpec, normal: torch.nn.Module, splits: Splits, key: str, needs_training: bool = True,
                    device: Any = "cpu", on_epoch: Callable | None = None, sync: Sync | None = None, rank: int = 0,
                    world: int = 1, on_checkpoint: Callable | None = None, resume: ProtectState | None = None,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretrain ``normal`` in place on this rank's shard of the original domain (when it ``needs_training``), from
    ``resume`` (a state ``on_checkpoint`` got after an epoch) when given, and score it on the original validation and
    test splits; returns (metrics, card) of the normal model."""
    from sophon_ray.run.checkpoint import make_card  # noqa: PLC0415
    from sophon_ray.modes import task_for  # noqa: PLC0415
    from sophon_ray.core.training import evaluate, pretrain  # noqa: PLC0415

    task = task_for(spec)
    seconds, resumed_from = 0.0, 0
    if needs_training:
        result = pretrain(normal, _shard(splits.original_train, rank, world), splits.original_val, spec.pretrain,
                          spec.seed, device, on_epoch=on_epoch, sync=sync, rank=rank, task=task,
                          on_checkpoint=on_checkpoint, resume=resume)
        seconds, resumed_from = result.seconds, result.resumed_from
    metrics = {task.metric.key("original_val"): evaluate(normal, splits.original_val, device, task=task).score,
               task.metric.key("original_test"): evaluate(normal, splits.original_test, device, task=task).score,
               "seconds": seconds, "resumed_from_epoch": resumed_from}
    return metrics, make_card(spec.model, spec.original, spec.restricted, key, "normal", metrics)


def protect_variant(spec: SweepSpec, normal: torch.nn.Module, splits: Splits, job: TrainingJob,
                    normal_acc: float, device: Any = "cpu", on_metrics: Callable | None = None,
                    sync: Sync | None = None, rank: int = 0, world: int = 1, on_checkpoint: Callable | None = None,
                    resume: ProtectState | None = None) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Run one protection (``job``: :func:`protect_job`) of ``normal`` on this rank's shards, from ``resume`` (a
    ProtectState) when given, and score it on the original test split; returns (protected model, metrics, card)."""
    from sophon_ray.run.checkpoint import make_card  # noqa: PLC0415
    from sophon_ray.core.protection import protect  # noqa: PLC0415
    from sophon_ray.spec import to_dict  # noqa: PLC0415
    from sophon_ray.modes import task_for  # noqa: PLC0415
    from sophon_ray.core.training import evaluate  # noqa: PLC0415

    task = task_for(spec)
    m = task.metric
    variant = spec.protect[job.variant_index]
    result = protect(normal, _shard(splits.original_train, rank, world), splits.original_val,
                     [_shard(d, rank, world) for d in splits.restricted_train], splits.restricted_val, variant,
                     normal_acc, device, on_metrics=on_metrics, sync=sync, rank=rank,
                     probe_train=splits.restricted_train, seed=job.seed, on_checkpoint=on_checkpoint,
                     resume=resume, task=task)
    test_acc = evaluate(result.model, splits.original_test, device, task=task).score
    normal_test = evaluate(normal, splits.original_test, device, task=task).score
    metrics = {m.key("original_val"): result.original_acc, m.key("original_test"): test_acc,
               "intactness_drop": normal_test - test_acc, m.key("probe"): result.probe_acc,
               "selected_iteration": result.selected_iteration, "rollbacks": len(result.rollbacks),
               "iterations_run": result.iterations_run, "resumed_from_iteration": result.resumed_from,
               "seconds": result.seconds,
               # why that state: the most protected eligible one, and how much less protected the chosen one is
               names.SELECT_BEST_ITERATION: result.selection.best.iteration,
               names.SELECT_PROBE_COST: result.selection.probe_cost}
    card = make_card(spec.model, spec.original, spec.restricted, job.key, "protected", metrics,
                     extra={"variant": variant.label, "protect_seed": job.seed, "protect": to_dict(variant),
                            "rollback_events": result.rollbacks, "stopped": result.stopped,
                            names.SELECTED_REASON: result.selection.reason})
    return result.model, metrics, card


def job_total(spec: SweepSpec, job: TrainingJob) -> int:
    """A job's step count as its progress shows it: pretraining epochs (0 when the normal model is given),
    protection iterations."""
    if job.stage == "pretrain":
        weights = spec.pretrain.weights
        return 0 if weights and weights != "torchvision" else spec.pretrain.epochs
    return spec.protect[job.variant_index].iterations


def protected_label(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"

