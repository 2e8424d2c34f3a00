"""Ray Tune: one Tune trial per planned :class:`~sophon_ray.run.plan.Trial` (development and evaluation grids), or
per pack of them (``attack.pack``, :mod:`sophon_ray.run.packing`: its members trained as one), logged to MLflow by
a driver-side callback (one writer), one MLflow run per planned trial either way.

Tune's param space grids over the trials' keys; the trial table travels with the trainable
(``tune.with_parameters``). Trials report scalars only; their curves and artifacts come to the callback through
a :class:`~sophon_ray.run.mail.TrialMail` actor. Tune's automatic CSV/JSON/TensorBoard loggers are off
(``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``): MLflow is the record.

A large grid runs as a sequence of Tune runs of at most :func:`chunk_size` Tune trials each (:func:`chunk_plan`):
Tune keeps every trial of a run (its config, results, error) in the driver until the run ends, and saves them all
into its experiment state again and again, so one run of the whole grid makes the driver grow with the sweep."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sophon_ray import names
from sophon_ray.console.terminal import environment
from sophon_ray.errors import SophonError
from sophon_ray.modes import metric_for
from sophon_ray.spec import SearchSpec, SweepSpec
from sophon_ray.run.plan import Trial
from sophon_ray.run.trials_worker import (LAST_REPORT, MEMBERS, AttackData, MailReader, SearchData,  # noqa: F401
                                          attack_trial, close_mail, mail_box, open_mail, search_config, search_trial,
                                          share)

if TYPE_CHECKING:
    from sophon_ray.run.outbox import Outbox
    from sophon_ray.run.packing import PackPlan
    from sophon_ray.run.tracking import Tracker

log = logging.getLogger(__name__)

CHUNK_ENV = "SOPHON_TUNE_CHUNK"
# The most Tune trials (packs or lone trials) in one Tune run of the attack grid. Measured (bench/scale.py, tiny
# trials on 2 cores): while a Tune run goes, the driver grows by ~65 KiB per trial (Tune's trials and results), so
# a chunk of 1000 peaks ~65 MiB above the driver's ~820 MiB; between two chunks the driver spends ~1 s (the
# ResultGrid, releasing memory, the next run's set-up) and the next run starts fresh trial processes, against 74-102
# s per chunk of 1000 tiny trials. Smaller chunks save little memory and pay that gap more often.
CHUNK = 1000


class ChunkSizeError(SophonError, ValueError):
    """$SOPHON_TUNE_CHUNK is not a whole number >= 1."""


def chunk_size() -> int:
    """$SOPHON_TUNE_CHUNK, else :data:`CHUNK`; raises ChunkSizeError naming the variable and the fix."""
    import os  # noqa: PLC0415

    text = os.environ.get(CHUNK_ENV)
    if text is None:
        return CHUNK
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ChunkSizeError(f"{CHUNK_ENV}={text!r} is not a whole number of Tune trials >= 1; unset it (default "
                             f"{CHUNK}) or set e.g. {CHUNK_ENV}=500")
    return value


def chunk_plan(plan: PackPlan, size: int) -> list[PackPlan]:
    """``plan``'s Tune trials (:attr:`PackPlan.units`: packs, then lone trials) in consecutive runs of at most
    ``size``, each a PackPlan of its own packs and lone trials (a pack is never split); [] for an empty plan."""
    from sophon_ray.run.packing import PackPlan  # noqa: PLC0415

    packs, alone = list(plan.packs.items()), plan.alone
    units = len(packs) + len(alone)
    out = []
    for start in range(0, units, size):
        end = start + size
        out.append(PackPlan(dict(packs[start:end]), alone[max(0, start - len(packs)):max(0, end - len(packs))]))
    return out


def chunk_trials(chunk: PackPlan, trials: dict[str, Trial]) -> list[Trial]:
    """The planned trials one chunk runs: its packs' members (from ``trials``, by key), then its lone trials."""
    return [*(trials[k] for members in chunk.packs.values() for k in members), *(t for t, _ in chunk.alone)]


def stopped_early(grid: Any, units: int) -> bool:
    """Whether a Tune run ended before each of its ``units`` trials finished or errored: Tune's SIGINT (Ctrl-C)
    or SIGUSR1 handler stops the run and returns normally, so the caller must not start another run."""
    return grid.num_terminated + grid.num_errors < units


def release_memory() -> None:
    """Give the memory a finished Tune run freed back to the OS: a garbage collection, then glibc's ``malloc_trim``
    (free pages in every malloc arena; Ray's threads each allocate in their own arena, and what one chunk frees
    there would otherwise stay in the driver's RSS); nothing more where the C library is not glibc."""
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415
    import gc  # noqa: PLC0415

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): its allocator keeps its own policy


def put_inputs(**inputs: Any) -> dict[str, Any]:
    """Each input as :func:`share` makes it, put in the object store once: ObjectRefs ``tune.with_parameters`` passes
    on as they are: every Tune run of a chunked grid reads the same objects (``with_parameters`` would put its own
    copy per run and, through Ray's init hooks, keep every copy for the driver's life)."""
    import ray  # noqa: PLC0415

    return {k: ray.put(share(v)) for k, v in inputs.items()}


# generation's after-attack scores. sample_fid_standard: FID in the standard FID network; sample_frechet_imagenet:
# the same formula in torchvision's ImageNet Inception-v3, not FID (runs logged before the rename call it sample_fid)
SAMPLE_METRICS = ("sample_kid", "sample_kid_std", "sample_confidence", "sample_confident_share", "sample_class_entropy",
                  "sample_kid_before", "sample_fid_standard", "sample_frechet_imagenet")


def summary_keys(m: names.Metric) -> tuple[str, ...]:
    """The metrics a trial's last report logs at step 0."""
    return m.final, m.best, m.original, m.val_best, m.at_val_best, names.STOPPED, *SAMPLE_METRICS


def grid_trials(trials: dict[str, Trial]) -> Callable[[Any], Trial]:
    """The planned :class:`Trial` of a grid trial: its key is in Tune's param space, ``trials`` by key."""
    return lambda tune_trial: trials[tune_trial.config["key"]]


def member_views(tune_trial: Any, trial_of: Callable[[Any], Trial],
                 packs: dict[str, tuple[str, ...]], trials: dict[str, Trial]) -> list[tuple[Trial, str, str]]:
    """(planned Trial, its mail box, its key in the Tune result's :data:`MEMBERS` or "" for the result itself) of
    every planned trial a Tune trial runs: a pack's members (its id in ``packs``), else the one of ``trial_of``."""
    members = packs.get(tune_trial.config.get("key", "")) if packs else None
    if members is None:
        return [(trial_of(tune_trial), tune_trial.trial_id, "")]
    return [(trials[k], mail_box(tune_trial.trial_id, k), k) for k in members]


def epoch_rows(curve: list[dict[str, float]]) -> list[tuple[int, dict[str, float]]]:
    """A trial's mailed per-epoch rows as the outbox logs them: (step = epoch, the row's metrics)."""
    return [(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"}) for row in curve]


def member_result(result: dict, member: str) -> dict:
    """A member's own report in a Tune result (``member`` "": the result is the trial's own)."""
    return result.get(MEMBERS, {}).get(member, {}) if member else result


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


def make_callback(tracker: Tracker, parent_id: str, sweep_id: str, outbox: Outbox | None = None,
                  trial_of: Callable[[Any], Trial] | None = None, metric: names.Metric = names.ACCURACY) -> Any:
    """A Tune callback that mirrors every trial into its own MLflow child run of ``parent_id``, exactly once per
    step; ``trial_of`` gives a Tune trial's :class:`Trial` (a search numbers its own; for a grid it is
    :func:`grid_trials` of the table :func:`run_attacks` attaches). The trials' rows and artifacts come from the
    trial mail that :func:`run_attacks` / :func:`run_search` attach (``callback.attach``).

    The hooks only enqueue into ``outbox`` (a :class:`~sophon_ray.run.outbox.Outbox`, whose thread delivers, retries
    and journals), so a slow or unreachable store never blocks Tune. Without ``outbox`` the callback makes its
    own (in memory) and waits for it at the experiment's end (``$SOPHON_TRACKING_WAIT_S``). A trial the scheduler
    stopped early (no last report of its own) gets its summary from its last result.

    A packed Tune trial (its key a pack id in the ``packs`` that ``attach`` gets) is mirrored into each member's own
    run (:func:`member_views`): the member's rows from its own mail box, its summary from the result's
    :data:`MEMBERS`; an errored pack fails the members whose last report had not arrived."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.run.outbox import Outbox  # noqa: PLC0415
    from sophon_ray.run.delivery import wait_seconds  # noqa: PLC0415

    own = outbox is None
    box = Outbox(tracker).start() if own else outbox
    summarised: set[str] = set()
    m, summary = metric, summary_keys(metric)
    attached: dict[str, Any] = {"mail": None, "trial_of": trial_of, "packs": {}, "trials": {}}

    def members(trial: Any) -> list[tuple[Trial, str, str]]:
        """(Trial, mail box, member key) of every planned trial the Tune trial runs (:func:`member_views`)."""
        return member_views(trial, attached["trial_of"], attached["packs"], attached["trials"])

    def take(mailbox: str) -> tuple[list[dict[str, float]], dict[str, bytes]]:
        return attached["mail"].take(mailbox) if attached["mail"] is not None else ([], {})

    def open_run(t: Trial) -> None:
        box.open(t.key, parent_id, sweep_id, t.name, t.params())

    def key(t: Trial) -> str:
        """The trial's key, its run opened first if it never was (Tune can error a trial it never started)."""
        if t.key not in box.opened:
            open_run(t)
        return t.key

    def log_result(t: Trial, mailbox: str, result: dict) -> None:
        # a retried trial replays epochs that are already logged: the outbox logs each step once
        curve, artifacts = take(mailbox)
        rows = epoch_rows(curve)
        if result.get(LAST_REPORT):
            rows.append((0, {k: result[k] for k in summary if result.get(k) is not None}))
            summarised.add(key(t))
        box.rows(key(t), rows)
        if result.get(LAST_REPORT):
            box.tag(key(t), names.NODE, result.get("node_id", ""))
        for name, data in artifacts.items():
            box.artifact(key(t), name, data)

    def complete(t: Trial, mailbox: str, last: dict) -> None:
        curve, artifacts = take(mailbox)  # anything sent after the last result Tune passed on
        if curve:
            box.rows(key(t), epoch_rows(curve))
        for name, data in artifacts.items():
            box.artifact(key(t), name, data)
        if key(t) not in summarised and m.restricted in last:  # stopped by the scheduler
            box.rows(key(t), [(0, {m.final: last[m.restricted], names.STOPPED: 1.0,
                                   **{k: last[k] for k in (m.best, m.val_best, m.at_val_best) if k in last}})])
        box.finish(key(t), "FINISHED")

    class MlflowTrials(tune.Callback):
        def attach(self, mail: Any = None, trials: dict[str, Trial] | None = None,
                   packs: dict[str, tuple[str, ...]] | None = None) -> None:
            """Read trials' rows from ``mail`` (``take(mail box)``); a grid's trials by key from ``trials``, its
            packs' members from ``packs`` (pack id -> member keys)."""
            attached["mail"] = mail
            if trials is not None:
                attached["trials"], attached["packs"] = trials, dict(packs or {})
                if trial_of is None:
                    attached["trial_of"] = grid_trials(trials)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for t, _, _ in members(trial):
                open_run(t)  # also for a retried trial: its run is set RUNNING again

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            for t, mailbox, member in members(trial):
                log_result(t, mailbox, member_result(result, member))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for t, mailbox, member in members(trial):
                complete(t, mailbox, member_result(trial.last_result or {}, member))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # a pack's member whose whole result was logged before the error is finished; the others failed
            for t, _, member in members(trial):
                box.finish(key(t), "FINISHED" if member and t.key in summarised else "FAILED")

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


def _trainable(spec: SweepSpec, function: Callable[..., None], plain: dict[str, Any], **parameters: Any) -> Any:
    """``function`` with its large inputs in the object store (as :func:`share` makes them), ``plain`` ones as
    they are, and one trial's resources."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.modes import task_for  # noqa: PLC0415

    r = spec.resources
    shared = {k: share(v) for k, v in parameters.items()}
    return tune.with_resources(
        tune.with_parameters(function, threads=int(max(1, r.cpus_per_trial)), channels_last=spec.model.channels_last,
                             task=task_for(spec), **plain, **shared),
        {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})


def _run_config(name: str, storage_path: str, callbacks: list[Any], max_failures: int, verbose: int) -> Any:
    from ray import tune  # noqa: PLC0415

    return tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks, verbose=verbose,
                          failure_config=tune.FailureConfig(max_failures=max_failures))


NO_AUTO_LOGGERS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}  # Tune's CSV/JSON/TensorBoard loggers: MLflow records


def _fit(tuner: Any, callbacks: list[Any], mail: Any, trials: dict[str, Trial] | None = None,
         packs: dict[str, tuple[str, ...]] | None = None) -> Any:
    """``tuner.fit()`` without Tune's automatic loggers, the callbacks reading the trials' ``mail``; the mail
    actor ends with it."""
    try:
        for callback in callbacks:
            if hasattr(callback, "attach"):
                callback.attach(MailReader(mail), trials, packs)
        # Tune's result grid looks for the result.json / progress.csv files those loggers would have written and warns
        # once per trial that they are missing: expected here, so that warning is silenced for the fit
        analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
        level = analysis_log.level
        analysis_log.setLevel(logging.ERROR)
        try:
            with environment(NO_AUTO_LOGGERS), tune_signals_restored():
                return tuner.fit()
        finally:
            analysis_log.setLevel(level)
    finally:
        close_mail(mail)


@contextmanager
def tune_signals_restored() -> Iterator[None]:
    """The SIGINT and SIGUSR1 handlers as they were before the block (in the main thread). Tune installs its own
    for a run (Ctrl-C stops the run) and leaves it installed after a run that ended normally: a later Ctrl-C (between
    two chunks' Tune runs, or in the report) would then only set that finished run's flag and be lost."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    signals = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()
    saved = {n: signal.getsignal(getattr(signal, n)) for n in signals} if main else {}
    try:
        yield
    finally:
        for n, handler in saved.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(getattr(signal, n), handler)


def run_attacks(spec: SweepSpec, trials: list[Trial], models: dict[str, tuple[dict, dict]] | Any,
                data: AttackData | Any, storage_path: str, name: str, callbacks: list[Any], max_failures: int = 2,
                verbose: int = 1, packs: dict[str, tuple[str, ...]] | None = None) -> Any:
    """Run the grid ``trials`` as one Tune experiment; returns Tune's ResultGrid.

    ``packs`` (pack id -> member keys, :func:`sophon_ray.run.packing.plan_packs`): those trials run as one Tune
    trial per pack, the others one each. ``models`` and ``data`` go to the object store as numpy arrays (once per
    call; ObjectRefs from :func:`put_inputs` are used as they are, for a grid run in chunks).
    ``verbose`` is Tune's console verbosity (0: Tune prints nothing; 1: its status table)."""
    from ray import tune  # noqa: PLC0415

    table, mail, packs = {t.key: t for t in trials}, open_mail(), dict(packs or {})
    packed = {k for members in packs.values() for k in members}
    units = [*packs, *(k for k in table if k not in packed)]
    plain = {"trials": table, "mail": mail, **({"packs": packs} if packs else {})}
    tuner = tune.Tuner(
        _trainable(spec, attack_trial, plain, models=models, data=data),
        param_space={"key": tune.grid_search(units)},
        tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=lambda t: f"t-{t.trial_id}"),
        run_config=_run_config(name, storage_path, callbacks, max_failures, verbose),
    )
    return _fit(tuner, callbacks, mail, table, packs)


def run_search(spec: SweepSpec, search: SearchSpec, template: Trial, num_samples: int, history: list[tuple[dict, float]],
               models: dict[str, tuple[dict, dict]], data: SearchData, storage_path: str, name: str,
               callbacks: list[Any], max_failures: int = 2, verbose: int = 1) -> Any:
    """Run ``num_samples`` trials of one search (``search``: a SearchSpec) against ``template``'s subject and
    domain as one Tune experiment: the searcher proposes recipes (warm-started with ``history``: the searched
    params and objective of trials an earlier run finished), the scheduler stops laggards."""
    from ray import tune  # noqa: PLC0415

    mail = open_mail()
    tuner = tune.Tuner(
        _trainable(spec, search_trial, {"mail": mail}, template=template,
                   models={template.subject.model: models[template.subject.model]}, data=data),
        tune_config=search_tune_config(spec, search, template, num_samples, history, name),
        run_config=_run_config(name, storage_path, callbacks, max_failures, verbose),
    )
    return _fit(tuner, callbacks, mail)


def search_tune_config(spec: SweepSpec, search: SearchSpec, template: Trial, num_samples: int,
                       history: list[tuple[dict, float]], name: str) -> Any:
    """The TuneConfig of one search: the searcher, the scheduler and Tune itself maximise the trial's best
    *validation* score (the attacker's own held-out split; the test split only scores the recipes found)."""
    from ray import tune  # noqa: PLC0415

    from sophon_ray.run import search_space as searching  # noqa: PLC0415

    objective = metric_for(spec.mode).val_best
    return tune.TuneConfig(
        metric=objective, mode="max", num_samples=num_samples, reuse_actors=True,
        search_alg=searching.searcher(search, template.config.strategy, template.subject.kind == "scratch", history,
                                      name, objective),
        scheduler=searching.scheduler(search), trial_dirname_creator=lambda t: f"t-{t.trial_id}")
