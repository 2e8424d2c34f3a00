"""What a run says: the dry run's budget, the closing lines, the hints where the logs, the runs and the journal are."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sophon_ray import names
from sophon_ray.run.keys import sweep_id
from sophon_ray.spec import SweepSpec

if TYPE_CHECKING:
    from sophon_ray.run.context import Outcome
    from sophon_ray.run.plan import Trial


def pending_text(pending: int, journal: str, spec_path: str | None = None, refused: str = "") -> str:
    """What a sweep whose results are partly only in the journal says: not complete, where they are, the fix.
    ``refused``: the last error of writes that a store which answers kept failing (not an outage)."""
    spec = spec_path or "SPEC"
    if refused:
        return (f"INCOMPLETE: the MLflow store answers but kept failing the writes of {pending} run(s) (last error: "
                f"{refused}); they are kept in {journal}. Fix that error (the log has every failure), then deliver "
                f"them: sophon-ray sync {spec} (or sophon-ray run {spec} --resume, which also finishes the sweep)")
    if not pending:
        return (f"INCOMPLETE: the MLflow store did not answer, and this stage reads it; nothing waits in {journal}. "
                f"Continue once the store is back: sophon-ray run {spec} --resume")
    return (f"INCOMPLETE: the MLflow store did not answer, so the results of {pending} run(s) are not in MLflow yet; "
            f"they are kept in {journal}. Deliver them once the store is back: sophon-ray sync {spec} (or "
            f"sophon-ray run {spec} --resume, which also finishes the sweep and writes its report)")


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
    """The attack budget per grid and subject and per search, the packs (``attack.pack``), then every grid trial's
    name."""
    from sophon_ray.run.packing import pack_lines, plan_for  # noqa: PLC0415

    lines = [f"sweep {spec.name} ({sweep_id(spec)}): {len(trials)} grid trials + {searched} search trials, "
             f"{sum(t.config.epochs for t in trials)} grid fine-tuning epochs; attacker data pool: "
             f"{spec.attack.data_pool}",
             f"  protected models: {[f'{v.label} seed {s}' for v in spec.protect for s in v.seeds]}"]
    lines += search_budget_lines(spec, searched)
    lines += defend_budget_lines(spec)
    for grid in names.GRIDS:
        chosen = [t for t in trials if t.grid == grid]
        if chosen:
            counts = Counter(t.subject.kind for t in chosen)
            cells = len({(t.domain, replace(t.config, seed=0)) for t in chosen if t.subject.kind != "scratch"})
            lines.append(f"  {grid} grid: {len(chosen)} trials ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
                         f"over {cells} cells (recipes x restricted domains) x {len({t.config.seed for t in chosen})} attack seeds")
    lines += pack_lines(spec, plan_for(spec, trials))
    lines += ["trials:", *(f"  {t.name}" for t in trials)]
    return "\n".join(lines)


def defend_budget_lines(spec: SweepSpec) -> list[str]:
    """Per defended variant: its candidates (each one protection and the development grid), the space, the guard."""
    from sophon_ray.recipes import grid_configs  # noqa: PLC0415

    dev = len(grid_configs(spec.attack.development)) * len(spec.restricted)
    out = []
    for v in spec.protect:
        d = v.defend
        if d is None:
            continue
        given = [f.name for f in fields(d.space) if getattr(d.space, f.name) is not None]
        set_only = d.space.fixed()
        searched = ", ".join(k for k in given if k not in set_only)
        fixed = ", ".join(set_only)
        red = f" + a red team of {d.red_team.num_samples} searched attacks" if d.red_team else ""
        rounds = (f"; {d.rounds} rounds, each round's simulated attacker and development grid joined by the red "
                  f"team's {d.red_team.join} best recipes against the previous round's choice" if d.rounds > 1 else "")
        per_round = " a round" if d.rounds > 1 else ""
        out.append(f"  defend {v.label}: {d.algorithm} ({d.random_start} random first)"
                   f"{' + ASHA over probe checkpoints' if d.scheduler == 'asha' else ''}, {d.num_samples} candidates"
                   f"{per_round} x (1 protection of at most {max(d.space.iterations or (v.iterations,))} iterations + "
                   f"{dev} development attacks{red}), {d.max_concurrent} at once; searches {searched or 'nothing'}"
                   f"{f'; sets {fixed}' if fixed else ''}{rounds}; objective: "
                   f"{d.objective} worst case minus scratch, guard {d.guard:g} points; then {len(v.seeds)} protection(s) "
                   "of the chosen setting")
    return out


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
    if outcome.incomplete:
        return "\n".join([f"stopped after {seconds:.0f} s ({stages}); {outcome.trials} trials, {outcome.trials_run} "
                          "run now", "", pending_text(outcome.pending, outcome.journal, spec_path, outcome.refused), "",
                          f"logs: {outcome.log_dir}"])
    lines = [f"done in {seconds:.0f} s ({stages}); {outcome.trials} trials, {outcome.trials_run} run now"]
    report = outcome.report  # analysis.report.ReportResult, None when no report was made
    if report is not None and report.overview:
        lines += ["", report.overview, ""]
    if report is not None and report.html:
        lines.append(f"report (one page, open it in a browser): {report.html}")
    if report is not None and report.summary:
        lines.append(f"full report: {report.summary}")
    if report is not None and report.heatmaps:
        lines.append("heatmaps: " + ", ".join(str(p) for p in report.heatmaps))
    if outcome.tracking_uri:
        lines.append(mlflow_hint(outcome.tracking_uri, spec_path))
    if outcome.log_dir:
        lines.append(f"logs: {outcome.log_dir}")
    return "\n".join(lines)


STAGE_NAMES = {"defend": "the defender search", "pretrain+protect": "pretraining and protection (Ray Train)",
               "attack": "the attack grid (Ray Tune)", "search": "the attack searches (Ray Tune)",
               "report": "the report"}


def stopped_text(outcome: Outcome | None, signal_name: str, seconds: float, resume: str) -> str:
    """What a run that SIGTERM or Ctrl-C stopped says: which stage it stopped in, what finished (models stored,
    grid trials, results kept only in the journal), and the command that continues it (``resume``)."""
    from sophon_ray.console.terminal import format_duration  # noqa: PLC0415

    head = f"stopped by {signal_name} after {format_duration(seconds)}"
    if outcome is None or not outcome.stage:
        return "\n".join([f"{head}, with no stage running (the sweep was opening or closing): nothing is lost",
                          f"continue the sweep with: {resume}"])
    lines = [f"{head}, during {STAGE_NAMES.get(outcome.stage, outcome.stage)}; what finished is kept:",
             f"  models: {outcome.models_ready} of {outcome.models_planned} stored"
             + (" (--resume continues a protection from its last state checkpoint)"
                if outcome.stage == "pretrain+protect" and outcome.models_ready < outcome.models_planned else "")]
    if outcome.grid_total:
        lines.append(f"  attack grid: {outcome.grid_finished} of {outcome.grid_total} trials finished"
                     + (" (--resume runs the others; finished ones never rerun)"
                        if outcome.grid_finished < outcome.grid_total else ""))
    if outcome.stage == "search":
        lines.append("  attack searches: the finished search trials are in MLflow; --resume continues each search")
    if outcome.pending:
        lines.append(f"  MLflow: {outcome.pending} trial(s) with results not yet in MLflow, kept in {outcome.journal} "
                     "(--resume, or sophon-ray sync, delivers them)")
    elif outcome.journal:
        lines.append("  MLflow: every result is in MLflow (nothing left in the journal)")
    lines += [f"continue the sweep with: {resume}"]
    if outcome.log_dir:
        lines.append(f"logs: {outcome.log_dir}")
    return "\n".join(lines)
