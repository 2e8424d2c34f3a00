"""``sophon-ray run``: pretrain (Ray Train) -> protect (Ray Train) -> attack grid (Ray Tune) -> report.

Every stage is idempotent: models are stored under a key hashed from the spec slice they depend on
(reused when present), and attack trials are keyed the same way in MLflow (finished ones are never
rerun). MLflow is the ledger: one parent run per sweep, one child run per model and per trial.

This module checks before anything starts and opens the sweep; the stages are in :mod:`.stages` and
:mod:`.search_stage`, the keys in :mod:`.keys`, the texts in :mod:`.texts`, ``sophon-ray sync`` in :mod:`.sync`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from sophon_ray.console.signals import LIBRARY_HANDLERS_OFF, Interrupted, fd_notice, received, signal_name, stopping
from sophon_ray.console.terminal import QUIET_ENV, Console, LogCapture, environment
from sophon_ray.errors import SophonError
from sophon_ray.run.context import Outcome, RunContext, RunOptions, View
from sophon_ray.run.keys import protected_models, sweep_id
from sophon_ray.run.sync import check_tracking
from sophon_ray.run.texts import dry_run_text, failure_hint
from sophon_ray.spec import Problem, SpecError, SweepSpec, to_dict

if TYPE_CHECKING:
    from sophon_ray.run.outbox import Outbox
    from sophon_ray.run.plan import Trial
    from sophon_ray.run.tracking import Tracker

log = logging.getLogger(__name__)


def run(spec: SweepSpec, options: RunOptions = RunOptions()) -> Outcome:
    """Run the sweep's stages; raise SpecError (before Ray starts) for a bad grid size or an interrupted
    sweep without ``resume``.

    SIGTERM or Ctrl-C (in the main thread) stops the run cleanly: the work in progress ends, what finished is
    kept (MLflow, the journal, the checkpoints), the sweep's parent run is KILLED, and :class:`Interrupted` is
    raised with the outcome (what finished); a second signal exits the process at once
    (:mod:`sophon_ray.console.signals`)."""
    view = View(Console(verbose=options.verbose))
    with stopping(fd_notice(view.console.stream, newline_first=view.console.live)):
        return _run(spec, options, view)


def _run(spec: SweepSpec, options: RunOptions, view: View) -> Outcome:
    from sophon_ray.run.plan import plan_trials, search_budget  # noqa: PLC0415
    from sophon_ray.run.validate import advisories  # noqa: PLC0415

    sid = sweep_id(spec)
    for warning in advisories(spec):
        view.say(f"warning: {warning}")
    protected = protected_models(spec, options)
    trials = plan_trials(spec, protected) if options.attack else []
    searched = search_budget(spec, protected) if options.attack else 0
    if options.max_trials is not None and len(trials) + searched > options.max_trials:
        raise SpecError([Problem("attack", f"{len(trials)} grid + {searched} search trials exceed --max-trials "
                                 f"{options.max_trials}: shrink the grids or searches, or raise --max-trials")],
                        spec.name)
    if options.dry_run:
        view.say(dry_run_text(spec, trials, searched))
        return Outcome(sid, len(trials) + searched)
    _check_data(spec)  # pre-flight: everything a user can get wrong fails here, before Ray or MLflow
    if options.audit is not None:
        _check_audited(spec, options.audit)
    check_tracking(spec)
    out = spec.out.resolve()
    view.logs = LogCapture(out / "logs", options.verbose)  # the first thing written
    try:
        with environment(LIBRARY_HANDLERS_OFF | ({} if options.verbose else QUIET_ENV)):
            return _run_stages(spec, options, view, trials, out, searched)
    except SophonError:
        raise  # its message names the problem and the fix
    except BaseException as err:
        if received():  # stopped by a signal: not an error (the CLI says what finished)
            if isinstance(err, Interrupted):
                raise
            _log_stop_error(err)
            raise Interrupted(received()) from None
        if not options.verbose:
            view.say(failure_hint(view.logs.path, view.logs.log_dir / "ray"))
        raise
    finally:
        if view.started_ray:  # a Ray instance this run started ends with it (its shutdown logs to the file)
            import ray  # noqa: PLC0415

            t0 = time.perf_counter()
            ray.shutdown()
            log.info("Ray shut down in %.1f s", time.perf_counter() - t0)
        view.logs.close()


def _open_sweep(spec: SweepSpec, options: RunOptions, view: View, out: Path, planned: int) -> RunContext:
    """The tracker, the sweep's parent run (RUNNING) and the run's context; the header lines said.

    Raises SpecError for an interrupted sweep without ``resume``."""
    import mlflow  # noqa: F401, PLC0415

    from sophon_ray.run.tracking import Tracker, redact, resolve_uri  # noqa: PLC0415

    assert view.logs is not None
    view.logs.reroute()  # MLflow's loggers exist once it is imported (above); creating a store logs
    sid = sweep_id(spec)
    uri = resolve_uri(spec.tracking.uri)
    tracker = Tracker(uri, spec.name)
    parent_status = tracker.sweep_status(sid)
    if parent_status not in (None, "FINISHED") and not options.resume:
        raise SpecError([Problem("", f"sweep {spec.name} ({sid}) was interrupted (parent run {parent_status}): "
                                 "continue it with --resume")], spec.name)
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(to_dict(spec), sort_keys=False))
    parent = tracker.sweep_run(sid, f"sweep-{sid}", spec_file, spec.mode)
    outcome = Outcome(sid, planned, tracking_uri=redact(tracker.uri), output_dir=str(out),
                      log_dir=str(view.logs.log_dir))
    view.say(f"sweep {spec.name} ({sid}) | MLflow {redact(uri)} | experiment '{spec.name}' | output {out}")
    view.say(f"logs: {view.logs.path}" + ("" if options.verbose else
             f" and Ray's worker logs in {view.logs.log_dir / 'ray'} (--verbose prints them here)"))
    return RunContext(spec, sid, tracker, parent, out, options, view, outcome)


def _stop_if_asked() -> None:
    """At a stage's end: stop when a signal asked to, even if a library swallowed the interrupt its handler raised
    (Tune's loop can catch it and finish its run normally)."""
    if received():
        raise Interrupted(received())


def _run_stages(spec: SweepSpec, options: RunOptions, view: View, trials: list[Trial], out: Path,
                searched: int = 0) -> Outcome:
    """Open the sweep's parent run and run its stages; the run is FINISHED at the end, FAILED on any error."""
    from sophon_ray.run.search_stage import search_stage  # noqa: PLC0415
    from sophon_ray.run.stages import attack_stage, through_outbox, train_stage  # noqa: PLC0415

    ctx = _open_sweep(spec, options, view, out, len(trials) + searched)
    outcome, tracker = ctx.outcome, ctx.tracker
    outcome.grid_total = len(trials)
    try:
        if any(v.defend for v in spec.protect) and options.audit is None:
            from sophon_ray.run.defend import defend_stage  # noqa: PLC0415

            t0, outcome.stage = time.perf_counter(), "defend"
            ctx = defend_stage(ctx)
            outcome.stage_seconds["defend"] = time.perf_counter() - t0
            _stop_if_asked()
            if outcome.incomplete:  # its writes wait in the journal: the store is down
                return outcome
        t0, outcome.stage = time.perf_counter(), "pretrain+protect"
        models = train_stage(ctx)
        outcome.stage_seconds["pretrain+protect"] = time.perf_counter() - t0
        _stop_if_asked()
        if outcome.incomplete:  # the models' runs wait in the journal: the store is down, the grid would wait too
            return outcome
        if options.attack:
            t0, outcome.stage = time.perf_counter(), "attack"
            attack_stage(ctx, trials, models)
            outcome.stage_seconds["attack"] = time.perf_counter() - t0
            _stop_if_asked()
            if spec.attack.search and not outcome.incomplete:
                t0, outcome.stage = time.perf_counter(), "search"
                search_stage(ctx, models)
                outcome.stage_seconds["search"] = time.perf_counter() - t0
                _stop_if_asked()
        if outcome.incomplete:  # not complete: no report from partial runs, the parent run stays open for --resume
            return outcome
        report = options.report and options.attack
        if report and "protected" not in spec.attack.subjects:
            report = False
            view.say("[4/4] report skipped: the heatmaps compare protected models with the baselines, and "
                     "attack.subjects has no 'protected' (the runs are in MLflow)")
        through_outbox(ctx, lambda outbox, wait: _finish(ctx, outbox, report), prefix="[4/4]")
    except BaseException as err:
        if not received():
            _mark(tracker, ctx.parent, "FAILED")
            raise
        _log_stop_error(err)
        raise _stopped(ctx, trials, received()) from None
    return outcome


def _finish(ctx: RunContext, outbox: Outbox, report: bool) -> None:
    """[4/4]: the report (when asked for), then the parent run's results through ``outbox``: the stage times, the
    report's files (under ``report/``) and its FINISHED status, last (a parent FINISHED in MLflow is a sweep whose
    results are all there)."""
    from dataclasses import replace  # noqa: PLC0415

    from analysis.report import artifact_folder, run_report  # noqa: PLC0415

    outbox.load_journal()
    outbox.start()
    key, outcome, report_dir = f"sweep-{ctx.sweep_id}", ctx.outcome, ctx.out / "report"
    if report:
        t0, outcome.stage = time.perf_counter(), "report"
        outcome.report = run_report(ctx.tracker.uri, ctx.spec.name, report_dir, sweep_id=ctx.sweep_id,
                                    log_to_parent=False)   # its files go through the journal (below)
        outcome.stage_seconds["report"] = time.perf_counter() - t0
        ctx.say(f"[4/4] report | {report_dir}")
    outbox.attach(key, ctx.parent)
    outbox.rows(key, [(0, {f"seconds_{k.replace('+', '_')}": v for k, v in outcome.stage_seconds.items()})])
    if outcome.report is not None:
        artifacts = []
        for path in outcome.report.paths:
            folder = artifact_folder(report_dir, path)
            outbox.file(key, path, folder)
            artifacts.append(f"{folder}/{Path(path).name}")
        outcome.report = replace(outcome.report, artifacts=artifacts)
    outbox.finish(key, "FINISHED")


def _mark(tracker: Tracker, run_id: str, status: str) -> None:
    """The parent run's FAILED or KILLED mark, written directly and at most once: a status for whoever looks, never
    journaled (a replay must not mark a resumed sweep failed). A store that does not answer leaves it RUNNING,
    which ``--resume`` continues all the same."""
    from sophon_ray.run.delivery import http_env  # noqa: PLC0415

    with environment(http_env()):  # a store that does not answer fails fast here
        try:
            tracker.finish(run_id, status)
        except Exception as err:  # noqa: BLE001 - the run's own error or stop is what the caller reports
            log.warning("the sweep's parent run was not marked %s: the MLflow store did not answer (%s: %.200s)",
                        status, type(err).__name__, err)


def _log_stop_error(err: BaseException) -> None:
    """Log (to the log file) an error that a stop caused in the code it interrupted, e.g. a Ray error; not the
    stop itself (:class:`Interrupted`, or the KeyboardInterrupt that ``ray.get`` raises in its place)."""
    if not isinstance(err, KeyboardInterrupt):
        log.info("stopped by %s; the error it caused:", signal_name(received()), exc_info=err)


def _stopped(ctx: RunContext, trials: list[Trial], signum: int) -> Interrupted:
    """A run that ``signum`` stopped, once its stages have ended their work: the parent run KILLED (``--resume``
    continues it), what finished counted into the outcome (models stored, grid trials finished in MLflow or in
    the journal, trials with results only in the journal)."""
    from sophon_ray.run.checkpoint import CARD  # noqa: PLC0415
    from sophon_ray.run.delivery import http_env  # noqa: PLC0415
    from sophon_ray.run.train_driver import model_jobs  # noqa: PLC0415

    outcome, outbox = ctx.outcome, ctx.outbox
    outcome.stopped_by = signum
    models = [d for d, _ in model_jobs(ctx.spec, ctx.out / "checkpoints", ctx.options.audit).values()]
    outcome.models_planned = len(models)
    outcome.models_ready = sum((d / CARD).is_file() for d in models)
    done = outbox.completed if outbox is not None else set()
    if outbox is not None and outbox.journal is not None:
        outcome.pending, outcome.journal = len(outbox.pending_keys()), str(outbox.journal.path)
    with environment(http_env()):  # a store that does not answer fails fast here
        try:
            done = done | ctx.tracker.finished_keys(ctx.sweep_id, "attack")
        except Exception as err:  # noqa: BLE001 - the stop goes on; what was journaled stays there
            log.warning("stopping: the MLflow store did not answer (%s: %s)", type(err).__name__, err)
    _mark(ctx.tracker, ctx.parent, "KILLED")
    outcome.grid_finished = len({t.key for t in trials} & done)
    log.info("stopped by %s during %s: %d/%d models, %d/%d grid trials, %d trial(s) only in the journal",
             signal_name(signum), outcome.stage, outcome.models_ready, outcome.models_planned,
             outcome.grid_finished, outcome.grid_total, outcome.pending)
    return Interrupted(signum, outcome)


def _check_data(spec: SweepSpec) -> None:
    """Open every file-backed domain in the driver, so a missing root fails before Ray or MLflow start."""
    from sophon_ray.core.data import PROCEDURAL, load_domain  # noqa: PLC0415

    for domain in (spec.original, *spec.restricted):
        if domain.dataset not in PROCEDURAL:
            load_domain(domain)


def _check_audited(spec: SweepSpec, directory: Path) -> None:
    """Refuse, before Ray starts, a checkpoint that is unreadable or does not fit the spec's model and data."""
    from sophon_ray.run.checkpoint import check_fits, load_checkpoint  # noqa: PLC0415

    _, card = load_checkpoint(directory)
    check_fits(card, spec.model, spec.original, str(directory))
