"""Ray Tune: the attack grid as one trial per (subject, variant, strategy, optimizer, lr, batch size,
data fraction, schedule, epochs, seed), logged to MLflow by a driver-side callback (one writer)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from sophon_ray.attack import SCRATCH_STRATEGY, AttackConfig, grid_configs
from sophon_ray.spec import SweepSpec, spec_hash

log = logging.getLogger(__name__)
ATTACK_FIELDS = [f.name for f in fields(AttackConfig)]


def plan_trials(spec: SweepSpec, protected: list[str]) -> list[dict[str, Any]]:
    """Every attack trial of the sweep as a plain dict (deterministic order and keys).

    ``protected`` lists the protected models' labels. The scratch baseline runs once per
    (optimizer, lr, batch size, data fraction, schedule, epochs, seed), with strategy ``direct-all``:
    a random init trains all its layers whatever the cell's strategy (see README, Metrics).
    """
    models = [("protected", label) for label in protected if "protected" in spec.attack.subjects]
    models += [("normal", "-")] if "normal" in spec.attack.subjects else []
    trials, seen = [], set()
    configs = grid_configs(spec.attack.grid, spec.attack.weight_decay)
    for d, config in itertools.product(range(len(spec.restricted)), configs):
        cells = [(subject, variant, config) for subject, variant in models]
        scratch = AttackConfig(**{**config.as_params(), "strategy": SCRATCH_STRATEGY})
        if "scratch" in spec.attack.subjects and (d, scratch) not in seen:
            seen.add((d, scratch))
            cells.append(("scratch", "-", scratch))
        for subject, variant, cfg in cells:
            trial = {"subject": subject, "variant": variant, **cfg.as_params()}
            if len(spec.restricted) > 1:  # one more grid axis; single-domain keys stay as they were
                trial["domain"] = f"{d}:{spec.restricted[d].dataset}"
            trial["key"] = spec_hash(trial)
            trial["name"] = trial_name(trial)
            trials.append(trial)
    return trials


def trial_name(trial: dict[str, Any]) -> str:
    who = trial["subject"] if trial["variant"] == "-" else f"{trial['subject']}/{trial['variant']}"
    what = "all" if trial["subject"] == "scratch" else trial["strategy"]
    where = f"{trial['domain']}/" if "domain" in trial else ""
    return (f"{where}{who}/{what}/{trial['optimizer']}/lr{trial['lr']:g}/bs{trial['batch_size']}/"
            f"f{trial['data_fraction']:g}/e{trial['epochs']}/{trial['schedule']}/s{trial['seed']}")


def model_for(trial: dict[str, Any]) -> str:
    return f"protected/{trial['variant']}" if trial["subject"] == "protected" else "normal"


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
    """What attack trials read: the attacker's restricted data, the restricted and original test sets."""

    restricted_full: list[Dataset]
    restricted_test: list[Dataset]
    original_test: Dataset


def attack_data(splits: Any) -> AttackData:
    """The trials' share of the sweep's splits (no original training or validation data)."""
    return AttackData(splits.restricted_full, splits.restricted_test, splits.original_test)


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
    trial = config["trial"]
    state, card = models[model_for(trial)]
    model = build_model(ModelSpec(card["arch"], card["num_classes"], channels_last), card["channels"],
                        card["image_size"])
    model.load_state_dict(unshare(state))
    if trial["subject"] == "scratch":
        model = scratch_model(model, trial["seed"])
    cfg = AttackConfig(**{k: trial[k] for k in ATTACK_FIELDS})
    domain = int(trial.get("domain", "0").split(":")[0])
    reporter = EpochReporter(tune.report, cfg.epochs)
    data = unshare(data)
    result = finetune(model, data.restricted_full[domain], data.restricted_test[domain], cfg,
                      original_test=data.original_test, device=device, on_epoch=reporter)
    reporter.flush(epoch=cfg.epochs, restricted_acc=result.final, restricted_loss=result.restricted_loss[-1],
                   restricted_acc_final=result.final, restricted_acc_best=result.best,
                   original_acc=result.original_acc, train_size=result.train_size, compute_seconds=result.seconds,
                   node_id=ray.get_runtime_context().get_node_id(), done=True)


def make_callback(tracker: Any, parent_id: str, sweep_id: str) -> Any:
    """A Tune callback that mirrors every trial into its own MLflow child run, exactly once per step."""
    from ray import tune  # noqa: PLC0415

    class MlflowTrials(tune.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self.steps: dict[str, set[int]] = {}

        def _run(self, trial: Any) -> str:
            if trial.trial_id not in self.runs:
                t = trial.config["trial"]
                params = {k: t[k] for k in ["subject", "variant", "domain", *ATTACK_FIELDS] if k in t}
                run_id = tracker.child_run(parent_id, sweep_id, "attack", t["key"], t["name"], params)
                self.runs[trial.trial_id] = run_id
                self.steps[run_id] = tracker.logged_steps(run_id, "restricted_acc")
            return self.runs[trial.trial_id]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._run(trial)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            run_id = self._run(trial)
            logged = self.steps[run_id]  # a retried trial replays epochs that are already logged
            rows = [(int(e), {"restricted_acc": acc, "restricted_loss": loss})
                    for e, acc, loss in result.get("curve", []) if int(e) not in logged]
            if result.get("done"):
                rows.append((0, {k: result[k] for k in ("restricted_acc_final", "restricted_acc_best",
                                                        "original_acc") if result.get(k) is not None}))
            if rows:
                tracker.log_rows(run_id, rows)
            if result.get("done"):
                tracker.set_tag(run_id, "sophon.node_id", result.get("node_id", ""))
            logged.update(e for e, row in rows if "restricted_acc" in row)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tracker.finish(self._run(trial), "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tracker.finish(self._run(trial), "FAILED")

    return MlflowTrials()


def run_attacks(spec: SweepSpec, trials: list[dict[str, Any]], models: dict[str, tuple[dict, dict]], splits: Any,
                storage_path: str, name: str, callbacks: list[Any], max_failures: int = 2) -> Any:
    """Run ``trials`` as one Tune experiment; returns Tune's ResultGrid.

    ``models`` and the trials' share of ``splits`` go to the object store once, as numpy arrays."""
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
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    return tuner.fit()
