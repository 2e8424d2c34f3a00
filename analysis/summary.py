"""Markdown summary of a sweep: intactness, robustness per protected variant, and a per-cell table.

The metrics are ``sophon_ray.metrics``' (one definition, quoted in the README); this module only
gathers the cells and formats them.

    python -m analysis.summary --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis.curves import mean_curve
from analysis.runs import (CELL_KEYS, OPTIMIZER_ORDER, STRATEGY_ORDER, PretrainRun, RunsNotFoundError, cells,
                           find_sweep, in_order, load_curves, load_num_classes, load_pretrain_run,
                           load_protect_runs, load_runs, parse_source_args, source_parser, varying)
from sophon_ray.metrics import HOLD_MARGIN, MEANINGFUL_GAP, TARGET_SHARE, Cell, intactness_drop, overhead, summarise

log = logging.getLogger(__name__)


def number(value: float, spec: str = ".1f") -> str:
    """A float for a table cell; ``n/a`` for NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def setting(value: object) -> str:
    """A cell key's value as text: floats in their shortest form (1e-04, 0.1), the rest as they are."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A GitHub-flavoured markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def intactness_section(protect: pd.DataFrame, pretrain: PretrainRun) -> str:
    """(a) Original-domain test accuracy, normal vs each protected variant (seed mean), and the drop."""
    if protect.empty:
        return "No protect runs in this sweep."
    rows = []
    for variant, group in protect.groupby("variant", sort=True):
        protected = group["original_test_acc"].mean()
        rows.append([variant, ", ".join(sorted(set(group["loss"]))), str(len(group)),
                     number(pretrain.original_test_acc), number(protected),
                     number(intactness_drop(pretrain.original_test_acc, protected), "+.1f")])
    return markdown_table(["variant", "loss", "seeds", "normal test acc", "protected test acc", "drop (points)"],
                          rows, text_columns=2)


def cell_objects(variant_cells: pd.DataFrame) -> list[Cell]:
    """``sophon_ray.metrics.Cell`` per row (seed-mean finals)."""
    return [Cell(protected=r.protected, normal=r.normal, scratch=r.scratch) for r in variant_cells.itertuples()]


def cell_name(row: pd.Series, keys: Sequence[str]) -> str:
    """Short name of a cell from its varying keys, e.g. ``direct-all, adam, lr 0.01``."""
    named = ("lr", "batch_size", "data_fraction", "epochs")
    return ", ".join(f"{key} {row[key]:g}" if key in named else str(row[key]) for key in keys)


def _share(share: float, total: int) -> str:
    return "n/a" if math.isnan(share) else f"{round(share * total)}/{total} ({share:.0%})"


def robustness_section(cell_table: pd.DataFrame, num_classes: int | None) -> str:
    """(b) ``summarise`` per variant over its complete cells (protected, normal and scratch all present)."""
    keys, _ = varying(cell_table, CELL_KEYS)
    header = ["variant", "cells", f"held (≤ scratch+{HOLD_MARGIN:g})", "normal held", "meaningful cells",
              "held on meaningful", "median normal − protected (meaningful)", "min normal − protected",
              "worst case (max protected)", "below chance"]
    rows, notes = [], []
    for variant, group in cell_table.groupby("variant", sort=True):
        complete = group.dropna(subset=["protected", "normal", "scratch"])
        if len(complete) < len(group):
            notes.append(f"{variant}: {len(group) - len(complete)} cells lack normal or scratch and are left out.")
        if complete.empty:
            continue
        # below_chance needs the class count; without it the column says so and the count is ignored.
        s = summarise(cell_objects(complete), num_classes=num_classes or 1)
        worst = complete.loc[complete["protected"].idxmax()]
        rows.append([variant, str(s["cells"]), _share(s["share_held"], s["cells"]),
                     _share(s["normal_share_held"], s["cells"]), str(s["meaningful"]),
                     _share(s["meaningful_share_held"], s["meaningful"]), number(s["meaningful_median_gap"]),
                     number(s["min_gap"]), f"{s['worst_case']:.1f} ({cell_name(worst, keys)})",
                     str(s["below_chance"]) if num_classes else "n/a (pass --num-classes)"])
    return "\n\n".join([markdown_table(header, rows), *notes])


def _overhead(subject_runs: Sequence[str], scratch_runs: Sequence[str], curves: Mapping[str, Sequence[float]]) -> str:
    subject = mean_curve([curves.get(r, []) for r in subject_runs])
    scratch = mean_curve([curves.get(r, []) for r in scratch_runs])
    return str(overhead(subject, scratch)) if subject and scratch else "n/a"


def cell_section(cell_table: pd.DataFrame, curves: Mapping[str, Sequence[float]]) -> str:
    """(c) One row per (variant, cell): seed-mean final accuracies and overheads vs scratch."""
    keys, fixed = varying(cell_table, CELL_KEYS)
    several_variants = cell_table["variant"].nunique() > 1
    order = {"strategy": STRATEGY_ORDER, "optimizer": OPTIMIZER_ORDER}
    ranks = {key: {v: k for k, v in enumerate(in_order(cell_table[key], order.get(key, ())))} for key in keys}
    ordered = cell_table.sort_values(["variant", *keys], key=lambda col: col.map(ranks[col.name])
                                     if col.name in ranks else col)
    rows = []
    for row in ordered.itertuples():
        rows.append(([row.variant] if several_variants else []) + [setting(getattr(row, key)) for key in keys]
                    + [number(row.protected), number(row.normal), number(row.scratch),
                       number(row.protected_minus_scratch, "+.1f"),
                       _overhead(row.protected_runs, row.scratch_runs, curves),
                       _overhead(row.normal_runs, row.scratch_runs, curves)])
    header = (["variant"] if several_variants else []) + list(keys) + [
        "protected", "normal", "scratch", "protected − scratch", "overhead protected", "overhead normal"]
    settings = ", ".join(f"{key} {setting(value)}" for key, value in fixed.items())
    intro = (f"Final restricted-domain accuracy (%, mean over seeds) per cell"
             + (f"; every cell has {settings}" if settings else "") + ".")
    text_columns = int(several_variants) + sum(key in ("strategy", "optimizer") for key in keys)  # keys lead
    return intro + "\n\n" + markdown_table(header, rows, text_columns)


def make_summary(cells_df: pd.DataFrame, curves: Mapping[str, Sequence[float]], protect_df: pd.DataFrame,
                 pretrain: PretrainRun, num_classes: int | None, title: str) -> str:
    """The markdown report: (a) intactness, (b) robustness per variant, (c) the per-cell table.

    ``cells_df`` from ``cells``, ``curves`` run_id -> restricted accuracy per epoch (for overheads),
    ``protect_df`` from ``load_protect_runs``; ``num_classes=None`` leaves below-chance counts out.
    """
    return "\n\n".join([
        f"# {title}",
        "## Intactness (original domain)",
        intactness_section(protect_df, pretrain),
        "## Robustness per protected variant",
        f"A cell is held when protected ≤ scratch + {HOLD_MARGIN:g} (accuracy points); *normal held* is the "
        f"unprotected model's own share (the reference). A cell is meaningful when normal > scratch + "
        f"{MEANINGFUL_GAP:g} (pretraining clearly helps the attacker there). Accuracies are final "
        f"restricted-domain accuracies, %.",
        robustness_section(cells_df, num_classes),
        "## Cells",
        cell_section(cells_df, curves),
        f"Overhead = epochs to reach tau = {TARGET_SHARE:g} × scratch's final accuracy, relative to scratch's "
        f"(on seed-mean curves); `>=x` = never reached within the budget; < 1 = fine-tuning is cheaper than "
        f"training from scratch.",
    ]) + "\n"


def write_summary(text: str, out_dir: str | Path) -> Path:
    """Write ``summary.md`` into out_dir (created if missing) and return its path."""
    path = Path(out_dir) / "summary.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log.info("wrote %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write ``summary.md`` of one sweep into --out; returns the exit status."""
    parser = source_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count for below-chance counts (default: model.num_classes of the "
                             "sweep's logged spec)")
    args = parse_source_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sweep = find_sweep(args.tracking_uri, args.experiment, args.sweep_id)
        runs = load_runs(args.tracking_uri, args.experiment, sweep.sweep_id)
        cell_table = cells(runs)
        protect = load_protect_runs(args.tracking_uri, args.experiment, sweep.sweep_id)
        pretrain = load_pretrain_run(args.tracking_uri, args.experiment, sweep.sweep_id)
    except (RunsNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    curves = load_curves(args.tracking_uri, runs["run_id"])
    text = make_summary(cell_table, curves, protect, pretrain, args.num_classes or load_num_classes(sweep),
                        f"{args.experiment}: sweep {sweep.sweep_id}")
    print(write_summary(text, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
