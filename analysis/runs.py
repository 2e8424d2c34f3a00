"""Read one sweep's MLflow runs into typed pandas tables: attack trials, curves, protect, pretrain (shaping them into
cells and sections is ``analysis.tables``'; the shared CLI arguments are ``analysis.cli``'s).

The layout read here is the one the orchestrator writes (its names come from ``sophon_ray.names``, the
one place both sides take them from): a parent run per sweep (tags ``sophon.role=sweep``,
``sophon.sweep_id``) and child runs tagged ``sophon.role`` in {pretrain, protect, attack}. MLflow params are
strings; every table returned here has them converted to int/float.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException

from sophon_ray import names
from sophon_ray.modes import MODES, metric_for
from sophon_ray.recipes import OPTIMIZERS, SETTINGS, STRATEGIES, legacy_defaults
from sophon_ray.recipes import param_casts as recipe_casts
from sophon_ray.errors import SophonError

log = logging.getLogger(__name__)

# A cell is one recipe (everything but the seed) on one grid and restricted domain.
CELL_KEYS = tuple(key for key in SETTINGS if key != "seed")
WHERE = (names.GRID, names.DOMAIN)
# Scratch trains from random init, so the orchestrator runs it once per cell-without-strategy.
SCRATCH_KEYS = tuple(key for key in CELL_KEYS if key != "strategy")
SUBJECTS = ("protected", "normal", "scratch")
# Display order: the recipe table's registration order (the table is torch-free)
STRATEGY_ORDER = tuple(STRATEGIES.names())
OPTIMIZER_ORDER = tuple(OPTIMIZERS.names())


def _int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


_CASTS: dict[str, Callable[[str], object]] = {
    **{name: (_int if cast is int else cast) for name, cast in recipe_casts().items()},
    names.PROTECT_SEED: _int, names.SEARCH_TRIAL: _int, "num_samples": _int, "val_fraction": float}


def param_casts(params: Iterable[str]) -> dict[str, Callable[[str], object]]:
    """Param name -> the cast of its MLflow text (int, float, else str)."""
    return {name: _CASTS.get(name, str) for name in params}


ATTACK_PARAMS = param_casts([*names.TRIAL_PARAMS, *SETTINGS])
# the protect table's score columns, mode-neutral: each mode's metrics (``Metric.protect_metrics``) are read
# into them in this order (original-domain validation / test score, drop, probe score, selection)
PROTECT_COLUMNS = ("original_val", "original_test", "intactness_drop", "probe", "selected_iteration", "rollbacks")
# the selected_reason of a protect run logged before protections logged one: they all chose by the rule that is now
# the default of protect[i].select_tolerance / select_prefer
UNLOGGED_REASON = ("not logged (an older run; its rule: the best original score among probes within 5 points of the "
                   "lowest, i.e. select_tolerance 5, select_prefer original)")


def attack_metrics(metric: names.Metric = names.ACCURACY) -> dict[str, str]:
    """The attack table's metric columns -> the MLflow names of the sweep's metric (accuracy or denoising skill)."""
    return {"final": metric.final, "best": metric.best, "original": metric.original}


ATTACK_METRICS = attack_metrics()


# The mode of a sweep logged before the sophon.mode tag existed (then the only mode).
UNTAGGED_MODE = "classification"


def has_classes(metric: names.Metric) -> bool:
    """Whether ``metric`` has a chance level of 100 / classes, from the mode table (``Mode.has_classes`` of the mode
    that scores with it): accuracy has; denoising skill's do-nothing level is 0."""
    return any(MODES.get(mode).has_classes for mode in MODES.names() if MODES.get(mode).metric == metric)


class RunsLayoutError(SophonError, ValueError):
    """Runs that are there but not in the layout analysis/ reads (a missing or malformed param, no protected run)."""


class RunsNotFoundError(SophonError, LookupError):
    """The tracking store has no experiment, sweep or runs where the analysis looked."""


@dataclass(frozen=True)
class Sweep:
    """Where one sweep lives: its store, experiment and parent run, and its mode (what its scores are)."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    sweep_id: str
    parent_run_id: str
    mode: str = UNTAGGED_MODE

    @property
    def metric(self) -> names.Metric:
        """The sweep's score: accuracy (classification) or denoising skill (generation)."""
        return metric_for(self.mode)


@dataclass(frozen=True)
class PretrainRun:
    """The normal (unprotected) model's original-domain accuracies, percent."""

    run_id: str
    original_val: float
    original_test: float


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _runs(client: MlflowClient, experiment_id: str, filter_string: str, order_by: list[str] | None = None,
          page_size: int = 1000) -> Iterator[Run]:
    """Every active run matching the filter, read a page (one search_runs call) at a time: a caller that keeps only
    what it needs of each run holds one page of MLflow Run objects, not the whole sweep's."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, order_by=order_by,
                                  max_results=page_size, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _search(client: MlflowClient, experiment_id: str, filter_string: str,
            order_by: list[str] | None = None, max_results: int | None = None) -> list[Run]:
    """Every active run matching the filter (at most ``max_results``), as a list (:func:`_runs`)."""
    runs = _runs(client, experiment_id, filter_string, order_by, min(max_results or 1000, 1000))
    return list(runs if max_results is None else islice(runs, max_results))


def _role_filter(role: str, sweep_id: str | None = None) -> str:
    text = f"tags.`{names.ROLE}` = '{role}'"
    return text if sweep_id is None else f"{text} and tags.`{names.SWEEP}` = '{sweep_id}'"


def find_sweep(tracking_uri: str, experiment: str, sweep_id: str | None = None) -> Sweep:
    """Locate a sweep's parent run; ``sweep_id=None`` picks the experiment's newest sweep.

    Raises RunsNotFoundError naming the URI, the experiments or sweep ids that do exist, and the fix.
    """
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known_names = sorted(e.name for e in client.search_experiments(max_results=50))
        raise RunsNotFoundError(
            f"no MLflow experiment named {experiment!r} at {tracking_uri} (experiments there: "
            f"{', '.join(known_names) or 'none'}). Fix: pass --experiment with the sweep spec's `name:`, or point "
            f"--tracking-uri (or MLFLOW_TRACKING_URI) at the store the sweep logged to.")
    parents = _search(client, found.experiment_id, _role_filter("sweep", sweep_id),
                      order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        known = [r.data.tags.get(names.SWEEP, "?")
                 for r in _search(client, found.experiment_id, _role_filter("sweep"), max_results=20)]
        wanted = "any sweep" if sweep_id is None else f"sweep {sweep_id!r}"
        raise RunsNotFoundError(
            f"experiment {experiment!r} at {tracking_uri} has no parent run for {wanted} "
            f"(tags.sophon.role = 'sweep'; sweep ids there: {', '.join(known) or 'none'}). Fix: pass one of "
            f"those to --sweep-id, or run the sweep first (`sophon-ray run SPEC`).")
    parent = parents[0]
    return Sweep(tracking_uri, experiment, found.experiment_id,
                 parent.data.tags.get(names.SWEEP, sweep_id or ""), parent.info.run_id,
                 parent.data.tags.get(names.MODE, UNTAGGED_MODE))


def stage_runs(sweep: Sweep, role: str) -> list[Run]:
    """Every run of the sweep tagged ``sophon.role = role``."""
    return _search(_client(sweep.tracking_uri), sweep.experiment_id, _role_filter(role, sweep.sweep_id))


def typed_params(run: Run, casts: dict[str, Callable[[str], object]],
                  defaults: dict[str, object] | None = None) -> dict[str, object]:
    """The run's params converted with ``casts``, ``defaults`` standing in for params the run lacks; raises
    RunsLayoutError naming the run and the missing or bad param."""
    params = {**{name: str(value) for name, value in (defaults or {}).items()}, **run.data.params}
    missing = [name for name in casts if name not in params]
    if missing:
        raise RunsLayoutError(f"run {run.info.run_id} ({run.data.tags.get(names.ROLE)}) lacks params {missing}; "
                         f"it was not logged in the sweep layout analysis/ reads. Fix: re-log it with the "
                         f"current orchestrator, or delete the run.")
    typed = {}
    for name, cast in casts.items():
        try:
            typed[name] = cast(params[name])
        except ValueError as err:
            raise RunsLayoutError(f"run {run.info.run_id}: param {name}={params[name]!r} is not a "
                             f"{getattr(cast, '__name__', cast).lstrip('_')}") from err
    return typed


def attack_table(runs: Iterable[Run], extra_params: dict[str, Callable[[str], object]] | None = None,
                 extra_metrics: dict[str, str] | None = None, metric: names.Metric = names.ACCURACY) -> pd.DataFrame:
    """One typed row per attack run: run_id, the ATTACK_PARAMS, final, best, original (the sweep's ``metric``:
    accuracy or denoising skill; then ``extra_params`` and ``extra_metrics``: column -> metric name, NaN when not
    logged), then the per-timestep final scores any run logged (:func:`timestep_columns`: generation's
    ``restricted_skill_t<t>``, by timestep). Recipe fields a run logged before they existed get
    ``legacy_defaults()``.

    Runs without ``restricted_acc_final`` (``restricted_skill_final``; failed or still running trials) are left out
    with a warning.
    """
    casts = {**ATTACK_PARAMS, **(extra_params or {})}
    final = metric.final
    metric_names = {**attack_metrics(metric), **(extra_metrics or {})}
    rows, unfinished, logged = [], 0, set()
    for run in runs:
        metrics = run.data.metrics
        if final not in metrics:
            unfinished += 1
            continue
        row = {"run_id": run.info.run_id, **typed_params(run, casts, legacy_defaults())}
        row.update({column: metrics.get(name, math.nan) for column, name in metric_names.items()})
        rows.append((row, metrics))
        logged.update(metrics)
    if unfinished:
        log.warning("left out %d attack run(s) without %s (failed or unfinished)", unfinished, final)
    per_t = timestep_columns(logged, metric)   # a run's latest value: its last epoch's
    rows = [{**row, **{c: metrics.get(c, math.nan) for c in per_t}} for row, metrics in rows]
    table = pd.DataFrame(rows, columns=["run_id", *casts, *metric_names, *per_t])
    return table.sort_values([*WHERE, "subject", "variant", *CELL_KEYS, "seed", names.PROTECT_SEED], ignore_index=True)


def timestep_columns(metric_names: Iterable[str], metric: names.Metric = names.ACCURACY) -> list[str]:
    """The per-timestep restricted scores among ``metric_names`` (generation: ``restricted_skill_t<t>``, logged
    before and after every attack), ordered by timestep; [] for a mode that logs none."""
    pattern = re.compile(rf"^{re.escape(metric.restricted)}_t(\d+)$")
    found = {m.group(0): int(m.group(1)) for m in map(pattern.match, metric_names) if m}
    return sorted(found, key=found.__getitem__)


def on_grids(runs: pd.DataFrame, grids: Sequence[str] = names.CELL_GRIDS) -> pd.DataFrame:
    """The attack runs of ``grids`` (default: the cell grids, development and evaluation; budget, benign and
    search trials are analysed by ``analysis.budget`` and ``analysis.search``)."""
    return runs[runs[names.GRID].isin(grids)].reset_index(drop=True)


def load_attack_runs(sweep: Sweep, grids: Sequence[str], extra_params: dict[str, Callable[[str], object]] | None = None,
                     extra_metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """The sweep's finished attack trials on ``grids`` as ``attack_table`` rows (empty when there are none)."""
    where = _role_filter("attack", sweep.sweep_id)
    if len(grids) == 1:  # MLflow's filter has no "or": several grids are filtered here
        where += f" and params.`{names.GRID}` = '{grids[0]}'"
    runs = _runs(_client(sweep.tracking_uri), sweep.experiment_id, where)  # streamed: one page of Runs at a time
    return on_grids(attack_table(runs, extra_params, extra_metrics, sweep.metric), grids)


def load_runs(tracking_uri: str, experiment: str, sweep_id: str | None = None,
              grids: Sequence[str] = names.CELL_GRIDS) -> pd.DataFrame:
    """Attack trials of one sweep (default: the newest) on ``grids`` (default: the cell grids) as
    ``attack_table`` rows.

    Raises RunsNotFoundError when the experiment, the sweep or its finished attack runs are missing.
    """
    sweep = find_sweep(tracking_uri, experiment, sweep_id)
    table = load_attack_runs(sweep, grids)
    if table.empty:
        raise RunsNotFoundError(
            f"sweep {sweep.sweep_id} in experiment {experiment!r} at {tracking_uri} has no finished attack runs "
            f"on the {', '.join(grids)} grid(s) (tags.sophon.role = 'attack' with metric {sweep.metric.final}). "
            f"Fix: let the attack stage finish (`sophon-ray run SPEC --resume`), or pick another --sweep-id.")
    return table


def _history(metrics: Sequence[Metric]) -> list[float]:
    """Values ordered by step; a step logged twice (a retried trial) keeps its latest value."""
    latest: dict[int, float] = {}
    for metric in sorted(metrics, key=lambda m: (m.step, m.timestamp)):
        latest[metric.step] = metric.value
    return [latest[step] for step in sorted(latest)]


# MLflow's bulk metric-history read (the UI's compare-runs charts use it): at most this many runs per request ...
BULK_RUNS = 100
BULK_POINTS = 25000  # ... and this many points per answer (a full answer may be cut short: read those runs one by one)
BulkReader = Callable[[list[str], str], list[tuple[str, Metric]]]


def _bulk_reader(client: MlflowClient) -> BulkReader | None:
    """(run id, metric) points of many runs in one query: the SQL store's ``get_metric_history_bulk``, or an MLflow
    server's ``GET /ajax-api/2.0/mlflow/metrics/get-history-bulk``; None for any other store."""
    from mlflow.store.tracking.rest_store import RestStore  # noqa: PLC0415
    from mlflow.utils.rest_utils import http_request, verify_rest_response  # noqa: PLC0415

    store = getattr(getattr(client, "_tracking_client", None), "store", None)  # MLflow has no public accessor
    if hasattr(store, "get_metric_history_bulk"):
        return lambda ids, key: [(m.run_id, m) for m in store.get_metric_history_bulk(ids, key, BULK_POINTS)]
    if isinstance(store, RestStore):
        endpoint = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"

        def rest(ids: list[str], key: str) -> list[tuple[str, Metric]]:
            response = http_request(store.get_host_creds(), endpoint, "GET",
                                    params={"run_id": ids, "metric_key": key, "max_results": BULK_POINTS})
            points = verify_rest_response(response, endpoint).json().get("metrics", [])
            return [(p["run_id"], Metric(p["key"], p["value"], p["timestamp"], p["step"])) for p in points]
        return rest
    return None


def load_curves(tracking_uri: str, run_ids: Iterable[str], metric: str = "restricted_acc") -> dict[str, list[float]]:
    """Per run, the metric's values ordered by step (for attacks: epoch 0..E); [] when never logged.

    Read ``BULK_RUNS`` runs per query where the store has a bulk read (SQL stores, MLflow servers), else run by
    run (one query per run)."""
    client = _client(tracking_uri)
    ids = list(run_ids)
    bulk = _bulk_reader(client)
    curves: dict[str, list[float]] = {}
    for i in range(0, len(ids), BULK_RUNS):
        chunk = ids[i:i + BULK_RUNS]
        try:
            points = bulk(chunk, metric) if bulk is not None else None
        except Exception as err:  # noqa: BLE001 - the bulk read is MLflow's internal (UI) API: fall back to the public one
            log.info("bulk metric-history read failed (%r); reading run by run", err)
            bulk, points = None, None
        if points is None or len(points) >= BULK_POINTS:
            curves |= {run_id: _history(client.get_metric_history(run_id, metric)) for run_id in chunk}
            continue
        by_run: dict[str, list[Metric]] = {run_id: [] for run_id in chunk}
        for run_id, point in points:
            by_run[run_id].append(point)
        curves |= {run_id: _history(found) for run_id, found in by_run.items()}
    return curves


def load_protect_runs(tracking_uri: str, experiment: str, sweep_id: str | None = None) -> pd.DataFrame:
    """One row per protect run: run_id, variant, loss, protect_seed, PROTECT_COLUMNS (NaN when not logged) and
    ``selected_reason`` (why the protection returned that state; :data:`UNLOGGED_REASON` for an older run).

    Empty (with those columns) when the sweep protected nothing.
    """
    sweep = find_sweep(tracking_uri, experiment, sweep_id)
    rows = []
    for run in stage_runs(sweep, "protect"):
        params = run.data.params
        row = {"run_id": run.info.run_id, **typed_params(run, {names.VARIANT: str}),
               "loss": params.get("loss", "?"),
               names.PROTECT_SEED: _int(params.get(names.PROTECT_SEED, str(names.NO_PROTECT_SEED)))}
        row.update({column: run.data.metrics.get(name, math.nan)
                    for column, name in zip(PROTECT_COLUMNS, sweep.metric.protect_metrics)})
        row[names.SELECTED_REASON] = run.data.tags.get(names.SELECTED_REASON, UNLOGGED_REASON)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run_id", names.VARIANT, "loss", names.PROTECT_SEED, *PROTECT_COLUMNS,
                                        names.SELECTED_REASON])
    return table.sort_values([names.VARIANT, names.PROTECT_SEED], ignore_index=True)


def load_pretrain_run(tracking_uri: str, experiment: str, sweep_id: str | None = None) -> PretrainRun:
    """The sweep's pretrain run (the newest, if a resumed sweep logged several).

    Raises RunsNotFoundError when the sweep has none.
    """
    sweep = find_sweep(tracking_uri, experiment, sweep_id)
    runs = sorted(stage_runs(sweep, "pretrain"), key=lambda r: r.info.start_time or 0)
    if not runs:
        raise RunsNotFoundError(
            f"sweep {sweep.sweep_id} in experiment {experiment!r} at {tracking_uri} has no pretrain run "
            f"(tags.sophon.role = 'pretrain'). Fix: let the pretrain stage finish, or pick another --sweep-id.")
    metrics, m = runs[-1].data.metrics, sweep.metric
    return PretrainRun(runs[-1].info.run_id, metrics.get(m.key("original_val"), math.nan),
                       metrics.get(m.key("original_test"), math.nan))


def load_spec_dict(sweep: Sweep) -> dict | None:
    """The resolved spec the sweep logged (``spec.yaml`` on its parent run) as plain data; None when absent."""
    client = _client(sweep.tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(sweep.parent_run_id, names.SPEC_ARTIFACT, dst_path=folder)
        except (MlflowException, OSError):
            return None
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return spec if isinstance(spec, dict) else None


def load_chosen_settings(sweep: Sweep) -> dict[str, dict]:
    """Per defended variant (its label): the setting its defender search chose, as the spec fragment the defend run
    logged (``<variant>.yaml``: ``protect: [<setting>]``) holds it; {} when the sweep defended nothing."""
    client, out = _client(sweep.tracking_uri), {}
    for run in stage_runs(sweep, names.DEFEND_ROLE):
        label = run.data.params.get("variant", "")
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(run.info.run_id, f"{label}.yaml", dst_path=folder)
            except (MlflowException, OSError):
                continue
            fragment = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if fragment.get("protect"):
            out[label] = fragment["protect"][0]
    return out


def load_num_classes(sweep: Sweep) -> int | None:
    """The model's class count (chance = 100 / C on the restricted domain): param ``model.num_classes`` or
    ``num_classes`` of the parent or pretrain run, else ``model.num_classes`` in the parent's ``spec.yaml``
    artifact; None when none of them has it (pass --num-classes then), and for a generation sweep (its score,
    denoising skill, has 0 as its do-nothing level)."""
    if not MODES.get(sweep.mode).has_classes:
        return None
    client = _client(sweep.tracking_uri)
    for run in [client.get_run(sweep.parent_run_id), *stage_runs(sweep, "pretrain")]:
        for name in ("model.num_classes", "num_classes"):
            if name in run.data.params:
                return _int(run.data.params[name])
    spec = load_spec_dict(sweep) or {}
    value = (spec.get("model") or {}).get("num_classes")
    return int(value) if value is not None else None
