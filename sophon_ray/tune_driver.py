"""Ray Tune: one Tune trial per planned :class:`~sophon_ray.trials.Trial` (development and evaluation grids),
logged to MLflow by a driver-side callback (one writer)."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from sophon_ray import names
from sophon_ray.spec import SweepSpec
from sophon_ray.trials import Trial

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- trial inputs, shared
# Tensors travel to trials as numpy arrays: Ray's object store keeps one copy per node and every trial's
# ray.get maps it read-only without copying (pickled torch tensors would be copied out on every get).


def share(obj: Any) -> Any:
    """``obj`` with every tensor (also inside TensorDatasets, dataclasses, dicts, lists, tuples) as a numpy array."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy() if obj.dtype != torch.bfloat16 else obj
    if isinstance(obj, TensorDataset):
        return _SharedTensors(tuple(share(t) for t in obj.tensors))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: share(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: share(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(share(v) for v in obj)
    return obj


def unshare(obj: Any) -> Any:
    """The inverse of :func:`share`: tensors viewing the (read-only) arrays, no copy."""
    if isinstance(obj, np.ndarray):
        with warnings.catch_warnings():  # read-only object-store buffers; nothing here writes into them
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(obj)
    if isinstance(obj, _SharedTensors):
        return TensorDataset(*(unshare(a) for a in obj.arrays))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: unshare(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: unshare(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unshare(v) for v in obj)
    return obj


@dataclass(frozen=True)
class _SharedTensors:
    arrays: tuple[Any, ...]


@dataclass(frozen=True)
class AttackData:
    """What attack trials read, per restricted domain: the development grid's data (the protector's share to
    fine-tune on, its validation split to score on), the evaluation grid's (the attacker's pool, the test
    split), and the original test split (intactness after the attack)."""

    restricted_train: list[Dataset]
    restricted_val: list[Dataset]
    restricted_attacker: list[Dataset]
    restricted_test: list[Dataset]
    original_test: Dataset

    def for_trial(self, trial: Trial) -> tuple[Dataset, Dataset]:
        """(fine-tuning data, scoring data) of a trial's grid and domain."""
        d = trial.domain
        if trial.grid == names.DEVELOPMENT:
            return self.restricted_train[d], self.restricted_val[d]
        return self.restricted_attacker[d], self.restricted_test[d]


def attack_data(splits: Any) -> AttackData:
    """The trials' share of the sweep's splits (no original training or validation data)."""
    return AttackData(splits.restricted_train, splits.restricted_val, splits.restricted_attacker,
                      splits.restricted_test, splits.original_test)


# --------------------------------------------------------------------------------------------- the trial
REPORT_EVERY_S = 10.0  # a trial reports buffered epochs at most this often, and always at its end


class EpochReporter:
    """Buffers per-epoch rows and sends them to Tune in one report every ``every_s`` seconds.

    ``tune.report`` in a function trainable waits for the driver to take the result, so reporting every
    epoch of a short trial spends much of the trial waiting (and loads the driver). Each report carries
    the buffered rows as ``curve`` (epoch, restricted_acc, restricted_loss); the MLflow callback logs them.
    """

    def __init__(self, report: Any, final_epoch: int, every_s: float = REPORT_EVERY_S) -> None:
        self.report, self.final_epoch, self.every_s = report, final_epoch, every_s
        self.rows: list[list[float]] = []
        self.last = time.monotonic()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.rows.append([epoch, metrics["restricted_acc"], metrics["restricted_loss"]])
        if epoch < self.final_epoch and time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self, **final: Any) -> None:
        """Report the buffered rows, then ``final`` metrics (which override the last row's)."""
        epoch, acc, loss = self.rows[-1] if self.rows else (None, None, None)
        self.report({"epoch": epoch, "restricted_acc": acc, "restricted_loss": loss, "curve": self.rows, **final})
        self.rows, self.last = [], time.monotonic()


def attack_trial(config: dict[str, Any], models: dict[str, tuple[dict, dict]], data: AttackData,
                 threads: int, channels_last: bool = True) -> None:
    """The Tune function trainable: build the subject, fine-tune it, report its curve and final metrics.

    ``models`` and ``data`` arrive as :func:`share` made them (numpy views of the object store)."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415

    from sophon_ray.attack import finetune, scratch_model  # noqa: PLC0415
    from sophon_ray.models import build_model  # noqa: PLC0415
    from sophon_ray.spec import ModelSpec  # noqa: PLC0415

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"  # GPUs Tune gave this trial
    trial: Trial = config["trial"]
    state, card = models[trial.subject.model]
    model = build_model(ModelSpec(card["arch"], card["num_classes"], channels_last), card["channels"],
                        card["image_size"])
    model.load_state_dict(unshare(state))
    if trial.subject.kind == "scratch":
        model = scratch_model(model, trial.config.seed)
    cfg = trial.config
    reporter = EpochReporter(tune.report, cfg.epochs)
    data = unshare(data)
    train, score = data.for_trial(trial)
    result = finetune(model, train, score, cfg, original_test=data.original_test, device=device, on_epoch=reporter)
    reporter.flush(**{"epoch": cfg.epochs, names.RESTRICTED_ACC: result.final,
                      names.RESTRICTED_LOSS: result.restricted_loss[-1], names.FINAL: result.final,
                      names.BEST: result.best, names.ORIGINAL_ACC: result.original_acc,
                      "train_size": result.train_size, "compute_seconds": result.seconds,
                      "node_id": ray.get_runtime_context().get_node_id(), "done": True})


def make_callback(tracker: Any, parent_id: str, sweep_id: str, outbox: Any = None) -> Any:
    """A Tune callback that mirrors every trial into its own MLflow child run, exactly once per step.

    The hooks only enqueue into ``outbox`` (a :class:`~sophon_ray.outbox.Outbox`, whose thread delivers, retries
    and journals), so a slow or unreachable store never blocks Tune. Without ``outbox`` the callback makes its
    own (in memory) and waits for it at the experiment's end (``$SOPHON_TRACKING_WAIT_S``)."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.outbox import Outbox, wait_seconds  # noqa: PLC0415

    own = outbox is None
    box = Outbox(tracker).start() if own else outbox

    def open_run(trial: Any) -> None:
        t: Trial = trial.config["trial"]
        box.open(t.key, parent_id, sweep_id, t.name, t.params())

    def key(trial: Any) -> str:
        """The trial's key, its run opened first if it never was (Tune can error a trial it never started)."""
        t: Trial = trial.config["trial"]
        if t.key not in box.opened:
            open_run(trial)
        return t.key

    class MlflowTrials(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            open_run(trial)  # also for a retried trial: its run is set RUNNING again

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            # a retried trial replays epochs that are already logged: the outbox logs each step once
            rows = [(int(e), {names.RESTRICTED_ACC: acc, names.RESTRICTED_LOSS: loss})
                    for e, acc, loss in result.get("curve", [])]
            if result.get("done"):
                rows.append((0, {k: result[k] for k in (names.FINAL, names.BEST, names.ORIGINAL_ACC)
                                 if result.get(k) is not None}))
            box.rows(key(trial), rows)
            if result.get("done"):
                box.tag(key(trial), names.NODE, result.get("node_id", ""))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            box.finish(key(trial), "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            box.finish(key(trial), "FAILED")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if own:
                if not box.drain(wait_seconds()):
                    log.warning("%d MLflow operation(s) not delivered (%s)", box.pending_ops(), box.stats.last_error)
                box.close()

    return MlflowTrials()


def make_progress_callback(progress: Any) -> Any:
    """A Tune callback that counts trials into ``progress`` (a :class:`~sophon_ray.progress.AttackProgress`):
    started, finished, errored (Tune gave up) and recovered (Tune queued it again after a failure)."""
    from ray import tune  # noqa: PLC0415

    class TrialCounts(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            progress.started(trial.trial_id)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            progress.completed(trial.trial_id)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            progress.errored(trial.trial_id)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            progress.recovered(trial.trial_id)

    return TrialCounts()


def run_attacks(spec: SweepSpec, trials: list[Trial], models: dict[str, tuple[dict, dict]], splits: Any,
                storage_path: str, name: str, callbacks: list[Any], max_failures: int = 2, verbose: int = 1) -> Any:
    """Run ``trials`` as one Tune experiment; returns Tune's ResultGrid.

    ``models`` and the trials' share of ``splits`` go to the object store once, as numpy arrays. ``verbose``
    is Tune's console verbosity (0: Tune prints nothing; 1: its status table)."""
    from ray import tune  # noqa: PLC0415

    r = spec.resources
    trainable = tune.with_resources(
        tune.with_parameters(attack_trial, models=share(models), data=share(attack_data(splits)),
                             threads=int(max(1, r.cpus_per_trial)), channels_last=spec.model.channels_last),
        {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=lambda t: f"t-{t.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks, verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    return tuner.fit()
