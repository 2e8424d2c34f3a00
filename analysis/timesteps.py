"""Generation sweeps: the restricted score after the attack per evaluation timestep (``generation.eval_t``), for
protected, normal and scratch, so a protection that holds only at some timesteps (or an attacker that recovers
only some) shows where. Pure pandas on the attack table (:func:`analysis.runs.attack_table` adds the
``restricted_skill_t<t>`` columns the attack runs logged); only :func:`main` (``python -m analysis.timesteps``, which
writes ``timesteps.md``: after the attack, and before it, from each run's epoch 0) reads MLflow. It needs no protected subject, so it also shows a baselines-only sweep's
precondition per timestep (normal vs scratch), which the full report does not cover.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis.runs import CELL_KEYS, WHERE, Sweep, load_curves, load_runs, timestep_columns
from analysis.summary import markdown_table, number
from analysis.tables import in_order
from sophon_ray import names

STATISTICS = ("mean", "best")   # over the cells of a (grid, domain): the mean of the seed means, and the highest


def _timestep(column: str) -> int:
    return int(re.search(r"_t(\d+)$", column).group(1))


def timestep_rows(runs: pd.DataFrame, metric: names.Metric = names.SKILL) -> pd.DataFrame:
    """Per (grid, domain, subject, statistic): the final restricted score at each evaluation timestep (columns
    ``t<t>``). A subject is ``protected/<variant>``, ``normal`` or ``scratch``; each recipe's seeds are averaged
    first, then ``mean`` averages those cell means and ``best`` takes the highest (the best attack found at that
    timestep); ``cells`` counts the cells. Empty when no run logged per-timestep scores (classification, or a
    sweep from before they were logged)."""
    columns = timestep_columns(runs.columns, metric)
    if runs.empty or not columns:
        return pd.DataFrame()
    runs = runs.assign(subject_label=[f"protected/{v}" if s == "protected" else s
                                      for s, v in zip(runs[names.SUBJECT], runs[names.VARIANT])])
    keys = [*WHERE, "subject_label"]
    cell_means = runs.groupby([*keys, *CELL_KEYS], dropna=False)[columns].mean().reset_index()
    rows = []
    for (grid, domain, subject), group in cell_means.groupby(keys, sort=False):
        for statistic in STATISTICS:
            values = group[columns].mean() if statistic == "mean" else group[columns].max()
            rows.append({names.GRID: grid, names.DOMAIN: domain, names.SUBJECT: subject, "statistic": statistic,
                         "cells": len(group), **{f"t{_timestep(c)}": values[c] for c in columns}})
    table = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(in_order(table[names.SUBJECT], ("normal", "scratch")))}
    table["_order"] = [(0 if s.startswith("protected") else 1, order[s]) for s in table[names.SUBJECT]]
    return table.sort_values([*WHERE, "_order", "statistic"], ignore_index=True).drop(columns="_order")


def before_attack(runs: pd.DataFrame, histories: Mapping[str, Mapping[str, Sequence[float]]]) -> pd.DataFrame:
    """``runs`` with each per-timestep column replaced by its value at epoch 0 (the attacked model as it was, before
    any fine-tuning) from ``histories`` (column -> run id -> values by epoch); NaN where a run has none."""
    return runs.assign(**{column: [h[0] if (h := histories[column].get(run_id)) else float("nan")
                                   for run_id in runs["run_id"]] for column in histories})


def timestep_section(rows: pd.DataFrame, metric: names.Metric = names.SKILL, before: bool = False) -> str:
    """The markdown of :func:`timestep_rows`: per (grid, domain) a table of subjects x timesteps, the mean over
    cells with the best cell in brackets; "" when there is nothing to show. ``before``: the rows hold epoch 0
    (:func:`before_attack`), the models as the attacker got them."""
    if rows.empty:
        return ""
    steps = [c for c in rows.columns if re.fullmatch(r"t\d+", c)]
    when, which = ("before the attack", "Epoch-0") if before else ("after the attack", "Final")
    parts = [f"## Restricted {metric.noun} per evaluation timestep ({when})",
             f"{which} restricted {metric.noun} at each timestep of `generation.eval_t` (the same seeded noise for "
             "every model): the mean over the recipes of each subject's seed means, the best recipe in brackets. "
             "Small t is almost clean images (the official code's t = 1); large t is mostly noise."]
    for (grid, domain), section in rows.groupby(list(WHERE), sort=False):
        table = []
        for subject, both in section.groupby(names.SUBJECT, sort=False):
            mean = both[both["statistic"] == "mean"].iloc[0]
            best = both[both["statistic"] == "best"].iloc[0]
            table.append([subject, str(int(mean["cells"])),
                          *(f"{number(mean[t])} ({number(best[t])})" for t in steps)])
        parts += [f"### {grid.capitalize()} grid, restricted domain `{domain}`",
                  markdown_table(["subject", "cells", *(f"t = {t[1:]}" for t in steps)], table, text_columns=1)]
    return "\n\n".join(parts)


def write_timesteps(sweep: Sweep, out: Path, num_classes: int | None = None) -> list[Path]:  # noqa: ARG001
    """``out/timesteps.md``: :func:`timestep_section` of the sweep's attack runs (an explanatory line when they
    logged no per-timestep scores)."""
    runs = load_runs(sweep.tracking_uri, sweep.experiment, sweep.sweep_id)
    histories = {c: load_curves(sweep.tracking_uri, runs["run_id"], c) for c in timestep_columns(runs.columns,
                                                                                                  sweep.metric)}
    text = "\n\n".join(part for part in (
        timestep_section(timestep_rows(runs, sweep.metric), sweep.metric),
        timestep_section(timestep_rows(before_attack(runs, histories), sweep.metric), sweep.metric, before=True))
        if part) or (f"Sweep {sweep.sweep_id} logged no per-timestep scores (classification, or generation before "
                     "they were logged).")
    path = out / "timesteps.md"
    path.write_text(text + "\n", encoding="utf-8")
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the per-timestep table of one sweep into --out/timesteps.md; returns the exit status."""
    from analysis.cli import part_main  # noqa: PLC0415 - the CLI imports analysis.runs, as this module does

    return part_main(__doc__.splitlines()[0], argv, write_timesteps)


if __name__ == "__main__":
    raise SystemExit(main())
