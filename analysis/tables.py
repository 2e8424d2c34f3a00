"""Shape a sweep's attack table into what the report shows: cells (seed means of protected, normal and scratch per
recipe), the settings that vary, the (grid, domain) sections and the base-recipe slices the figures draw.

Pure pandas on the tables ``analysis.runs`` reads; nothing here talks to MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from analysis.runs import CELL_KEYS, SCRATCH_KEYS, SUBJECTS, WHERE, RunsLayoutError, on_grids
from sophon_ray import names


def in_order(values: Iterable, order: Sequence = ()) -> list:
    """Distinct values, those named in ``order`` first (in that order), the rest sorted after."""
    distinct = set(values)
    return [v for v in order if v in distinct] + sorted(v for v in distinct if v not in order)



def _seed_mean(runs: pd.DataFrame, keys: list[str], subject: str) -> pd.DataFrame:
    """Seed-mean final/best accuracy per key, with the run ids averaged (columns prefixed by subject)."""
    grouped = runs.groupby(keys, sort=False).agg(
        final=("final", "mean"), best=("best", "mean"), runs=("run_id", lambda ids: tuple(ids)),
        seeds=("run_id", "size"))
    grouped.columns = [subject, f"{subject}_best", f"{subject}_runs", f"{subject}_seeds"]
    return grouped.reset_index()


def cells(runs: pd.DataFrame, grids: Sequence[str] = names.CELL_GRIDS) -> pd.DataFrame:
    """One row per (grid, domain, variant, cell): seed-mean final accuracy of protected, normal and scratch.

    A cell is CELL_KEYS on one of ``grids`` (default: development / evaluation; runs of other grids are left
    out) and one restricted (or benign) domain; seeds (attack and
    protection) are averaged. Normal joins on the cell, scratch on SCRATCH_KEYS (it ran once, logged as
    direct-all, for every strategy). Columns: grid, domain, variant, CELL_KEYS, then per subject
    ``<subject>``, ``<subject>_best``, ``<subject>_runs`` (run ids), ``<subject>_seeds``, and
    ``protected_minus_scratch``. Subjects a cell lacks are NaN (runs: ()).

    Raises RunsLayoutError when there are no protected runs to compare.
    """
    runs = on_grids(runs, grids)
    protected = runs[runs["subject"] == "protected"]
    if protected.empty:
        raise RunsLayoutError("no attack runs with subject=protected, so there is nothing to compare; "
                         "Fix: include 'protected' in the spec's attack.subjects.")
    cell, scratch_cell = [*WHERE, *CELL_KEYS], [*WHERE, *SCRATCH_KEYS]
    table = _seed_mean(protected, [*WHERE, "variant", *CELL_KEYS], "protected")
    table = table.merge(_seed_mean(runs[runs["subject"] == "normal"], cell, "normal"), on=cell, how="left")
    table = table.merge(_seed_mean(runs[runs["subject"] == "scratch"], scratch_cell, "scratch"), on=scratch_cell,
                        how="left")
    for subject in SUBJECTS:
        table[f"{subject}_runs"] = [ids if isinstance(ids, tuple) else () for ids in table[f"{subject}_runs"]]
        table[f"{subject}_seeds"] = table[f"{subject}_seeds"].fillna(0).astype(int)
    table["protected_minus_scratch"] = table["protected"] - table["scratch"]
    return table.sort_values([*WHERE, "variant", *CELL_KEYS], ignore_index=True)


def varying(table: pd.DataFrame, keys: Sequence[str]) -> tuple[list[str], dict[str, object]]:
    """Split ``keys`` into those with several values in ``table`` and those fixed (with their one value)."""
    several = [key for key in keys if table[key].nunique() > 1]
    fixed = {key: table[key].iloc[0] for key in keys if key not in several and not table.empty}
    return several, fixed



def sections(cell_table: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The cell table split by (grid, domain), evaluation first: a report never averages across either."""
    order = {names.EVALUATION: 0, names.DEVELOPMENT: 1}
    keys = sorted(cell_table.groupby(list(WHERE)).groups, key=lambda k: (order.get(k[0], 2), k[1]))
    return [(grid, domain, cell_table[(cell_table[names.GRID] == grid) & (cell_table[names.DOMAIN] == domain)])
            for grid, domain in keys]


# Settings beside (strategy, optimizer, lr): an evaluation grid is often a union of sub-grids that vary one of
# these around a base recipe, so figures show the base recipe and one figure per varied setting.
SECONDARY = ("batch_size", "data_fraction", "schedule", "epochs", "weight_decay")


def base_setting(table: pd.DataFrame) -> dict[str, object]:
    """The most common value (ties: the smallest) of every setting beside (strategy, optimizer, lr): the grid's
    base recipe (so a sub-grid that moves another setting, a defence-aware family say, stays out of the base
    figures)."""
    keys = [key for key in CELL_KEYS if key not in ("strategy", "optimizer", "lr") and key in table]
    return {key: sorted(table[key].value_counts().loc[lambda c: c == c.max()].index)[0] for key in keys}


def base_slice(table: pd.DataFrame, free: str | None = None) -> pd.DataFrame:
    """Rows whose settings beside (strategy, optimizer, lr), all but ``free``, are the base recipe's."""
    base = base_setting(table)
    keep = pd.Series(True, index=table.index)
    for key, value in base.items():
        if key != free:
            keep &= table[key] == value
    return table[keep]


def axis_slice(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Rows that vary ``axis`` around the base recipe: the base slice with ``axis`` free, restricted to the
    (strategy, optimizer) pairs that were run with more than one value of it (so every value of the axis
    averages over the same recipes)."""
    rows = base_slice(table, free=axis)
    pairs = rows.groupby(["strategy", "optimizer"])[axis].nunique()
    several = set(pairs[pairs > 1].index)
    return rows[[pair in several for pair in zip(rows["strategy"], rows["optimizer"])]]
