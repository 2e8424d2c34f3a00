"""Markdown summary of a sweep: intactness, then per (grid, restricted domain) the robustness of each protected
variant, the best attacks found on each subject, label-information leaks, and a per-cell table.

The metrics are ``sophon_ray.core.metrics``' (one definition each, quoted in the README): accuracies are floored at
chance for every comparison, below-chance cells are listed as leaks, overheads use seed-mean curves. This
module only gathers the cells and formats them.

    python -m analysis.summary --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis.curves import mean_curve
from analysis.families import FAMILY, family_order, family_rows
from analysis.cli import parse_source_args, source_parser
from analysis.runs import (CELL_KEYS, OPTIMIZER_ORDER, STRATEGY_ORDER, PretrainRun, find_sweep, has_classes,
                           load_curves, load_num_classes, load_pretrain_run, load_protect_runs, load_runs)
from analysis.tables import cells, in_order, sections, varying
from sophon_ray import names
from sophon_ray.recipes import PLAIN, legacy_defaults
from sophon_ray.errors import cli_exit
from sophon_ray.core.metrics import (BELOW_CHANCE_MARGIN, HOLD_MARGIN, MEANINGFUL_GAP, TARGET_SHARE, Cell, chance,
                                intactness_drop, overhead, summarise)

log = logging.getLogger(__name__)


def number(value: float, spec: str = ".1f") -> str:
    """A float for a table cell; ``n/a`` for NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def setting(value: object) -> str:
    """A cell key's value as text: floats in their shortest form with at most 4 significant digits (0.0001, 0.1,
    0.0005753 for a searched lr), the rest as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A GitHub-flavoured markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


INTACTNESS_COLUMNS = ["variant", "loss", "seeds", "normal_test", "protected_test_mean", "protected_test_min",
                      "protected_test_max", "drop_mean", "drop_worst_seed"]


def intactness_rows(protect: pd.DataFrame, pretrain: PretrainRun) -> pd.DataFrame:
    """Per protected variant: its loss(es), protection seeds, the normal model's and the protected models'
    original-domain test score (mean, min, max over protection seeds) and the drop in points (``intactness_drop``
    of the mean and of the worst seed); INTACTNESS_COLUMNS."""
    rows = []
    for variant, group in protect.groupby(names.VARIANT, sort=True):
        score = group["original_test"]
        rows.append([variant, ", ".join(sorted(set(group["loss"]))), len(group), pretrain.original_test,
                     score.mean(), score.min(), score.max(), intactness_drop(pretrain.original_test, score.mean()),
                     intactness_drop(pretrain.original_test, score.min())])
    return pd.DataFrame(rows, columns=INTACTNESS_COLUMNS)


def intactness_section(protect: pd.DataFrame, pretrain: PretrainRun, metric: names.Metric = names.ACCURACY) -> str:
    """Original-domain test score, normal vs each protected variant (mean and range over protection seeds)."""
    if protect.empty:
        return "No protect runs in this sweep."
    rows = [[r.variant, r.loss, str(r.seeds), number(r.normal_test),
             f"{number(r.protected_test_mean)} ({number(r.protected_test_min)}-{number(r.protected_test_max)})",
             number(r.drop_mean, "+.1f"), number(r.drop_worst_seed, "+.1f")]
            for r in intactness_rows(protect, pretrain).itertuples()]
    return markdown_table(["variant", "loss", "seeds", f"normal test {metric.short}",
                           f"protected test {metric.short} (range)",
                           "drop (points, mean)", "worst seed's drop"], rows, text_columns=2)


def cell_objects(variant_cells: pd.DataFrame, chance_level: float) -> list[Cell]:
    """``sophon_ray.core.metrics.Cell`` per row (seed-mean finals)."""
    return [Cell(r.protected, r.normal, r.scratch, chance_level) for r in variant_cells.itertuples()]


def cell_name(row: pd.Series, keys: Sequence[str]) -> str:
    """Short name of a cell from its varying keys, e.g. ``direct-all, adam, lr 0.01``."""
    named = ("lr", "batch_size", "data_fraction", "epochs", "weight_decay")
    return ", ".join(f"{key} {row[key]:g}" if key in named else str(row[key]) for key in keys)


def _share(share: float, total: int) -> str:
    return "n/a" if math.isnan(share) else f"{round(share * total)}/{total} ({share:.0%})"


def complete_cells(section: pd.DataFrame) -> pd.DataFrame:
    """The cells where protected, normal and scratch were all measured."""
    return section.dropna(subset=["protected", "normal", "scratch"])


def robustness_rows(section: pd.DataFrame, chance_level: float) -> list[tuple[str, dict[str, float], pd.DataFrame]]:
    """(variant, ``summarise`` of its complete cells, those cells) per protected variant of one section."""
    out = []
    for variant, group in section.groupby("variant", sort=True):
        complete = complete_cells(group)
        if not complete.empty:
            out.append((variant, summarise(cell_objects(complete, chance_level)), complete))
    return out


ROBUSTNESS_HEADER = ["cells", f"held (≤ scratch+{HOLD_MARGIN:g})", "normal held", "meaningful cells",
                     "held on meaningful", "median normal − protected (meaningful)", "min normal − protected",
                     "best attack: protected", "best attack: scratch", "best protected − best scratch", "leaks"]


def robustness_table(cells_df: pd.DataFrame, chance_level: float) -> pd.DataFrame:
    """One row per (grid, domain, protected variant) in ``sections`` order: ``summarise`` of its complete cells
    (the numbers of the robustness tables: cells, share_held, normal_share_held, meaningful, ...)."""
    rows = [{names.GRID: grid, names.DOMAIN: domain, "variant": variant, **s}
            for grid, domain, section in sections(cells_df) for variant, s, _ in robustness_rows(section, chance_level)]
    return pd.DataFrame(rows)


def robustness_cells(s: Mapping[str, float]) -> list[str]:
    """One robustness row's values, in ROBUSTNESS_HEADER's order."""
    return [str(s["cells"]), _share(s["share_held"], s["cells"]), _share(s["normal_share_held"], s["cells"]),
            str(s["meaningful"]), _share(s["meaningful_share_held"], s["meaningful"]),
            number(s["meaningful_median_gap"]), number(s["min_gap"], "+.1f"), number(s["worst_case"]),
            number(s["best_scratch"]), number(s["best_vs_scratch"], "+.1f"), str(s["leaks"])]


def robustness_section(section: pd.DataFrame, chance_level: float) -> str:
    """``summarise`` per variant over its complete cells (protected, normal and scratch all present)."""
    rows, notes = [], []
    for variant, group in section.groupby("variant", sort=True):
        missing = len(group) - len(complete_cells(group))
        if missing:
            notes.append(f"{variant}: {missing} cells lack normal or scratch and are left out.")
    for variant, s, _ in robustness_rows(section, chance_level):
        rows.append([variant, *robustness_cells(s)])
    return "\n\n".join([markdown_table(["variant", *ROBUSTNESS_HEADER], rows), *notes])


def best_attacks_section(section: pd.DataFrame, chance_level: float, metric: names.Metric = names.ACCURACY) -> str:
    """The attacker's best recipe (highest seed-mean final accuracy) on each subject, with its cell."""
    keys, _ = varying(section, CELL_KEYS)
    keys = keys or ["strategy", "optimizer", "lr"]
    rows = []
    shared = section.drop_duplicates(subset=list(CELL_KEYS))
    candidates = [(f"protected ({v})", group, "protected") for v, group in section.groupby("variant", sort=True)]
    candidates += [("normal", shared, "normal"), ("scratch", shared, "scratch")]
    for label, frame, column in candidates:
        frame = frame.dropna(subset=[column])
        if frame.empty:
            continue
        top = frame.loc[frame[column].idxmax()]
        recipe = cell_name(top, keys) if column != "scratch" else cell_name(top, [k for k in keys if k != "strategy"])
        rows.append([label, number(max(top[column], chance_level)), recipe])
    return markdown_table(["subject", f"best final {metric.noun} (seed mean)", "its recipe"], rows, text_columns=1)


def leaks_section(section: pd.DataFrame, chance_level: float, metric: names.Metric = names.ACCURACY) -> str:
    """Cells where a protected model ends more than 2 points under chance (label information leaks)."""
    keys, _ = varying(section, CELL_KEYS)
    leaky = section[section["protected"] < chance_level - BELOW_CHANCE_MARGIN]
    if leaky.empty:
        return "None."
    rows = [[r["variant"], cell_name(r, keys or ["strategy"]), number(r["protected"])] for _, r in leaky.iterrows()]
    return markdown_table(["variant", "cell", f"protected {metric.noun}"], rows, text_columns=2)


def _overhead(subject_runs: Sequence[str], scratch_runs: Sequence[str], curves: Mapping[str, Sequence[float]]) -> str:
    """Overhead on seed-mean curves (one definition: ``sophon_ray.core.metrics.overhead``)."""
    subject = mean_curve([curves.get(r, []) for r in subject_runs])
    scratch = mean_curve([curves.get(r, []) for r in scratch_runs])
    return str(overhead(subject, scratch)) if subject and scratch else "n/a"


def cell_section(section: pd.DataFrame, curves: Mapping[str, Sequence[float]], chance_level: float,
                 metric: names.Metric = names.ACCURACY) -> str:
    """One row per (variant, cell): seed-mean final accuracies, held / meaningful, overheads vs scratch."""
    keys, fixed = varying(section, CELL_KEYS)
    fixed = {key: value for key, value in fixed.items() if legacy_defaults().get(key, ...) != value}
    several_variants = section["variant"].nunique() > 1
    order = {"strategy": STRATEGY_ORDER, "optimizer": OPTIMIZER_ORDER}
    ranks = {key: {v: k for k, v in enumerate(in_order(section[key], order.get(key, ())))} for key in keys}
    ordered = section.sort_values(["variant", *keys], key=lambda col: col.map(ranks[col.name])
                                  if col.name in ranks else col)
    rows = []
    for row in ordered.itertuples():
        cell = Cell(row.protected, row.normal, row.scratch, chance_level)
        flags = ("held" if cell.held else "**not held**") + (", meaningful" if cell.meaningful else "") + (
            ", leak" if cell.leak else "")
        rows.append(([row.variant] if several_variants else []) + [setting(getattr(row, key)) for key in keys]
                    + [number(row.protected), number(row.normal), number(row.scratch),
                       number(row.protected_minus_scratch, "+.1f"), flags,
                       _overhead(row.protected_runs, row.scratch_runs, curves),
                       _overhead(row.normal_runs, row.scratch_runs, curves)])
    header = (["variant"] if several_variants else []) + list(keys) + [
        "protected", "normal", "scratch", "protected − scratch", "verdict", "overhead protected", "overhead normal"]
    settings = ", ".join(f"{key} {setting(value)}" for key, value in fixed.items())
    intro = (f"Final restricted-domain {metric.noun} (%, mean over seeds, not floored) per cell"
             + (f"; every cell has {settings}" if settings else "") + ".")
    text_columns = int(several_variants) + sum(key in ("strategy", "optimizer", "schedule") for key in keys)
    return intro + "\n\n" + markdown_table(header, rows, text_columns)


def definitions(chance_level: float, metric: names.Metric = names.ACCURACY) -> str:
    if not has_classes(metric):
        floor = ("Denoising skill = 100 × (1 − MSE) of the predicted noise at the fixed evaluation timesteps: 100 is "
                 "perfect, 0 is predicting zero noise (the refusal the DoS loss teaches). Skill is floored at 0 in "
                 f"every comparison; cells where a protected model ends more than {BELOW_CHANCE_MARGIN:g} points "
                 "under 0 (worse than refusing) are listed below, never credited.")
    else:
        floor = (f"Accuracies are floored at chance ({chance_level:.0f}%) in every comparison; cells where a "
                 f"protected model ends more than {BELOW_CHANCE_MARGIN:g} points under chance are listed as "
                 "label-information leaks, never credited." if chance_level else
                 "The class count is unknown (pass --num-classes), so accuracies are not floored at chance.")
    return (f"A cell is held when protected ≤ scratch + {HOLD_MARGIN:g} ({metric.noun} points); *normal held* is the "
            f"unprotected model's own share (the reference). A cell is meaningful when normal > scratch + "
            f"{MEANINGFUL_GAP:g} (pretraining clearly helps the attacker there). *Best attack* is the attacker's "
            f"best recipe over the whole grid on each subject (final {metric.noun}, seed mean); best protected − best "
            f"scratch > 0 means the best fine-tuning of the protected model beats the best training from scratch. "
            f"{floor}")


FAMILY_MARGIN = 10.0   # points of the scratch-to-normal gap a family must recover beyond plain to be named


def family_part(families: pd.DataFrame | None, grid: str, domain: str) -> list[str]:
    """The defence-aware families' heading and section of one (grid, domain), or nothing when it ran none."""
    if families is None or families.empty:
        return []
    rows = families[(families[names.GRID] == grid) & (families[names.DOMAIN] == domain)]
    return ["### Defence-aware attack families", families_section(rows)] if not rows.empty else []


def families_section(rows: pd.DataFrame) -> str:
    """Markdown for one (grid, domain) section of :func:`family_rows`: per variant and family the best attack on
    each subject (protected: per protection seed, then their mean), the share of the scratch-to-normal gap it
    recovers, and on how many protection seeds the protection held; then, per variant, the families that break
    it (on most of its seeds)."""
    if rows.empty:
        return "No defence-aware attack ran on this grid."
    table, verdicts = [], []
    for variant in in_order(rows["variant"]):
        mine = rows[rows["variant"] == variant]
        not_held, beyond = [], []
        plain = mine[mine[FAMILY] == PLAIN]
        plain_share = plain["recovered"].mean() if len(plain) else math.nan
        for family in family_order(mine[FAMILY]):
            fam = mine[mine[FAMILY] == family].sort_values(names.PROTECT_SEED)
            seeds, held = len(fam), int(fam["held"].sum())
            share = fam["recovered"].mean()
            table.append([variant, family, str(int(fam["cells"].iloc[0])), number(fam["normal"].iloc[0]),
                          number(fam["scratch"].iloc[0]),
                          " / ".join(number(v) for v in fam["protected"]) + f" ({number(fam['protected'].mean())})",
                          " / ".join(_percent(v) for v in fam["recovered"]) + f" ({_percent(share)})",
                          f"{held}/{seeds}"])
            if family == PLAIN:
                continue
            if held * 2 < seeds:
                not_held.append(f"{family} ({_percent(share)})")
            if not math.isnan(share) and (math.isnan(plain_share) or share >= plain_share + FAMILY_MARGIN):
                beyond.append(f"{family} ({_percent(share)})")
        plain_held = len(plain) and plain["held"].sum() * 2 >= len(plain)
        line = (f"- **{variant}**: plain fine-tuning of these recipes "
                + (f"held on {int(plain['held'].sum())}/{len(plain)} protection seeds and recovered "
                   f"{_percent(plain_share)}" if len(plain) else "did not run")
                + f"; not held on most seeds under {', '.join(not_held) or 'no family'}; recovering at least "
                  f"{FAMILY_MARGIN:g} points more of the gap than plain: {', '.join(beyond) or 'no family'}.")
        if plain_held and not_held:
            line += " A protection that holds against the ordinary recipes and not against these is broken."
        verdicts.append(line)
    header = ["variant", "family", "cells", "normal", "scratch", "protected per seed (mean)",
              "recovered per seed (mean)", "held"]
    note = ("Best recipe of each family on each subject (attack-seed means, floored at chance). *recovered* = "
            "(protected − scratch) / (normal − scratch): 0% as hard as scratch, 100% as easy as the unprotected "
            "model, n/a where normal is not above scratch + 1. *held*: protection seeds on which protected ≤ "
            "scratch + 1. Each family is compared with its own cells on normal and scratch; *plain* is ordinary "
            "fine-tuning of the same base recipes.")
    return "\n\n".join([markdown_table(header, table, text_columns=2), note, "\n".join(verdicts)])


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.0f}%"


def grid_note(grid: str) -> str:
    if grid == names.EVALUATION:
        return ("Evaluation grid: attackers fine-tune on their own data pool and are scored on the restricted "
                "test split. Nothing about the protection was chosen by looking at it.")
    return ("Development grid: attackers fine-tune on the protector's restricted share and are scored on "
            "restricted validation data. Protection settings may be tuned here; do not read these as results.")


def make_summary(cells_df: pd.DataFrame, curves: Mapping[str, Sequence[float]], protect_df: pd.DataFrame,
                 pretrain: PretrainRun, num_classes: int | None, title: str, extra_sections: Sequence[str] = (),
                 metric: names.Metric = names.ACCURACY, families: pd.DataFrame | None = None) -> str:
    """The markdown report: intactness, then per (grid, domain): robustness, best attacks, leaks, cells; then
    ``extra_sections`` (markdown: the adaptive attacker, budget and benign sections of ``analysis.search`` and
    ``analysis.budget``).

    ``cells_df`` from ``cells``, ``curves`` run_id -> restricted accuracy per epoch (for overheads),
    ``protect_df`` from ``load_protect_runs``; ``num_classes=None`` leaves accuracies unfloored; ``families`` from
    ``analysis.families.family_rows`` adds the defence-aware families of every section that ran them.
    """
    chance_level = chance(num_classes) if num_classes else 0.0
    leaks = ("Label-information leaks (protected below chance)" if has_classes(metric)
             else "Worse than refusing (protected below zero skill)")
    parts = [f"# {title}", "## Intactness (original domain)", intactness_section(protect_df, pretrain, metric),
             definitions(chance_level, metric)]
    for grid, domain, section in sections(cells_df):
        parts += [f"## {grid.capitalize()} grid, restricted domain `{domain}`", grid_note(grid),
                  "### Robustness per protected variant (seed means)", robustness_section(section, chance_level),
                  "### Best attack found on each subject", best_attacks_section(section, chance_level, metric),
                  *family_part(families, grid, domain),
                  f"### {leaks}", leaks_section(section, chance_level, metric),
                  "### Cells", cell_section(section, curves, chance_level, metric)]
    parts.append(f"Overhead = epochs to reach tau = {TARGET_SHARE:g} × scratch's final {metric.noun}, relative to "
                 f"scratch's, both counted from 1 (on seed-mean curves); `>=x` = never reached within the budget; "
                 f"< 1 = fine-tuning is cheaper than training from scratch.")
    return "\n\n".join([*parts, *extra_sections]) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A plain-text table for a console: columns padded to their widest cell, the first ``text_columns``
    left-aligned and the rest right-aligned, two spaces apart, a dashed line under the header."""
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < text_columns else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


OVERVIEW_HEADER = ["variant", "grid/domain", "drop", "held", "normal held", "meaningful held", "median gap",
                   "best: protected vs scratch"]


def overview(cells_df: pd.DataFrame, protect_df: pd.DataFrame, pretrain: PretrainRun, num_classes: int | None,
             metric: names.Metric = names.ACCURACY) -> str:
    """The console's short summary: one row per protected variant and (grid, domain), with the intactness drop
    (original test accuracy lost, seed mean), cells held next to the normal model's own share, meaningful cells
    held, the median normal - protected gap on meaningful cells and the best attack on the protected model vs
    the best from scratch; then a short legend. Plain ASCII text (no markdown), about 110 columns wide."""
    chance_level = chance(num_classes) if num_classes else 0.0
    drops = {variant: intactness_drop(pretrain.original_test, group["original_test"].mean())
             for variant, group in protect_df.groupby(names.VARIANT, sort=True)} if not protect_df.empty else {}
    rows = []
    for grid, domain, section in sections(cells_df):
        for variant, s, _ in robustness_rows(section, chance_level):
            rows.append([variant, f"{grid}/{domain}", number(drops.get(variant, math.nan), "+.1f"),
                         _share(s["share_held"], s["cells"]), _share(s["normal_share_held"], s["cells"]),
                         _share(s["meaningful_share_held"], s["meaningful"]), number(s["meaningful_median_gap"]),
                         f"{number(s['worst_case'])} vs {number(s['best_scratch'])} "
                         f"({number(s['best_vs_scratch'], '+.1f')})"])
    if not rows:
        return "No cell has protected, normal and scratch all measured, so there is nothing to summarise."
    legend = [f"drop: original-domain test {metric.noun} lost to protection (points); held: cells where protected <= "
              f"scratch + {HOLD_MARGIN:g};",
              f"normal held: the unprotected model's own share; meaningful: normal > scratch + {MEANINGFUL_GAP:g}; "
              f"gap: normal - protected;",
              f"{metric.noun} in %, seed means, " + (
                  "floored at 0 (predicting zero noise)." if not has_classes(metric) else
                  f"floored at chance ({chance_level:.0f}%)." if chance_level else
                  "not floored at chance (class count unknown).")]
    return "\n".join([text_table(OVERVIEW_HEADER, rows, text_columns=2), *legend])


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
                        help="class count for the chance floor (default: model.num_classes of the sweep's logged "
                             "spec)")
    args = parse_source_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def command() -> int:
        sweep = find_sweep(args.tracking_uri, args.experiment, args.sweep_id)
        runs = load_runs(args.tracking_uri, args.experiment, sweep.sweep_id)
        protect = load_protect_runs(args.tracking_uri, args.experiment, sweep.sweep_id)
        pretrain = load_pretrain_run(args.tracking_uri, args.experiment, sweep.sweep_id)
        curves = load_curves(args.tracking_uri, runs["run_id"], sweep.metric.restricted)
        num_classes = args.num_classes or load_num_classes(sweep)
        text = make_summary(cells(runs), curves, protect, pretrain, num_classes,
                            f"{args.experiment}: sweep {sweep.sweep_id}", metric=sweep.metric,
                            families=family_rows(runs, chance(num_classes) if num_classes else 0.0))
        print(write_summary(text, args.out))
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
