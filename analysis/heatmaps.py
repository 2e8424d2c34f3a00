"""Robustness heatmaps: final restricted accuracy over optimizer x lr (per strategy, at the grid's base recipe)
and <setting> x lr for every setting the grid varies around it (batch size, data fraction, epochs, ...).

Each figure puts, side by side, every protected variant, normal and scratch on one fixed 0-100 scale
(dark = the attacker got little, bright = the attacker won), then protected - scratch on a diverging
scale centred at 0 (red = fine-tuning the protected model beat training from scratch: protection failed).

    python -m analysis.heatmaps --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from analysis.cli import parse_source_args, source_parser
from analysis.runs import CELL_KEYS, OPTIMIZER_ORDER, STRATEGY_ORDER, WHERE, find_sweep, load_runs
from analysis.tables import SECONDARY, axis_slice, base_slice, cells, in_order, sections, varying
from sophon_ray import names
from sophon_ray.errors import cli_exit

log = logging.getLogger(__name__)

ACCURACY_CMAP = "inferno"     # sequential: dark = low accuracy (calm), bright = high (alarming)
GAP_CMAP = "RdBu_r"           # diverging: red = protected above scratch, blue = below
ACCURACY_NORM = Normalize(vmin=0.0, vmax=100.0)
DPI = 130


@dataclass(frozen=True)
class Panel:
    """One heatmap: a title, a rows x columns table of values, and whether it is an accuracy or a gap."""

    title: str
    table: pd.DataFrame
    gap: bool = False


def grid(frame: pd.DataFrame, value: str, rows: str, row_order: Sequence = ()) -> pd.DataFrame:
    """Mean of ``value`` over everything but ``rows`` x lr, rows ordered by ``row_order``, lr ascending."""
    table = frame.pivot_table(index=rows, columns="lr", values=value, aggfunc="mean")
    return table.reindex(index=in_order(frame[rows], row_order), columns=sorted(frame["lr"].unique()))


def panels(cell_table: pd.DataFrame, rows: str, row_order: Sequence = ()) -> list[Panel]:
    """Accuracy panels (each protected variant, normal, scratch), then one protected - scratch per variant."""
    variants = in_order(cell_table["variant"])
    shared = cell_table.drop_duplicates(subset=[*WHERE, *CELL_KEYS])  # normal/scratch repeat once per variant
    by_variant = {v: cell_table[cell_table["variant"] == v] for v in variants}
    accuracy = [Panel(f"protected ({v})", grid(by_variant[v], "protected", rows, row_order)) for v in variants]
    accuracy += [Panel(subject, grid(shared, subject, rows, row_order)) for subject in ("normal", "scratch")]
    gaps = [Panel(f"{v} − scratch" if len(variants) > 1 else f"protected ({v}) − scratch",
                  grid(by_variant[v], "protected_minus_scratch", rows, row_order), gap=True) for v in variants]
    return accuracy + gaps


def _limit(values: np.ndarray) -> float:
    """The largest value (at least 10), rounded up to a multiple of 10."""
    largest = float(np.max(values, initial=0.0))
    return max(10.0, 10.0 * math.ceil(largest / 10.0))


def gap_norm(tables: Sequence[pd.DataFrame]) -> Normalize:
    """Centred at 0, each side scaled to its own extreme (at least 10 points), so that a few positive cells
    (protection failed) show red even when the negative side spans 50 points."""
    values = np.concatenate([t.to_numpy(float).ravel() for t in tables])
    values = values[~np.isnan(values)]
    return TwoSlopeNorm(vcenter=0.0, vmin=-_limit(-values), vmax=_limit(values))


def _text_colour(rgba: Sequence[float]) -> str:
    luminance = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def draw(ax: Axes, panel: Panel, norm: Normalize, row_label: str, show_rows: bool) -> AxesImage:
    """Draw one annotated heatmap on ``ax`` and return the image (for the colour bar)."""
    cmap = matplotlib.colormaps[GAP_CMAP if panel.gap else ACCURACY_CMAP].with_extremes(bad="#d9d9d9")
    values = panel.table.to_numpy(float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        text = "n/a" if math.isnan(value) else (f"{value:+.1f}" if panel.gap else f"{value:.1f}")
        colour = "black" if math.isnan(value) else _text_colour(cmap(norm(value)))
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(values.shape[1]), labels=[f"{lr:g}" for lr in panel.table.columns])
    ax.set_xlabel("learning rate")
    if show_rows:  # the y axis is shared: label it once, hide the labels elsewhere without clearing them
        ax.set_yticks(range(values.shape[0]), labels=[str(r) for r in panel.table.index])
        ax.set_ylabel(row_label)
    else:
        ax.tick_params(labelleft=False)
    ax.set_title(panel.title, fontsize=10)
    return image


def describe(frame: pd.DataFrame, averaged: Sequence[str]) -> str:
    """What the values are averaged over and which settings are fixed, for a figure subtitle."""
    several, fixed = varying(frame, averaged)
    parts = ["mean over seeds"] + [f"mean over {key}" for key in several]
    parts += [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}" for key, value in fixed.items()]
    return "; ".join(parts)


def figure(all_panels: Sequence[Panel], title: str, subtitle: str, row_label: str,
           metric: names.Metric = names.ACCURACY) -> Figure:
    """Accuracy panels (shared 0-100 colour bar) left, gap panels (shared diverging colour bar) right."""
    accuracy = [p for p in all_panels if not p.gap]
    gaps = [p for p in all_panels if p.gap]
    rows, cols = accuracy[0].table.shape
    width, height = max(2.4, 0.8 * cols + 0.9), max(2.2, 0.45 * rows + 1.3)
    fig = Figure(figsize=(width * len(all_panels) + 2.6, height + 0.9), layout="constrained", dpi=DPI)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    left, right = fig.subfigures(1, 2, width_ratios=[len(accuracy) + 0.35, len(gaps) + 0.45], wspace=0.02)
    for subfig, group, norm, heading, label in (
            (left, accuracy, ACCURACY_NORM, f"final {metric.noun} (dark = attack failed, bright = attack succeeded)",
             metric.axis),
            (right, gaps, gap_norm([p.table for p in gaps]),
             "red = protection failed (protected > scratch)", "points")):
        subfig.suptitle(heading, fontsize=9, color="#444444")
        axes = np.atleast_1d(subfig.subplots(1, len(group), sharey=True))
        images = [draw(ax, panel, norm, row_label, show_rows=(k == 0))
                  for k, (ax, panel) in enumerate(zip(axes, group))]
        bar = subfig.colorbar(images[-1], ax=list(axes), label=label, shrink=0.9)
        if isinstance(norm, TwoSlopeNorm):  # its default ticks can leave the short side unlabelled
            bar.set_ticks(sorted({*np.linspace(norm.vmin, 0.0, 3), *np.linspace(0.0, norm.vmax, 3)}))
    return fig


# Characters an inch of DejaVu Sans (matplotlib's default face), measured with one to spare: 11 pt sets about 13,
# 9 pt about 15.5. Titles and legends are laid out with these so that a narrow (one-panel) figure keeps them inside.
TITLE_CHARS_PER_INCH = 12.0
LEGEND_INCH_PER_CHAR = 0.07
LEGEND_HANDLE_INCH = 0.7


def fit_title(text: str, width_in: float) -> str:
    """``text`` with every line wrapped to the width of a ``width_in``-inch figure at the 11 pt title size."""
    chars = max(20, int(width_in * TITLE_CHARS_PER_INCH))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def legend_columns(labels: Sequence[str], width_in: float) -> int:
    """How many legend entries (9 pt) fit side by side in a ``width_in``-inch figure: at least 1."""
    widest = max(LEGEND_HANDLE_INCH + LEGEND_INCH_PER_CHAR * len(label) for label in labels)
    return max(1, min(len(labels), int(width_in // widest)))


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG (no pyplot: nothing global to close) and return the path."""
    fig.savefig(path)
    log.info("wrote %s", path)
    return path


def make_heatmaps(cells_df: pd.DataFrame, out_dir: str | Path, title_prefix: str, prefix: str = "",
                  metric: names.Metric = names.ACCURACY) -> list[Path]:
    """Write ``<prefix>heatmap-<strategy>.png`` (optimizer x lr at the base recipe) per strategy and
    ``<prefix>heatmap-<setting>.png`` (setting x lr) per secondary setting the grid varies.

    ``cells_df`` is one (grid, domain) section of ``analysis.runs.cells``; returns the PNG paths. Raises
    ValueError when empty.
    """
    if cells_df.empty:
        raise ValueError("no cells to plot: the cells table is empty (did the sweep attack a protected model?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    what = f"restricted-domain {metric.axis} after fine-tuning"
    base = base_slice(cells_df)
    for strategy in in_order(base["strategy"], STRATEGY_ORDER):
        frame = base[base["strategy"] == strategy]
        subtitle = describe(frame, list(SECONDARY))
        fig = figure(panels(frame, "optimizer", OPTIMIZER_ORDER), f"{title_prefix} — {strategy}: {what}",
                     subtitle, "optimizer", metric)
        paths.append(save(fig, out / f"{prefix}heatmap-{strategy}.png"))
    for axis in SECONDARY:
        frame = axis_slice(cells_df, axis)
        if frame.empty or frame[axis].nunique() < 2:
            continue
        label = axis.replace("_", " ")
        subtitle = describe(frame, ["strategy", "optimizer", *(k for k in SECONDARY if k != axis)])
        fig = figure(panels(frame, axis), f"{title_prefix} — by {label}: {what}", subtitle, label, metric)
        paths.append(save(fig, out / f"{prefix}heatmap-{axis}.png"))
    return paths


def section_prefix(grid: str, domain: str, several: bool) -> str:
    """File-name prefix of a (grid, domain) section: none when the sweep has only one section."""
    return f"{grid}-{domain}-" if several else ""


def make_all_heatmaps(cell_table: pd.DataFrame, out_dir: str | Path, title: str,
                      metric: names.Metric = names.ACCURACY) -> list[Path]:
    """Heatmaps of every (grid, domain) section of the cells table."""
    parts = sections(cell_table)
    return [path for grid, domain, frame in parts
            for path in make_heatmaps(frame, out_dir, f"{title} [{grid}, {domain}]" if len(parts) > 1 else title,
                                      section_prefix(grid, domain, len(parts) > 1), metric)]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the heatmaps of one sweep into --out; returns the exit status."""
    args = parse_source_args(source_parser(__doc__.splitlines()[0]), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def command() -> int:
        sweep = find_sweep(args.tracking_uri, args.experiment, args.sweep_id)
        cell_table = cells(load_runs(args.tracking_uri, args.experiment, sweep.sweep_id))
        for path in make_all_heatmaps(cell_table, args.out, args.experiment, sweep.metric):
            print(path)
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
