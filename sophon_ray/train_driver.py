"""Ray Train: pretraining and protection (one job per protect variant and seed).

With ``resources.protect_parallel = 1`` every job runs in one TorchTrainer run (its start, ~10-25 s, is paid
once per sweep); with P > 1 pretraining runs first, then the protection jobs in P TorchTrainer runs at
once (each job on its own ``protect_workers`` workers). Every worker regenerates or reads the domains
locally, trains on its own shard, and averages gradients and BatchNorm statistics with
``torch.distributed`` (gloo on CPU, nccl on GPU), so all ranks hold identical weights; rank 0 reports each
finished model as a Ray Train checkpoint (weights, card and metric history), which the driver copies into
the sweep's checkpoint store. While a job runs, its rank 0 sends its progress (step, latest losses and
accuracy) to a :class:`~sophon_ray.progress.ProgressBoard` actor that the driver's console display polls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sophon_ray.progress import ProgressSender
from sophon_ray.spec import SweepSpec

log = logging.getLogger(__name__)
HISTORY = "history.json"


class AllReduce:
    """:class:`sophon_ray.protection.Sync` over ``torch.distributed``: flat buffers, one all-reduce each."""

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


def _shard(dataset: Any, rank: int, world: int) -> Any:
    from sophon_ray.data import take  # noqa: PLC0415

    return dataset if world == 1 else take(dataset, torch.arange(rank, len(dataset), world))


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker function: run the jobs (pretrain, then each protect variant) in order."""
    import ray.train  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from ray.train import Checkpoint  # noqa: PLC0415

    from sophon_ray.checkpoint import initial_model, make_card, save_checkpoint  # noqa: PLC0415
    from sophon_ray.data import make_splits  # noqa: PLC0415
    from sophon_ray.protection import protect  # noqa: PLC0415
    from sophon_ray.spec import to_dict  # noqa: PLC0415
    from sophon_ray.training import evaluate, pretrain  # noqa: PLC0415

    spec: SweepSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device() if spec.resources.use_gpu else torch.device("cpu")
    sync = AllReduce(world)
    splits = make_splits(spec)
    normal, needs_training = initial_model(spec)
    normal = normal.to(device)
    normal_acc = None
    if config.get("normal_state") is not None:
        normal.load_state_dict(config["normal_state"])
        normal_acc = config["normal_val_acc"]

    def finish(job: dict[str, Any], model: torch.nn.Module, card: dict[str, Any], history: list[dict],
               metrics: dict[str, Any]) -> None:
        digests: list[Any] = [state_digest(model)]
        if world > 1:
            digests = [None] * world
            dist.all_gather_object(digests, state_digest(model))
        metrics = {**metrics, "stage": job["stage"], "key": job["key"], "label": job["label"],
                   "rank_digests": digests, "ranks_identical": len(set(digests)) == 1}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ckpt"
            save_checkpoint(model, card, out)
            (out / HISTORY).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(out)))

    for job in config["jobs"]:
        start = time.perf_counter()
        history: list[dict[str, Any]] = []
        progress = ProgressSender(config.get("progress") if rank == 0 else None, job["label"], job["stage"],
                                  job_total(spec, job))

        def record(step: int, row: dict[str, float], history: list = history, progress: Any = progress) -> None:
            history.append({"step": step, **row})
            progress(step, row)

        if job["stage"] == "pretrain":
            seconds = 0.0
            if needs_training:
                seconds = pretrain(normal, _shard(splits.original_train, rank, world), splits.original_val,
                                   spec.pretrain, spec.seed, device, on_epoch=record, sync=sync, rank=rank).seconds
            normal_acc = evaluate(normal, splits.original_val, device).accuracy
            metrics = {"original_val_acc": normal_acc,
                       "original_test_acc": evaluate(normal, splits.original_test, device).accuracy,
                       "seconds": seconds}
            card = make_card(spec.model, spec.original, spec.restricted, job["key"], "normal", metrics)
            progress.finish(val_acc=normal_acc)
            finish(job, normal, card, history, metrics)
            continue
        variant = spec.protect[job["variant_index"]]
        result = protect(normal, _shard(splits.original_train, rank, world), splits.original_val,
                         [_shard(d, rank, world) for d in splits.restricted_train], splits.restricted_val, variant,
                         normal_acc, device, on_metrics=record, sync=sync, rank=rank,
                         probe_train=splits.restricted_train, seed=job["seed"])
        test_acc = evaluate(result.model, splits.original_test, device).accuracy
        normal_test = evaluate(normal, splits.original_test, device).accuracy
        metrics = {"original_val_acc": result.original_acc, "original_test_acc": test_acc,
                   "intactness_drop": normal_test - test_acc, "probe_acc": result.probe_acc,
                   "selected_iteration": result.selected_iteration, "rollbacks": len(result.rollbacks),
                   "iterations_run": result.iterations_run, "seconds": time.perf_counter() - start}
        card = make_card(spec.model, spec.original, spec.restricted, job["key"], "protected", metrics,
                         extra={"variant": variant.label, "protect_seed": job["seed"], "protect": to_dict(variant),
                                "rollback_events": result.rollbacks, "stopped": result.stopped})
        progress.finish(original_acc=result.original_acc, probe_acc=result.probe_acc)
        finish(job, result.model, card, history, metrics)


def job_total(spec: SweepSpec, job: dict[str, Any]) -> int:
    """A job's step count as its progress shows it: pretraining epochs (0 when the normal model is given),
    protection iterations."""
    if job["stage"] == "pretrain":
        weights = spec.pretrain.weights
        return 0 if weights and weights != "torchvision" else spec.pretrain.epochs
    return spec.protect[job["variant_index"]].iterations


def run_training(spec: SweepSpec, jobs: list[dict[str, Any]], store: Path, storage_path: str,
                 normal_dir: Path | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """Run ``jobs`` (pretrain first, if there) on Ray Train, ``resources.protect_parallel`` protection runs at
    once; copy each reported checkpoint to ``store/<dir>``; return their metrics (with ``dir``).

    ``normal_dir`` is the finished normal model when only protect jobs remain. ``progress``: a
    :class:`~sophon_ray.progress.ProgressBoard` actor that rank 0 of every job sends its progress to.
    """
    protect_jobs = [j for j in jobs if j["stage"] == "protect"]
    parallel = min(spec.resources.protect_parallel, len(protect_jobs))
    if parallel <= 1:
        return _fit(spec, jobs, store, storage_path, normal_dir, progress)
    out = []
    if len(protect_jobs) < len(jobs):  # the protections start from the pretrained model
        out = _fit(spec, [j for j in jobs if j["stage"] != "protect"], store, storage_path, normal_dir, progress)
        normal_dir = Path(next(r["dir"] for r in out if r["stage"] == "pretrain"))
    groups = balance(protect_jobs, parallel, lambda job: protection_cost(spec, job))
    with ThreadPoolExecutor(parallel, thread_name_prefix="protect") as pool:
        for results in pool.map(lambda group: _fit(spec, group, store, storage_path, normal_dir, progress),
                                groups):
            out += results
    return out


def protection_cost(spec: SweepSpec, job: dict[str, Any]) -> float:
    """Relative cost of a protection job: samples through the model per run (simulation and NTR)."""
    v = spec.protect[job["variant_index"]]
    return v.iterations * v.batch_size * (2 * v.inner_steps + v.ntr_steps)


def balance(jobs: list[dict[str, Any]], groups: int, cost: Any) -> list[list[dict[str, Any]]]:
    """Split ``jobs`` into ``groups`` lists of similar total cost: the costliest first, each to the lightest group
    (longest-processing-time first); within a group the original order is kept."""
    loads, out = [0.0] * groups, [[] for _ in range(groups)]
    for index in sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])):
        lightest = loads.index(min(loads))
        loads[lightest] += cost(jobs[index])
        out[lightest].append(index)
    return [[jobs[i] for i in sorted(group)] for group in out if group]


def _fit(spec: SweepSpec, jobs: list[dict[str, Any]], store: Path, storage_path: str,
         normal_dir: Path | None, progress: Any = None) -> list[dict[str, Any]]:
    """Run ``jobs`` in order in one TorchTrainer run; copy each reported checkpoint to ``store/<dir>``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    from sophon_ray.checkpoint import load_checkpoint  # noqa: PLC0415

    config: dict[str, Any] = {"spec": spec, "jobs": jobs, "threads": spec.resources.cpus_per_trial,
                              "progress": progress}
    if normal_dir is not None:
        model, card = load_checkpoint(normal_dir)
        config |= {"normal_state": model.state_dict(), "normal_val_acc": card["metrics"]["original_val_acc"]}
    r = spec.resources
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=r.protect_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_trial, **({"GPU": 1} if r.use_gpu else {})}),
        run_config=RunConfig(name=f"train-{int(time.time())}-{uuid.uuid4().hex[:8]}", storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             failure_config=FailureConfig(max_failures=1)),
    )
    result = trainer.fit()
    out = []
    for checkpoint, metrics in result.best_checkpoints or []:
        dest = store / jobs_dir(metrics["stage"], metrics["label"], metrics["key"])
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint.to_directory(str(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        out.append({**metrics, "dir": str(dest)})
    return out


def jobs_dir(stage: str, label: str, key: str) -> str:
    return f"{stage}-{label}-{key}"


def protect_job(spec: SweepSpec, index: int, seed: int, key: str) -> dict[str, Any]:
    """One protection: variant ``index`` with protection seed ``seed``."""
    label = protected_label(spec.protect[index].label, seed)
    return {"stage": "protect", "variant_index": index, "seed": seed, "label": label, "key": key}


def protected_label(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"

