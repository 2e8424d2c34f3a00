"""Ray Tune: one Tune trial per planned :class:`~sophon_ray.run.plan.Trial` (development and evaluation grids),
logged to MLflow by a driver-side callback (one writer)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from sophon_ray import names
from sophon_ray.modes import metric_for
from sophon_ray.seam import Task
from sophon_ray.spec import SweepSpec
from sophon_ray.run.plan import Trial

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
    benign: list[tuple[Dataset, Dataset]] = dataclasses.field(default_factory=list)  # (train, test) per domain

    def for_trial(self, trial: Trial) -> tuple[Dataset, Dataset]:
        """(fine-tuning data, scoring data) of a trial's grid and domain."""
        d = trial.domain
        if trial.grid == names.DEVELOPMENT:
            return self.restricted_train[d], self.restricted_val[d]
        if trial.grid == names.BENIGN:
            return self.benign[d]
        return self.restricted_attacker[d], self.restricted_test[d]  # evaluation, budget


def attack_data(splits: Any, benign: list[tuple[Dataset, Dataset]] | None = None) -> AttackData:
    """The trials' share of the sweep's splits (no original training or validation data), and the benign
    domains' (train, test) splits."""
    return AttackData(splits.restricted_train, splits.restricted_val, splits.restricted_attacker,
                      splits.restricted_test, splits.original_test, list(benign or []))


# --------------------------------------------------------------------------------------------- the trial
REPORT_EVERY_S = 10.0  # a trial reports buffered epochs at most this often, and always at its end
# marks a trial's own last report (not Tune's ``done``, which Tune also sets on a result its scheduler stops at)
LAST_REPORT = "sophon_last_report"
ARTIFACTS = "sophon_artifacts"   # in a trial's last report: {name: bytes} files for its MLflow run


class EpochReporter:
    """Buffers per-epoch rows and sends them to Tune in one report every ``every_s`` seconds.

    ``tune.report`` in a function trainable waits for the driver to take the result, so reporting every
    epoch of a short trial spends much of the trial waiting (and loads the driver). Each report carries
    the buffered rows as ``curve`` (one ``{"epoch": e, metric: value, ...}`` per epoch); the MLflow callback
    logs them. A search trial reports every epoch (``every_s=0``): its scheduler stops trials on that curve.
    """

    def __init__(self, report: Any, final_epoch: int, every_s: float = REPORT_EVERY_S,
                 metric: names.Metric = names.ACCURACY) -> None:
        self.report, self.final_epoch, self.every_s, self.metric = report, final_epoch, every_s, metric
        self.rows: list[dict[str, float]] = []
        self.running: dict[str, float] = {}
        self.last = time.monotonic()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.rows.append({"epoch": epoch, **metrics})
        self._update_running(metrics)
        if epoch < self.final_epoch and time.monotonic() - self.last >= self.every_s:
            self.flush()

    def _update_running(self, metrics: dict[str, float]) -> None:
        """Best test score so far; with validation data, the best validation score so far and the test score at
        that epoch (the attacker keeps its best-validation checkpoint)."""
        m = self.metric
        acc = metrics[m.restricted]
        self.running[m.best] = max(self.running.get(m.best, acc), acc)
        if m.val in metrics and metrics[m.val] > self.running.get(m.val_best, -math.inf):
            self.running.update({m.val_best: metrics[m.val], m.at_val_best: acc})

    def flush(self, **final: Any) -> None:
        """Report the buffered rows, then ``final`` metrics (which override the last row's)."""
        last = self.rows[-1] if self.rows else {}
        self.report({**last, **self.running, "curve": self.rows, **final})
        self.rows, self.last = [], time.monotonic()


def _subject_model(trial: Trial, models: dict[str, tuple[dict, dict]], channels_last: bool) -> Any:
    """The model a trial attacks, built from the shared state (scratch: a fresh init of its architecture)."""
    from sophon_ray.core.attack import scratch_model  # noqa: PLC0415
    from sophon_ray.modes import build_model  # noqa: PLC0415
    from sophon_ray.spec import ModelSpec  # noqa: PLC0415

    state, card = models[trial.subject.model]
    model = build_model(ModelSpec(card["arch"], card["num_classes"], channels_last), card["channels"],
                        card["image_size"])
    model.load_state_dict(unshare(state))
    return scratch_model(model, trial.config.seed) if trial.subject.kind == "scratch" else model


def _finish(reporter: EpochReporter, result: Any, epochs: int, extra: tuple[dict, dict] = ({}, {})) -> None:
    """The trial's last report: its summary metrics (and ``extra``: the task's after-attack metrics and
    artifacts) and its last-report mark (the MLflow callback finishes the run on it)."""
    import ray  # noqa: PLC0415

    m = reporter.metric
    metrics, artifacts = extra
    reporter.flush(**{"epoch": epochs, m.restricted: result.final, **metrics, ARTIFACTS: artifacts,
                      m.restricted_loss: result.restricted_loss[-1], m.final: result.final,
                      m.best: result.best, m.original: result.original,
                      "train_size": result.train_size, "compute_seconds": result.seconds,
                      "node_id": ray.get_runtime_context().get_node_id(), LAST_REPORT: True})


def _device(threads: int) -> str:
    """Set this trial's torch threads (Ray reuses workers); its device: a GPU when Tune gave it one."""
    import ray  # noqa: PLC0415

    torch.set_num_threads(max(1, threads))
    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


def attack_trial(config: dict[str, Any], models: dict[str, tuple[dict, dict]], data: AttackData,
                 threads: int, task: Task, channels_last: bool = True) -> None:
    """The Tune function trainable of a grid trial: build the subject, fine-tune it, report its curve and
    final metrics. ``models`` and ``data`` arrive as :func:`share` made them (numpy views of the object store)."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.core.attack import finetune  # noqa: PLC0415

    device = _device(threads)
    trial: Trial = config["trial"]
    model = _subject_model(trial, models, channels_last)
    reporter = EpochReporter(tune.report, trial.config.epochs, metric=task.metric)
    data = unshare(data)
    train, score = data.for_trial(trial)
    result = finetune(model, train, score, trial.config, original_test=data.original_test, device=device,
                      on_epoch=reporter, task=task, keep_model=True)
    _finish(reporter, result, trial.config.epochs, task.after_attack(model, result.model, train, score, device))


@dataclass(frozen=True)
class SearchData:
    """What a search's trials read for one restricted domain: the attacker's pool without its validation
    split (fine-tuning), that validation split (the objective), the restricted test split (the score), and the
    original test split (intactness)."""

    train: Dataset
    val: Dataset
    test: Dataset
    original_test: Dataset


def search_data(splits: Any, domain: int, val_fraction: float, seed: int) -> SearchData:
    """A search's data for ``domain``: ``val_fraction`` of the attacker's pool held out (stratified, seeded by
    the search, the same for every attacked model)."""
    from sophon_ray.core.data import split_off  # noqa: PLC0415

    train, val = split_off(splits.restricted_attacker[domain], val_fraction, seed)
    return SearchData(train, val, splits.restricted_test[domain], splits.original_test)


def search_config(template: Trial, sampled: dict[str, Any]) -> Trial:
    """The trial a search's sampled values make of its template (the template holds the fixed values)."""
    from dataclasses import replace  # noqa: PLC0415

    return replace(template, config=replace(template.config, **sampled))


def search_trial(config: dict[str, Any], template: Trial, models: dict[str, tuple[dict, dict]], data: SearchData,
                 threads: int, task: Task, channels_last: bool = True) -> None:
    """The Tune function trainable of a search trial: fine-tune the search's subject with the sampled recipe,
    report validation (the objective) and test accuracy after every epoch."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.core.attack import finetune  # noqa: PLC0415

    device = _device(threads)
    trial = search_config(template, config)
    model = _subject_model(trial, models, channels_last)
    reporter = EpochReporter(tune.report, trial.config.epochs, every_s=0.0, metric=task.metric)
    data = unshare(data)
    result = finetune(model, data.train, data.test, trial.config, original_test=data.original_test, device=device,
                      on_epoch=reporter, val=data.val, task=task, keep_model=True)
    _finish(reporter, result, trial.config.epochs,
            task.after_attack(model, result.model, data.train, data.test, device))


SAMPLE_METRICS = ("sample_kid", "sample_kid_std", "sample_confidence", "sample_confident_share", "sample_class_entropy",
                  "sample_kid_before", "sample_fid")   # generation's after-attack scores


def summary_keys(m: names.Metric) -> tuple[str, ...]:
    """The metrics a trial's last report logs at step 0."""
    return m.final, m.best, m.original, m.val_best, m.at_val_best, names.STOPPED, *SAMPLE_METRICS


def grid_trial_of(tune_trial: Any) -> Trial:
    """The planned :class:`Trial` a grid trial runs (it is in Tune's param space)."""
    return tune_trial.config["trial"]


class SearchNumbering:
    """The :class:`Trial` of each search trial: its template with the sampled values and its place in the
    search (``first`` for the first trial Tune starts, then in the order Tune starts them, which is the order
    the searcher proposed them; a retried trial keeps its number)."""

    def __init__(self, template: Trial, first: int) -> None:
        self.template, self.next = template, first
        self.trials: dict[str, Trial] = {}

    def __call__(self, tune_trial: Any) -> Trial:
        from dataclasses import replace  # noqa: PLC0415

        if tune_trial.trial_id not in self.trials:
            trial = search_config(self.template, tune_trial.config)
            self.trials[tune_trial.trial_id] = replace(trial, search_trial=self.next)
            self.next += 1
        return self.trials[tune_trial.trial_id]


def make_callback(tracker: Any, parent_id: str, sweep_id: str, outbox: Any = None,
                  trial_of: Callable[[Any], Trial] = grid_trial_of, metric: names.Metric = names.ACCURACY) -> Any:
    """A Tune callback that mirrors every trial into its own MLflow child run of ``parent_id``, exactly once per
    step; ``trial_of`` gives a Tune trial's :class:`Trial` (grid trials carry theirs; a search numbers its own).

    The hooks only enqueue into ``outbox`` (a :class:`~sophon_ray.run.outbox.Outbox`, whose thread delivers, retries
    and journals), so a slow or unreachable store never blocks Tune. Without ``outbox`` the callback makes its
    own (in memory) and waits for it at the experiment's end (``$SOPHON_TRACKING_WAIT_S``). A trial the scheduler
    stopped early (no last report of its own) gets its summary from its last result."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.run.outbox import Outbox, wait_seconds  # noqa: PLC0415

    own = outbox is None
    box = Outbox(tracker).start() if own else outbox
    summarised: set[str] = set()
    m, summary = metric, summary_keys(metric)

    def open_run(trial: Any) -> None:
        t = trial_of(trial)
        box.open(t.key, parent_id, sweep_id, t.name, t.params())

    def key(trial: Any) -> str:
        """The trial's key, its run opened first if it never was (Tune can error a trial it never started)."""
        t = trial_of(trial)
        if t.key not in box.opened:
            open_run(trial)
        return t.key

    class MlflowTrials(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            open_run(trial)  # also for a retried trial: its run is set RUNNING again

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            # a retried trial replays epochs that are already logged: the outbox logs each step once
            rows = [(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
                    for row in result.get("curve", [])]
            if result.get(LAST_REPORT):
                rows.append((0, {k: result[k] for k in summary if result.get(k) is not None}))
                summarised.add(key(trial))
            box.rows(key(trial), rows)
            if result.get(LAST_REPORT):
                box.tag(key(trial), names.NODE, result.get("node_id", ""))
                for name, data in (result.get(ARTIFACTS) or {}).items():
                    box.artifact(key(trial), name, data)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            if key(trial) not in summarised and m.restricted in last:  # stopped by the scheduler
                box.rows(key(trial), [(0, {m.final: last[m.restricted], names.STOPPED: 1.0,
                                           **{k: last[k] for k in (m.best, m.val_best, m.at_val_best)
                                              if k in last}})])
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
    """A Tune callback that counts trials into ``progress`` (a :class:`~sophon_ray.console.progress.AttackProgress`):
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


def _trainable(spec: SweepSpec, function: Callable[..., None], **parameters: Any) -> Any:
    """``function`` with its large inputs in the object store (as :func:`share` makes them) and one trial's
    resources."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.modes import task_for  # noqa: PLC0415

    r = spec.resources
    shared = {k: share(v) for k, v in parameters.items()}
    return tune.with_resources(
        tune.with_parameters(function, threads=int(max(1, r.cpus_per_trial)), channels_last=spec.model.channels_last,
                             task=task_for(spec), **shared),
        {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})


def _run_config(name: str, storage_path: str, callbacks: list[Any], max_failures: int, verbose: int) -> Any:
    from ray import tune  # noqa: PLC0415

    return tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks, verbose=verbose,
                          failure_config=tune.FailureConfig(max_failures=max_failures))


def run_attacks(spec: SweepSpec, trials: list[Trial], models: dict[str, tuple[dict, dict]], data: AttackData,
                storage_path: str, name: str, callbacks: list[Any], max_failures: int = 2, verbose: int = 1) -> Any:
    """Run the grid ``trials`` as one Tune experiment; returns Tune's ResultGrid.

    ``models`` and ``data`` go to the object store once, as numpy arrays. ``verbose`` is Tune's console
    verbosity (0: Tune prints nothing; 1: its status table)."""
    from ray import tune  # noqa: PLC0415

    tuner = tune.Tuner(
        _trainable(spec, attack_trial, models=models, data=data),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=lambda t: f"t-{t.trial_id}"),
        run_config=_run_config(name, storage_path, callbacks, max_failures, verbose),
    )
    return tuner.fit()


def run_search(spec: SweepSpec, search: Any, template: Trial, num_samples: int, history: list[tuple[dict, float]],
               models: dict[str, tuple[dict, dict]], data: SearchData, storage_path: str, name: str,
               callbacks: list[Any], max_failures: int = 2, verbose: int = 1) -> Any:
    """Run ``num_samples`` trials of one search (``search``: a SearchSpec) against ``template``'s subject and
    domain as one Tune experiment: the searcher proposes recipes (warm-started with ``history``: the searched
    params and objective of trials an earlier run finished), the scheduler stops laggards."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.run import search_space as searching  # noqa: PLC0415

    scratch = template.subject.kind == "scratch"
    tuner = tune.Tuner(
        _trainable(spec, search_trial, template=template, models={template.subject.model: models[template.subject.model]},
                   data=data),
        tune_config=tune.TuneConfig(
            metric=metric_for(spec.mode).val_best, mode="max", num_samples=num_samples, reuse_actors=True,
            search_alg=searching.searcher(search, template.config.strategy, scratch, history, f"{name}",
                                          metric_for(spec.mode).val_best),
            scheduler=searching.scheduler(search), trial_dirname_creator=lambda t: f"t-{t.trial_id}"),
        run_config=_run_config(name, storage_path, callbacks, max_failures, verbose),
    )
    return tuner.fit()
