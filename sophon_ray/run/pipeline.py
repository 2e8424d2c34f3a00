"""``sophon-ray run``: pretrain (Ray Train) -> protect (Ray Train) -> attack grid (Ray Tune) -> report.

Every stage is idempotent: models are stored under a key hashed from the spec slice they depend on
(reused when present), and attack trials are keyed the same way in MLflow (finished ones are never
rerun). MLflow is the ledger: one parent run per sweep, one child run per model and per trial.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sophon_ray import names
from sophon_ray.modes import metric_for
from sophon_ray.console.terminal import QUIET_ENV, Console, LogCapture, environment, link_ray_logs
from sophon_ray.errors import SophonError
from sophon_ray.spec import Problem, SpecError, SweepSpec, spec_hash, to_dict

if TYPE_CHECKING:
    from sophon_ray.run.plan import Trial

log = logging.getLogger(__name__)
# Trials Tune gave up on get one more Tune run. Tune's own retries (resources.max_failures) can be cut short:
# when a node dies, Ray 2.60 may report one dead actor twice, and the second report errors a trial that the
# first had already queued for retry (measured in the two-node fault test).
RETRY_PASSES = 1


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None
    resume: bool = False
    dry_run: bool = False
    max_trials: int | None = None
    attack: bool = True
    report: bool = True
    audit: Path | None = None          # attack a given protected checkpoint instead of protecting
    verbose: bool = False              # Ray's, Tune's and MLflow's own output on the console too


@dataclass
class Outcome:
    sweep_id: str
    trials: int
    trials_run: int = 0
    checkpoints: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""             # redacted: safe to print
    output_dir: str = ""
    log_dir: str = ""
    pending: int = 0                   # trials whose results are only in the journal (the store did not answer)
    journal: str = ""                  # that journal, when pending


def pending_text(pending: int, journal: str, spec_path: str | None = None) -> str:
    """What a sweep whose results are partly only in the journal says: not complete, where they are, the fix."""
    spec = spec_path or "SPEC"
    return (f"INCOMPLETE: the MLflow store did not answer, so {pending} trial(s)' results are not in MLflow yet; "
            f"they are kept in {journal}. Deliver them once the store is back: sophon-ray sync {spec} (or "
            f"sophon-ray run {spec} --resume, which also finishes the sweep and writes its report)")


@dataclass
class View:
    """What the user sees during one run: the console, and the log files once the output folder is known."""

    console: Console
    logs: LogCapture | None = None
    started_ray: bool = False

    def say(self, message: str) -> None:
        self.console.say(message)

    def start_ray(self, address: str | None) -> None:
        """``start_ray`` (quiet unless verbose) with Ray's loggers writing to the log file, then ``logs/ray``
        linked to Ray's session logs."""
        import ray  # noqa: PLC0415

        if ray.is_initialized():
            return
        if self.logs is not None:
            self.logs.reroute()  # Ray's loggers exist once it is imported; ray.init logs
        self.started_ray = True
        start_ray(address, quiet=not self.console.verbose)
        if self.logs is not None:
            self.logs.reroute()
            link_ray_logs(self.logs.log_dir, ray_logs_dir())


def sweep_id(spec: SweepSpec) -> str:
    """Hash of everything that defines the sweep's results (not tracking, resources or paths)."""
    return spec_hash((spec.name, spec.seed, spec.mode, spec.model, spec.original, spec.restricted, spec.pretrain,
                      spec.protect, spec.attack))


def pretrain_key(spec: SweepSpec) -> str:
    return spec_hash((spec.seed, spec.model, spec.original, spec.restricted, spec.pretrain))


def protect_key(spec: SweepSpec, index: int, seed: int) -> str:
    """Key of one protection: the normal model's key, the variant's settings (not its seed list) and the seed,
    so that adding a seed to a variant reuses the protections of the seeds it had."""
    return spec_hash((pretrain_key(spec), replace(spec.protect[index], seeds=()), seed))


def protected_models(spec: SweepSpec, options: RunOptions) -> list[tuple[str, int]]:
    """(variant, protection seed) of every protected model the attacks run against."""
    if options.audit:
        return [("audited", names.NO_PROTECT_SEED)]
    return [(v.label, seed) for v in spec.protect for seed in v.seeds]


def search_budget_lines(spec: SweepSpec, searched: int) -> list[str]:
    """One line per search: algorithm, scheduler, trials per attacked model and domain, the total, the most
    fine-tuning epochs it can spend."""
    lines = []
    for s in spec.attack.search:
        attacked = searched // max(1, sum(x.num_samples for x in spec.attack.search))
        total = s.num_samples * attacked
        lines.append(f"  search {s.name}: {s.algorithm} ({s.random_start} random first) + "
                     f"{'ASHA' if s.scheduler == 'asha' else 'no early stopping'}, {s.num_samples} trials x "
                     f"{attacked} (attacked models x restricted domains) = {total} trials, {s.max_concurrent} at once, "
                     f"at most {total * max(s.space.epochs)} fine-tuning epochs; objective: validation accuracy on "
                     f"{s.val_fraction:g} of the attacker's pool")
    return lines


def dry_run_text(spec: SweepSpec, trials: list[Trial], searched: int = 0) -> str:
    """The attack budget per grid and subject and per search, then every grid trial's name."""
    lines = [f"sweep {spec.name} ({sweep_id(spec)}): {len(trials)} grid trials + {searched} search trials, "
             f"{sum(t.config.epochs for t in trials)} grid fine-tuning epochs; attacker data pool: "
             f"{spec.attack.data_pool}",
             f"  protected models: {[f'{v.label} seed {s}' for v in spec.protect for s in v.seeds]}"]
    lines += search_budget_lines(spec, searched)
    for grid in names.GRIDS:
        chosen = [t for t in trials if t.grid == grid]
        if chosen:
            counts = Counter(t.subject.kind for t in chosen)
            cells = len({(t.domain, replace(t.config, seed=0)) for t in chosen if t.subject.kind != "scratch"})
            lines.append(f"  {grid} grid: {len(chosen)} trials ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
                         f"over {cells} cells (recipes x restricted domains) x {len({t.config.seed for t in chosen})} attack seeds")
    lines += ["trials:", *(f"  {t.name}" for t in trials)]
    return "\n".join(lines)


def start_ray(address: str | None, quiet: bool = False) -> None:
    """Join ``address`` / $RAY_ADDRESS, else start a private local instance on 127.0.0.1 (dashboard too).

    ``quiet``: workers' output is not forwarded to this process (it stays in Ray's session logs) and the driver's
    Ray logger logs at INFO (to wherever its handlers write; ``LogCapture`` points them at the log file)."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    common: dict[str, Any] = {"logging_level": logging.INFO if quiet else logging.WARNING,
                              "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **common)
    else:
        # the dashboard (on 127.0.0.1) also serves the state API that Ray Train's controller polls
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **common)


def ray_logs_dir() -> Path | None:
    """Ray's session log folder on this machine (worker, raylet, Train and Tune logs); None when unknown."""
    import ray  # noqa: PLC0415

    try:
        node = ray._private.worker._global_node  # noqa: SLF001 - Ray has no public accessor for it
        return Path(node.get_logs_dir_path()) if node is not None else None
    except (AttributeError, TypeError):
        return None


def failure_hint(log_file: Path, ray_logs: Path) -> str:
    """What a quiet run says when it stops on an error: where Ray's, Tune's and MLflow's own messages went."""
    return (f"the run stopped on an error (below). What Ray, Tune and MLflow said is in {log_file} and Ray's worker "
            f"logs in {ray_logs}; rerun with --verbose to see it all here, and with --resume to continue the sweep")


def mlflow_hint(uri: str, spec_path: str | None = None) -> str:
    """How to look at the runs: ``mlflow ui`` on the store (or the server's address) and ``sophon-ray ui``."""
    if uri.startswith(("http://", "https://")):
        plain = f"open {uri}"
    else:
        plain = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    if spec_path:  # sophon-ray ui's links open MLflow's 'Model training' view (a plain link opens its GenAI view)
        return f"MLflow UI: sophon-ray ui {spec_path}  (or: {plain}, then 'Model training')"
    return f"MLflow UI: {plain} (then 'Model training')"


def closing_text(outcome: Outcome, seconds: float, spec_path: str | None = None) -> str:
    """The lines a run ends with: time per stage, the short summary table, where the report, heatmaps, runs
    and logs are."""
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in outcome.stage_seconds.items())
    if outcome.pending:
        return "\n".join([f"stopped after {seconds:.0f} s ({stages}); {outcome.trials} trials, {outcome.trials_run} "
                          "run now", "", pending_text(outcome.pending, outcome.journal, spec_path), "",
                          f"logs: {outcome.log_dir}"])
    lines = [f"done in {seconds:.0f} s ({stages}); {outcome.trials} trials, {outcome.trials_run} run now"]
    report = outcome.report
    if report.get("overview"):
        lines += ["", report["overview"], ""]
    if report.get("html"):
        lines.append(f"report (one page, open it in a browser): {report['html']}")
    if report.get("summary"):
        lines.append(f"full report: {report['summary']}")
    if report.get("heatmaps"):
        lines.append("heatmaps: " + ", ".join(str(p) for p in report["heatmaps"]))
    if outcome.tracking_uri:
        lines.append(mlflow_hint(outcome.tracking_uri, spec_path))
    if outcome.log_dir:
        lines.append(f"logs: {outcome.log_dir}")
    return "\n".join(lines)


def run(spec: SweepSpec, options: RunOptions = RunOptions()) -> Outcome:
    """Run the sweep's stages; raise SpecError (before Ray starts) for a bad grid size or an interrupted
    sweep without ``resume``."""
    from sophon_ray.run.plan import plan_trials, search_budget  # noqa: PLC0415
    from sophon_ray.run.validate import advisories  # noqa: PLC0415

    view = View(Console(verbose=options.verbose))
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
    _check_tracking(spec)
    out = spec.out.resolve()
    view.logs = LogCapture(out / "logs", options.verbose)  # the first thing written
    try:
        with environment({} if options.verbose else QUIET_ENV):
            return _run_stages(spec, options, view, sid, trials, out, searched)
    except SophonError:
        raise  # its message names the problem and the fix
    except BaseException:
        if not options.verbose:
            view.say(failure_hint(view.logs.path, view.logs.log_dir / "ray"))
        raise
    finally:
        if view.started_ray:  # a Ray instance this run started ends with it (its shutdown logs to the file)
            import ray  # noqa: PLC0415

            ray.shutdown()
        view.logs.close()


def _check_tracking(spec: SweepSpec) -> None:
    """Refuse a tracking server that does not answer before anything is written (TrackingError names the fix)."""
    from sophon_ray.run.tracking import check_server, resolve_uri  # noqa: PLC0415

    uri = resolve_uri(spec.tracking.uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)


def _run_stages(spec: SweepSpec, options: RunOptions, view: View, sid: str, trials: list[Trial],
                out: Path, searched: int = 0) -> Outcome:
    """Open the sweep's parent run and run its stages; the run is FINISHED at the end, FAILED on any error.

    Raises SpecError for an interrupted sweep without ``resume``."""
    import mlflow  # noqa: F401, PLC0415
    from sophon_ray.run.tracking import Tracker, redact, resolve_uri  # noqa: PLC0415

    view.logs.reroute()  # MLflow's loggers exist once it is imported (above); creating a store logs
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
    outcome = Outcome(sid, len(trials) + searched, tracking_uri=redact(tracker.uri), output_dir=str(out),
                      log_dir=str(view.logs.log_dir))
    view.say(f"sweep {spec.name} ({sid}) | MLflow {redact(uri)} | experiment '{spec.name}' | output {out}")
    view.say(f"logs: {view.logs.path}" + ("" if options.verbose else
             f" and Ray's worker logs in {view.logs.log_dir / 'ray'} (--verbose prints them here)"))
    try:
        t0 = time.perf_counter()
        models = _train_stage(spec, options, view, tracker, parent, sid, out, outcome)
        outcome.stage_seconds["pretrain+protect"] = time.perf_counter() - t0
        if options.attack:
            t0 = time.perf_counter()
            _attack_stage(spec, options, view, tracker, parent, sid, out, trials, models, outcome)
            outcome.stage_seconds["attack"] = time.perf_counter() - t0
            if spec.attack.search and not outcome.pending:
                t0 = time.perf_counter()
                _search_stage(spec, options, view, tracker, parent, sid, out, models, outcome)
                outcome.stage_seconds["search"] = time.perf_counter() - t0
        if outcome.pending:  # not complete: no report from partial runs, the parent run stays open for --resume
            return outcome
        if options.report and options.attack and "protected" not in spec.attack.subjects:
            view.say("[4/4] report skipped: the heatmaps compare protected models with the baselines, and "
                     "attack.subjects has no 'protected' (the runs are in MLflow)")
        elif options.report and options.attack:
            t0 = time.perf_counter()
            from analysis.report import run_report  # noqa: PLC0415

            outcome.report = run_report(tracker.uri, spec.name, out / "report", sweep_id=sid)
            outcome.stage_seconds["report"] = time.perf_counter() - t0
            view.say(f"[4/4] report | {out / 'report'}")
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
    tracker.log_metrics(parent, {f"seconds_{k.replace('+', '_')}": v for k, v in outcome.stage_seconds.items()})
    tracker.finish(parent, "FINISHED")
    return outcome


@dataclass(frozen=True)
class SyncResult:
    journal: Path
    trials: int       # trials with undelivered results in the journal before
    pending: int      # ... and after
    delivered_ops: int


def sync(spec: SweepSpec) -> SyncResult:
    """Deliver the journal's undelivered MLflow results of the spec's sweep (``sophon-ray sync``): idempotent,
    so a second sync delivers nothing twice. Raises TrackingError when the store does not answer."""
    from sophon_ray.run.outbox import JOURNAL, Journal, Outbox, http_env, wait_seconds  # noqa: PLC0415
    from sophon_ray.run.tracking import Tracker, resolve_uri  # noqa: PLC0415

    journal = spec.out.resolve() / JOURNAL
    if not Journal(journal).pending():
        return SyncResult(journal, 0, 0, 0)  # nothing to do: the store is not even opened
    _check_tracking(spec)
    with environment(http_env()):
        outbox = Outbox(Tracker(resolve_uri(spec.tracking.uri), spec.name), journal)
        trials = outbox.load_journal()
        outbox.start()
        outbox.drain(wait_seconds())
        outbox.close()
    return SyncResult(journal, trials, len(outbox.pending_keys()), outbox.stats.delivered)


def _check_data(spec: SweepSpec) -> None:
    """Open every file-backed domain in the driver, so a missing root fails before Ray or MLflow start."""
    from sophon_ray.core.data import PROCEDURAL, load_domain  # noqa: PLC0415

    for domain in (spec.original, *spec.restricted):
        if domain.dataset not in PROCEDURAL:
            load_domain(domain)


def _train_stage(spec: SweepSpec, options: RunOptions, view: View, tracker: Any, parent: str, sid: str, out: Path,
                 outcome: Outcome) -> dict[str, Path]:
    """Reuse or train the normal model and every protected model; return model key (``normal``,
    ``protected/<variant>/s<seed>``) -> checkpoint dir."""
    from sophon_ray.run.checkpoint import CARD  # noqa: PLC0415
    from sophon_ray.console.progress import TrainJob, TrainProgress, board_poll, start_board, stop_board  # noqa: PLC0415
    from sophon_ray.run.train_driver import job_total, jobs_dir, protect_job, run_training  # noqa: PLC0415
    from sophon_ray.run.plan import Subject  # noqa: PLC0415

    store = out / "checkpoints"
    store.mkdir(exist_ok=True)
    pkey = pretrain_key(spec)
    normal_dir = store / jobs_dir("pretrain", "normal", pkey)
    jobs: list[dict[str, Any]] = []
    if not (normal_dir / CARD).is_file():
        jobs.append({"stage": "pretrain", "label": "normal", "key": pkey})
    wanted = {}
    if options.audit is None:
        for i, variant in enumerate(spec.protect):
            for seed in variant.seeds:
                job = protect_job(spec, i, seed, protect_key(spec, i, seed))
                path = wanted[Subject("protected", variant.label, seed).model] = store / jobs_dir(
                    "protect", job["label"], job["key"])
                if not (path / CARD).is_file():
                    jobs.append(job)
    else:
        wanted[Subject("protected", "audited", names.NO_PROTECT_SEED).model] = Path(options.audit).resolve()
    reused = [d for d in [normal_dir, *wanted.values()] if (d / CARD).is_file()]
    for d in reused:
        view.say(f"[1/4] reuse {d.name} (finished earlier)")
    if jobs:
        view.say(f"[1/4] Ray Train: {', '.join(j['label'] for j in jobs)} on {spec.resources.protect_workers} "
                 f"worker(s) each, {spec.resources.protect_parallel} protection(s) at once")
        view.start_ray(options.address)
        storage = spec.resources.storage_path or str(out / "ray")
        board = start_board()
        shown = TrainProgress([TrainJob(j["label"], j["stage"], job_total(spec, j)) for j in jobs], board_poll(board))
        try:
            with view.console.progress(shown, prefix="[1/4]"):
                results = run_training(spec, jobs, store, storage,
                                       normal_dir if (normal_dir / CARD).is_file() else None, progress=board,
                                       resume=options.resume)
        finally:
            stop_board(board)
        for r in results:
            m = metric_for(spec.mode)
            view.say(f"[1/4] {r['stage']} {r['label']} | original val {r[m.key('original_val')]:.1f} | test "
                     f"{r[m.key('original_test')]:.1f} | ranks identical: {r['ranks_identical']} | {r['dir']}")
    _log_models(spec, tracker, parent, sid, normal_dir, wanted)
    outcome.checkpoints = {"normal": str(normal_dir), **{k: str(v) for k, v in wanted.items()}}
    return {"normal": normal_dir, **wanted}


def _check_audited(spec: SweepSpec, directory: Path) -> None:
    """Refuse, before Ray starts, a checkpoint that is unreadable or does not fit the spec's model and data."""
    from sophon_ray.run.checkpoint import check_fits, load_checkpoint  # noqa: PLC0415

    _, card = load_checkpoint(directory)
    check_fits(card, spec.model, spec.original, str(directory))


def _log_models(spec: SweepSpec, tracker: Any, parent: str, sid: str, normal_dir: Path,
                protected: dict[str, Path]) -> None:
    """Mirror the pretrain/protect results into MLflow child runs (once: finished runs are left alone)."""
    from sophon_ray.run.checkpoint import WEIGHTS, read_card  # noqa: PLC0415
    from sophon_ray.run.train_driver import HISTORY  # noqa: PLC0415

    done = tracker.finished_keys(sid, "pretrain") | tracker.finished_keys(sid, "protect")
    entries = [("pretrain", "pretrain", normal_dir, to_dict(spec.pretrain))]
    for key, d in protected.items():
        _, label, seed_text = key.split("/")
        seed = int(seed_text[1:])
        variant = next((v for v in spec.protect if v.label == label), None)
        params = {names.VARIANT: label, names.PROTECT_SEED: seed,
                  **({k: v for k, v in to_dict(variant, hashed_only=True).items()
                      if k not in ("environments", "seeds", "probes")}
                     if variant else {"checkpoint": str(d)})}
        if variant:
            params |= {f"env_{k}": v for k, v in to_dict(variant.environments).items()}
            params["probes"] = ", ".join(f"{p.strategy}/{p.optimizer}/lr{p.lr:g}/bs{p.batch_size}/f{p.data_fraction:g}"
                                         for p in variant.probes)
        entries.append(("protect", f"protect/{label}/s{seed}", d, params))
    for role, name, d, params in entries:
        card = read_card(d)
        key = f"{role}-{card['spec_hash']}"
        if key in done:
            continue
        run_id = tracker.child_run(parent, sid, role, key, name, params)
        history_file = d / HISTORY
        if history_file.is_file():
            rows = json.loads(history_file.read_text())
            tracker.log_rows(run_id, [(int(r["step"]), {k: v for k, v in r.items() if k != "step"}) for r in rows])
        tracker.log_metrics(run_id, {k: v for k, v in card["metrics"].items() if isinstance(v, (int, float))})
        if role == "protect":
            for f in (WEIGHTS, "model.json"):
                tracker.log_artifact(run_id, d / f, "checkpoint")
        tracker.finish(run_id)


def _attack_stage(spec: SweepSpec, options: RunOptions, view: View, tracker: Any, parent: str, sid: str, out: Path,
                  trials: list[Trial], models: dict[str, Path], outcome: Outcome) -> None:
    """Attack trials whose MLflow writes go through an outbox (journal in ``out``); when the store stops
    answering for good, ``outcome.pending`` / ``outcome.journal`` say what waits for ``sophon-ray sync``."""
    from sophon_ray.run.outbox import JOURNAL, Outbox, http_env, wait_seconds  # noqa: PLC0415

    wait = wait_seconds()
    outbox = Outbox(tracker, out / JOURNAL)
    with environment(http_env()):
        try:
            _attack_trials(spec, options, view, tracker, parent, sid, out, trials, models, outcome, outbox, wait)
        finally:
            delivered = outbox.drain(wait)
            outbox.close()
    stats = outbox.stats
    log.info("MLflow outbox: %d operation(s) delivered, %d failed write(s) retried, %.1f s busy, peak queue %d%s",
             stats.delivered, stats.failures, stats.busy_s, stats.peak_queue,
             f", last error {stats.last_error}" if stats.last_error else "")
    if not delivered:
        outcome.pending, outcome.journal = len(outbox.pending_keys()), str(outbox.journal.path)
        view.say(f"[3/4] warning: {pending_text(outcome.pending, outcome.journal)}")


def _attack_trials(spec: SweepSpec, options: RunOptions, view: View, tracker: Any, parent: str, sid: str, out: Path,
                   trials: list[Trial], models: dict[str, Path], outcome: Outcome, outbox: Any, wait: float) -> None:
    """The attack stage's trials through ``outbox`` (started here): the journal's undelivered results of an
    earlier run first (a trial finished there is never rerun), then every trial not finished."""
    from sophon_ray.core.data import load_domain, make_splits  # noqa: PLC0415
    from sophon_ray.console.progress import AttackProgress  # noqa: PLC0415
    from sophon_ray.run.tune_driver import attack_data, make_callback, make_progress_callback, run_attacks  # noqa: PLC0415

    journaled = outbox.load_journal()
    outbox.start()
    if journaled:
        delivered = outbox.drain(wait)
        view.say(f"[2/4] journal: {journaled} trial(s) with results not yet in MLflow, "
                 + ("delivered now" if delivered else f"{len(outbox.pending_keys())} still undelivered"))
    finished = tracker.finished_keys(sid, "attack") | outbox.completed
    todo = [t for t in trials if t.key not in finished]
    view.say(f"[2/4] attack grid: {len(trials)} trials, {len(trials) - len(todo)} finished earlier, {len(todo)} to run")
    if not todo:
        return
    view.start_ray(options.address)
    loaded = _load_models(models)
    data = attack_data(make_splits(spec), [load_domain(d) for d in spec.benign])
    storage = spec.resources.storage_path or str(out / "ray")
    errors: list[Any] = []
    for attempt in range(1 + RETRY_PASSES):
        counts = AttackProgress(len(todo))
        with view.console.progress(counts, prefix="[2/4]" if attempt == 0 else "[2/4] retry pass:"):
            grid = run_attacks(spec, todo, loaded, data, storage, f"attack-{sid}-{int(time.time())}-{attempt}",
                               [make_callback(tracker, parent, sid, outbox, metric=metric_for(spec.mode)),
                                make_progress_callback(counts)],
                               spec.resources.max_failures, verbose=1 if options.verbose else 0)
        errors = [r for r in grid if r.error]
        todo = [t for t in todo if t.key not in outbox.completed]  # MLflow's view once the outbox delivers
        if not todo or attempt == RETRY_PASSES:
            break
        why = f": {errors[0].error!r:.200}" if errors else ""
        view.say(f"      {len(todo)} trial(s) not finished after Tune's retries (e.g. {todo[0].name}{why}); "
                 "one more pass for them")
    outcome.trials_run = len(trials) - len(finished) - len(todo)
    missing = [t.name for t in todo]
    view.say(f"[3/4] attack grid done | {outcome.trials_run} run now, {len(errors)} errored in the last pass, "
             f"{len(trials) - len(missing)}/{len(trials)} finished")
    if missing:
        raise RuntimeError(f"{len(missing)} trials did not finish (e.g. {missing[:3]}); rerun with --resume")


def _load_models(models: dict[str, Path]) -> dict[str, tuple[dict, dict]]:
    """Every checkpoint the attacks start from, as (state dict, card) by model key."""
    from sophon_ray.run.checkpoint import load_checkpoint  # noqa: PLC0415

    loaded = {}
    for key, d in models.items():
        model, card = load_checkpoint(d)
        loaded[key] = (model.state_dict(), card)
    return loaded


def search_key(sid: str, template: Trial) -> str:
    """Key of the search run of one (search, attacked model, domain) in one sweep."""
    return spec_hash((sid, template.search, template.subject.label, template.domain_name))


def search_history(tracker: Any, search_run: str, scratch: bool, metric: names.Metric = names.ACCURACY
                   ) -> tuple[list[tuple[int, dict, float, float]], int]:
    """The finished trials of a search run as (search_trial, searched params, objective, test score at the
    best-validation epoch), in search order, and the next free trial number. Trials an interrupted run left
    unfinished are marked KILLED (their number is not reused)."""
    from sophon_ray.spec import SearchSpace  # noqa: PLC0415

    searched = [f.name for f in fields(SearchSpace) if not (scratch and f.name == "strategy")]
    casts = {"batch_size": int, "epochs": int, "blocks": int, "lora_rank": int}
    done, numbers = [], [-1]
    for run in tracker.child_runs(search_run):
        numbers.append(int(run.data.params.get(names.SEARCH_TRIAL, -1)))
        metrics, params = run.data.metrics, run.data.params
        if run.info.status != "FINISHED" or metric.val_best not in metrics:
            if run.info.status == "RUNNING":
                tracker.finish(run.info.run_id, "KILLED")
            continue
        values = {k: _cast(params[k], casts.get(k)) for k in searched if k in params}
        done.append((int(params[names.SEARCH_TRIAL]), values, metrics[metric.val_best],
                     metrics.get(metric.at_val_best, metrics[metric.final])))
    return sorted(done, key=lambda row: row[0]), max(numbers) + 1


def _cast(text: str, cast: Any) -> Any:
    """An MLflow param (a string) back to the value the searcher gave: int, float, or the string itself."""
    if cast is not None:
        return cast(float(text))
    try:
        return float(text)
    except ValueError:
        return text


def _search_stage(spec: SweepSpec, options: RunOptions, view: View, tracker: Any, parent: str, sid: str, out: Path,
                  models: dict[str, Path], outcome: Outcome) -> None:
    """Every search (attack.search) against every attacked model and restricted domain, one Tune experiment
    each, under its own MLflow search run; a resumed search continues with the trials it has (warm start)."""
    from sophon_ray.core.data import make_splits  # noqa: PLC0415
    from sophon_ray.console.progress import AttackProgress  # noqa: PLC0415
    from sophon_ray.run.search_space import best_found  # noqa: PLC0415
    from sophon_ray.run.plan import search_templates  # noqa: PLC0415
    from sophon_ray.run.tune_driver import (SearchNumbering, make_callback, make_progress_callback,  # noqa: PLC0415
                                        run_search, search_data)

    searches, m = {s.name: s for s in spec.attack.search}, metric_for(spec.mode)
    templates = search_templates(spec, protected_models(spec, options))
    plan = []
    for template in templates:
        search = searches[template.search]
        run_id = tracker.child_run(parent, sid, "search", search_key(sid, template),
                                   f"search/{search.name}/{template.domain_name}/{template.subject.label}",
                                   {**{k: v for k, v in template.params().items() if k in
                                       (names.SUBJECT, names.VARIANT, names.PROTECT_SEED, names.DOMAIN, names.SEARCH)},
                                    "algorithm": search.algorithm, "scheduler": search.scheduler,
                                    "num_samples": search.num_samples, "val_fraction": search.val_fraction})
        history, first = search_history(tracker, run_id, template.subject.kind == "scratch", m)
        plan.append((template, search, run_id, history, first))
    todo = sum(max(0, s.num_samples - len(h)) for _, s, _, h, _ in plan)
    view.say(f"[3/4] search: {len(plan)} searches (search x attacked model x domain), {todo} trials to run")
    splits = make_splits(spec) if todo else None
    loaded = _load_models(models) if todo else {}
    storage = spec.resources.storage_path or str(out / "ray")
    counts = AttackProgress(todo)
    with view.console.progress(counts, prefix="[3/4]"):
        for template, search, run_id, history, first in plan:
            remaining = search.num_samples - len(history)
            if remaining > 0:
                view.start_ray(options.address)
                data = search_data(splits, template.domain, search.val_fraction, search.seed)
                name = f"search-{search_key(sid, template)}-{int(time.time())}"
                run_search(spec, search, template, remaining, [(p, v) for _, p, v, _ in history], loaded, data,
                           storage, name, [make_callback(tracker, run_id, sid,
                                                         trial_of=SearchNumbering(template, first), metric=m),
                                           make_progress_callback(counts)],
                           spec.resources.max_failures, verbose=1 if options.verbose else 0)
                history, _ = search_history(tracker, run_id, template.subject.kind == "scratch", m)
                outcome.trials_run += remaining
            logged = tracker.logged_steps(run_id, m.found_val)
            tracker.log_rows(run_id, [(f.n, {m.found_val: f.val, m.found_test: f.test})
                                      for f in best_found([(n, v, t) for n, _, v, t in history]) if f.n not in logged])
            complete = len(history) >= search.num_samples
            tracker.finish(run_id, "FINISHED" if complete else "FAILED")
    view.say(f"[3/4] search done | {todo} trials run now")
