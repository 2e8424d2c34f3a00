"""What a sweep's report holds, in one place: everything read from MLflow once (:class:`SweepData`), the list of
its figures (:data:`FIGURES`) and the list of its tables (:data:`TABLES`, written as CSV).

``analysis.report`` makes every entry of both lists, ``analysis.html`` lays the page out from FIGURES (section
titles, order, and the file patterns it finds them by in a report folder), and the upload to the sweep's parent
run logs what they produced. Adding a figure to the report is one :class:`Figure` entry here plus its drawing
function; adding a table is one :class:`Table` entry plus the function that computes its DataFrame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.budget import GridRuns, benign_rows, budget_rows, load_grid, make_budget_figures
from analysis.curves import make_curves
from analysis.defend import Defends, defend_table, load_defends, make_defend_figures
from analysis.families import family_rows
from analysis.heatmaps import make_all_heatmaps
from analysis.runs import (PretrainRun, Sweep, find_sweep, load_curves, load_num_classes, load_pretrain_run,
                           load_protect_runs, load_runs)
from analysis.search import Searches, final_found, load_searches, make_search_figures, picks, worst_case_gap
from analysis.summary import intactness_rows, robustness_table
from analysis.tables import cells
from analysis.timesteps import timestep_rows
from sophon_ray import names
from sophon_ray.core.metrics import chance

log = logging.getLogger(__name__)

TABLES_DIR = "tables"   # the CSVs go to <report folder>/tables/<name>.csv (and report/tables/ on the parent run)


@dataclass(frozen=True)
class SweepData:
    """Everything a report reads from one sweep, read once (so every part shows the same sweep): the attack trials
    on the cell grids, their cells and curves, the protect and pretrain runs, the class count (None: unknown, or
    a mode without classes), the searches and the budget and benign grids."""

    sweep: Sweep
    runs: pd.DataFrame
    cells: pd.DataFrame
    curves: dict[str, list[float]]
    protect: pd.DataFrame
    pretrain: PretrainRun
    num_classes: int | None
    searches: Searches
    budget: GridRuns
    benign: GridRuns
    defends: Defends

    @property
    def metric(self) -> names.Metric:
        return self.sweep.metric

    @property
    def title(self) -> str:
        return f"{self.sweep.experiment} (sweep {self.sweep.sweep_id})"

    @property
    def chance_level(self) -> float:
        """The floor of every comparison: 100 / classes, 0 when the class count is unknown or the score has none."""
        return chance(self.num_classes) if self.num_classes else 0.0


def load_sweep_data(tracking_uri: str, experiment: str, sweep_id: str | None = None,
                    num_classes: int | None = None) -> SweepData:
    """Read one sweep (default: the newest). ``num_classes=None`` reads model.num_classes of the sweep
    (``load_num_classes``). Raises RunsNotFoundError when the experiment, sweep or its runs are missing."""
    sweep = find_sweep(tracking_uri, experiment, sweep_id)
    runs = load_runs(tracking_uri, experiment, sweep.sweep_id)
    return SweepData(sweep, runs, cells(runs), load_curves(tracking_uri, runs["run_id"], sweep.metric.restricted),
                     load_protect_runs(tracking_uri, experiment, sweep.sweep_id),
                     load_pretrain_run(tracking_uri, experiment, sweep.sweep_id),
                     num_classes or load_num_classes(sweep), load_searches(sweep), load_grid(sweep, names.BUDGET),
                     load_grid(sweep, names.BENIGN), load_defends(sweep))


@dataclass(frozen=True)
class Figure:
    """One kind of report figure: ``name`` (the key of what it produced, e.g. ``ReportResult.heatmaps``), the
    HTML page's ``section`` title, the file ``patterns`` its PNGs have in a report folder, and ``make(data,
    out_dir) -> PNG paths`` ([] when the sweep has nothing for it)."""

    name: str
    section: str
    patterns: tuple[str, ...]
    make: Callable[[SweepData, Path], list[Path]]

    def find(self, folder: Path) -> list[Path]:
        """This figure's PNGs in a report folder (by ``patterns``, sorted within each)."""
        return [path for pattern in self.patterns for path in sorted(Path(folder).glob(pattern))]


# The report's figures, in the page's order.
FIGURES: tuple[Figure, ...] = (
    Figure("heatmaps", "Heatmaps", ("*heatmap-*.png",),
           lambda d, out: make_all_heatmaps(d.cells, out, d.title, d.metric)),
    Figure("curves", "Fine-tuning curves", ("*curves-*.png",),
           lambda d, out: make_curves(d.runs, d.curves, out, d.title, d.metric)),
    Figure("search", "Adaptive attacker: figures", ("search-found-*.png", "search-explored-*.png"),
           lambda d, out: make_search_figures(d.searches, out, d.title, d.chance_level, d.metric)),
    Figure("budget", "Budget: figures", ("budget-*.png",),
           lambda d, out: make_budget_figures(d.budget, out, d.title, d.chance_level, d.metric)),
    Figure("defend", "Defender search: figures", ("defend-pareto-*.png", "defend-found-*.png"),
           lambda d, out: make_defend_figures(d.defends, out, d.title)),
)


def make_figures(data: SweepData, out_dir: str | Path) -> dict[str, list[Path]]:
    """Every FIGURES entry drawn into ``out_dir``: name -> its PNG paths."""
    return {figure.name: figure.make(data, Path(out_dir)) for figure in FIGURES}


def flat(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as CSV can hold it: run-id tuples joined with ``;``, columns of lists or dicts (curves) left out."""
    out = frame.copy()
    for column in frame.columns:
        values = [v for v in frame[column] if isinstance(v, (tuple, list, dict))]
        if not values:
            continue
        if all(isinstance(v, tuple) and all(isinstance(x, str) for x in v) for v in values):
            out[column] = [";".join(v) if isinstance(v, tuple) else v for v in frame[column]]
        else:
            out = out.drop(columns=column)
    return out


def _search_found(data: SweepData) -> pd.DataFrame:
    return worst_case_gap(final_found(data.searches.runs), data.chance_level) if not data.searches.runs.empty \
        else pd.DataFrame()


def _budget(data: SweepData) -> pd.DataFrame:
    has_protected = not data.budget.empty and (data.budget.runs[names.SUBJECT] == "protected").any()
    return budget_rows(data.budget) if has_protected else pd.DataFrame()


def _benign(data: SweepData) -> pd.DataFrame:
    has_protected = not data.benign.empty and (data.benign.runs[names.SUBJECT] == "protected").any()
    return benign_rows(data.benign) if has_protected else pd.DataFrame()


@dataclass(frozen=True)
class Table:
    """One report table, written as ``tables/<name>.csv``: ``make(data)`` computes it (empty: not written)."""

    name: str
    doc: str
    make: Callable[[SweepData], pd.DataFrame]


# The report's tables (the numbers summary.md shows, unrounded), in the order they are written.
TABLES: tuple[Table, ...] = (
    Table("intactness", "per protected variant: original-domain test score of normal and protected, and the drop",
          lambda d: intactness_rows(d.protect, d.pretrain)),
    Table("protect", "one row per protect run (variant, protection seed): its original-domain scores and selection",
          lambda d: d.protect),
    Table("robustness", "per (grid, domain, protected variant): the robustness summary of its complete cells",
          lambda d: robustness_table(d.cells, d.chance_level)),
    Table("cells", "per (grid, domain, variant, recipe): seed-mean final score of protected, normal and scratch",
          lambda d: d.cells),
    Table("families", "per (grid, domain, variant, protection seed, defence-aware family): best attack on each "
          "subject, share of the scratch-to-normal gap recovered, held", lambda d: family_rows(d.runs, d.chance_level)),
    Table("search", "per (search, domain, variant): the best found after all trials and the worst-case gaps",
          _search_found),
    Table("search_picks", "per search run: the attacker's final pick (its trial, validation and test score)",
          lambda d: picks(d.searches.trials) if not d.searches.trials.empty else pd.DataFrame()),
    Table("budget", "per (domain, variant, budget cell): scores at epoch 10 and last, break-even epochs, verdict",
          _budget),
    Table("benign", "per (benign domain, variant, cell): protected, normal and scratch final score", _benign),
    Table("defend", "per defender candidate: its searched settings, development worst case, drop, objective, "
          "feasible, chosen", lambda d: _defend(d.defends)),
    Table("timesteps", "generation: per (grid, domain, subject): the final restricted score at each evaluation "
          "timestep, mean over recipes and best recipe", lambda d: timestep_rows(d.runs, d.metric)),
)


def _defend(defends: Defends) -> pd.DataFrame:
    if defends.empty or defends.candidates.empty:
        return pd.DataFrame()
    return pd.concat([defend_table(v, defends.candidates).assign(variant=v["variant"])
                      for _, v in defends.variants.iterrows()], ignore_index=True)


def write_tables(data: SweepData, out_dir: str | Path) -> dict[str, Path]:
    """Every non-empty TABLES entry as ``<out_dir>/tables/<name>.csv`` (``flat``; NaN as an empty field): name ->
    path."""
    folder = Path(out_dir) / TABLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for table in TABLES:
        frame = table.make(data)
        if frame.empty:
            continue
        path = folder / f"{table.name}.csv"
        flat(frame).to_csv(path, index=False, float_format=None, na_rep="")
        written[table.name] = path
    log.info("wrote %d tables to %s", len(written), folder)
    return written

