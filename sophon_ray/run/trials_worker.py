"""The trial side of Ray Tune: what a grid or search trial runs in its worker, and the data it reads.

A trial reports only scalar metrics to Tune (``tune.report``); its per-epoch rows and its artifacts (files for
its MLflow run) go to a :class:`TrialMail` actor, from which the driver's MLflow callback
(:func:`sophon_ray.run.tune_driver.make_callback`) takes them when the report arrives. So Tune's results stay
small and scalar, and nothing but the callback (one writer, through the outbox) logs to MLflow.

A packed Tune trial (``attack.pack``, :func:`pack_trial`) fine-tunes several grid trials as one
:func:`~sophon_ray.core.packed.finetune_pack`: each member's rows and artifacts go to its own mail box
(:func:`mail_box`), its reports (what :class:`EpochReporter` and :func:`_finish` make of it alone) travel together in
one Tune result under :data:`MEMBERS`, by member key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from sophon_ray import names
from sophon_ray.seam import Task
from sophon_ray.run.mail import (  # noqa: F401 - the trial mail, re-exported for the Tune driver
    MAIL_TIMEOUT_S, MailReader, TrialMail, close_mail, mail_box, mail_sender, open_mail)
from sophon_ray.run.plan import Trial

if TYPE_CHECKING:
    from sophon_ray.core.data import Splits

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
    original_train: Dataset | None = None   # allowed data of a warm_start: original recipe

    def for_trial(self, trial: Trial) -> tuple[Dataset, Dataset]:
        """(fine-tuning data, scoring data) of a trial's grid and domain."""
        d = trial.domain
        if trial.grid == names.DEVELOPMENT:
            return self.restricted_train[d], self.restricted_val[d]
        if trial.grid == names.BENIGN:
            return self.benign[d]
        return self.restricted_attacker[d], self.restricted_test[d]  # evaluation, budget

    def warm(self, kind: str) -> Dataset | None:
        """The allowed data of a ``warm_start`` recipe: the original domain's training split, or the first benign
        domain's; None for ``none``."""
        return warm_data(kind, self.original_train, self.benign)


def warm_data(kind: str, original_train: Dataset | None, benign: list[tuple[Dataset, Dataset]]) -> Dataset | None:
    """``original``: the original domain's training split; ``benign``: the first benign domain's; else None."""
    if kind == "original":
        return original_train
    if kind == "benign":
        return benign[0][0] if benign else None
    return None


def attack_data(splits: Splits, benign: list[tuple[Dataset, Dataset]] | None = None,
                warm_original: bool = False) -> AttackData:
    """The trials' share of the sweep's splits, and the benign domains' (train, test) splits; the original
    training split only when a recipe warm-starts on it (``warm_original``)."""
    return AttackData(splits.restricted_train, splits.restricted_val, splits.restricted_attacker,
                      splits.restricted_test, splits.original_test, list(benign or []),
                      splits.original_train if warm_original else None)


# --------------------------------------------------------------------------------------------- the trial
REPORT_EVERY_S = 10.0  # a trial reports buffered epochs at most this often, and always at its end
# marks a trial's own last report (not Tune's ``done``, which Tune also sets on a result its scheduler stops at)
LAST_REPORT = "sophon_last_report"


class EpochReporter:
    """Buffers per-epoch rows and reports them every ``every_s`` seconds: the rows (and, at the end, artifacts)
    to ``send`` (the trial mail), then the latest row's scalars, the running bests and ``final`` to ``report``
    (``tune.report``).

    ``tune.report`` in a function trainable waits for the driver to take the result, so reporting every
    epoch of a short trial spends much of the trial waiting (and loads the driver). A search trial reports every
    epoch (``every_s=0``): its scheduler stops trials on those reports.
    """

    def __init__(self, report: Any, final_epoch: int, every_s: float = REPORT_EVERY_S,
                 metric: names.Metric = names.ACCURACY,
                 send: Callable[[list[dict[str, float]], dict[str, bytes]], None] | None = None) -> None:
        self.report, self.final_epoch, self.every_s, self.metric = report, final_epoch, every_s, metric
        self.send = send
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

    def flush(self, artifacts: dict[str, bytes] | None = None, **final: Any) -> None:
        """Send the buffered rows (and ``artifacts``), then report the last row, the running bests and ``final``
        metrics (which override the last row's)."""
        if self.send is not None and (self.rows or artifacts):
            self.send(self.rows, artifacts or {})
        last = self.rows[-1] if self.rows else {}
        self.report({**last, **self.running, **final})
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
    reporter.flush(artifacts, **{"epoch": epochs, m.restricted: result.final, **metrics,
                      m.restricted_loss: result.restricted_loss[-1], m.final: result.final,
                      m.best: result.best, m.original: result.original,
                      "train_size": result.train_size, "compute_seconds": result.seconds,
                      "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
                      LAST_REPORT: True})


def _device(threads: int) -> str:
    """Set this trial's torch threads (Ray reuses workers); its device: a GPU when Tune gave it one."""
    import ray  # noqa: PLC0415

    torch.set_num_threads(max(1, threads))
    return "cuda" if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids() else "cpu"


def attack_trial(config: dict[str, Any], trials: dict[str, Trial], models: dict[str, tuple[dict, dict]],
                 data: AttackData, threads: int, task: Task, mail: Any = None, channels_last: bool = True,
                 packs: dict[str, tuple[str, ...]] | None = None) -> None:
    """The Tune function trainable of a grid trial (``config["key"]``: its key in ``trials``): build the subject,
    fine-tune it, send its curve to ``mail`` and report its final metrics. ``models`` and ``data`` arrive as
    :func:`share` made them (numpy views of the object store). A key in ``packs`` (pack id -> member keys) runs
    that pack (:func:`pack_trial`)."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.core.attack import finetune  # noqa: PLC0415

    if packs and config["key"] in packs:
        pack_trial([trials[k] for k in packs[config["key"]]], models, data, threads, task, mail, channels_last)
        return
    device = _device(threads)
    trial = trials[config["key"]]
    model = _subject_model(trial, models, channels_last)
    reporter = EpochReporter(tune.report, trial.config.epochs, metric=task.metric,
                             send=mail_sender(mail) if mail is not None else None)
    data = unshare(data)
    train, score = data.for_trial(trial)
    result = finetune(model, train, score, trial.config, original_test=data.original_test, device=device,
                      on_epoch=reporter, task=task, keep_model=True, warm=data.warm(trial.config.warm_start))
    _finish(reporter, result, trial.config.epochs, task.after_attack(model, result.model, train, score, device))


MEMBERS = "sophon_members"  # a packed Tune trial's result: member key -> what that member alone would report


class PackReporter:
    """The reporting of a packed Tune trial: one :class:`EpochReporter` per member (its rows to its own mail box,
    its reports kept by key), all flushed together into one ``tune.report`` (``{MEMBERS: {key: report}}``) every
    ``every_s`` seconds after a whole epoch of every member, and at the end."""

    def __init__(self, members: list[Trial], report: Any, metric: names.Metric, mail: Any = None,
                 every_s: float = REPORT_EVERY_S) -> None:
        self.report, self.every_s, self.last = report, every_s, time.monotonic()
        self.latest: dict[str, dict[str, Any]] = {}
        self.members = [EpochReporter(self._keeper(t.key), t.config.epochs, math.inf, metric,
                                      mail_sender(mail, t.key) if mail is not None else None) for t in members]
        self.keys = [t.key for t in members]

    def _keeper(self, key: str) -> Callable[[dict[str, Any]], None]:
        return lambda result: self.latest.__setitem__(key, result)

    def __call__(self, member: int, epoch: int, metrics: dict[str, float]) -> None:
        """``finetune_pack``'s ``on_epoch``."""
        reporter = self.members[member]
        reporter(epoch, metrics)
        if (member == len(self.members) - 1 and epoch < reporter.final_epoch
                and time.monotonic() - self.last >= self.every_s):
            for r in self.members:
                r.flush()
            self.send()

    def send(self) -> None:
        """One ``tune.report`` of every member's latest report; the last one when every member has finished."""
        done = all(self.latest.get(k, {}).get(LAST_REPORT) for k in self.keys)
        self.report({MEMBERS: {k: dict(v) for k, v in self.latest.items()}, LAST_REPORT: done})
        self.last = time.monotonic()


def pack_trial(members: list[Trial], models: dict[str, tuple[dict, dict]], data: AttackData, threads: int,
               task: Task, mail: Any = None, channels_last: bool = True) -> None:
    """A packed Tune trial: ``members`` (one subject, grid and domain; one pack key) fine-tuned as one
    :func:`~sophon_ray.core.packed.finetune_pack`; each member's curve, summary and after-attack extras reported
    as :func:`attack_trial` reports them alone, under its own key (:class:`PackReporter`)."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.core.packed import finetune_pack  # noqa: PLC0415

    device = _device(threads)
    first = members[0]
    model = _subject_model(first, models, channels_last)
    reporter = PackReporter(members, tune.report, task.metric, mail)
    data = unshare(data)
    train, score = data.for_trial(first)
    results = finetune_pack(model, train, score, [t.config for t in members], device, task=task,
                            on_epoch=reporter, original_test=data.original_test, keep_model=True)
    for member, one, result in zip(members, reporter.members, results):
        _finish(one, result, member.config.epochs, task.after_attack(model, result.model, train, score, device))
        result.model = None
    reporter.send()


@dataclass(frozen=True)
class SearchData:
    """What a search's trials read for one restricted domain: the attacker's pool without its validation
    split (fine-tuning), that validation split (the objective), the restricted test split (the score), and the
    original test split (intactness)."""

    train: Dataset
    val: Dataset
    test: Dataset
    original_test: Dataset
    warm: dict[str, Dataset] = dataclasses.field(default_factory=dict)   # warm_start kind -> its allowed data


def search_data(splits: Splits, domain: int, val_fraction: float, seed: int,
                warm: dict[str, Dataset] | None = None) -> SearchData:
    """A search's data for ``domain``: ``val_fraction`` of the attacker's pool held out (stratified, seeded by
    the search, the same for every attacked model)."""
    from sophon_ray.core.data import split_off  # noqa: PLC0415

    train, val = split_off(splits.restricted_attacker[domain], val_fraction, seed)
    return SearchData(train, val, splits.restricted_test[domain], splits.original_test, dict(warm or {}))


def search_config(template: Trial, sampled: dict[str, Any]) -> Trial:
    """The trial a search's sampled values make of its template (the template holds the fixed values)."""
    from dataclasses import replace  # noqa: PLC0415

    return replace(template, config=replace(template.config, **sampled))


def search_trial(config: dict[str, Any], template: Trial, models: dict[str, tuple[dict, dict]], data: SearchData,
                 threads: int, task: Task, mail: Any = None, channels_last: bool = True) -> None:
    """The Tune function trainable of a search trial: fine-tune the search's subject with the sampled recipe,
    report validation (the objective) and test accuracy after every epoch."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.core.attack import finetune  # noqa: PLC0415

    device = _device(threads)
    trial = search_config(template, config)
    model = _subject_model(trial, models, channels_last)
    reporter = EpochReporter(tune.report, trial.config.epochs, every_s=0.0, metric=task.metric,
                             send=mail_sender(mail) if mail is not None else None)
    data = unshare(data)
    result = finetune(model, data.train, data.test, trial.config, original_test=data.original_test, device=device,
                      on_epoch=reporter, val=data.val, task=task, keep_model=True,
                      warm=data.warm.get(trial.config.warm_start))
    _finish(reporter, result, trial.config.epochs,
            task.after_attack(model, result.model, data.train, data.test, device))
