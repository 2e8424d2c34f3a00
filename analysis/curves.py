"""Fine-tuning curves: restricted-domain accuracy vs epoch, protected (each variant) vs normal vs scratch.

One figure per strategy, one panel per optimizer; colour = subject, line style = learning rate; each line
is the mean over seeds (and over any other varying setting, named in the subtitle). Scratch is the same
in every strategy's figure: it trains from random init, so it ran once per cell-without-strategy.

    python -m analysis.curves --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.heatmaps import DPI, describe, fit_title, legend_columns, section_prefix, save
from analysis.cli import parse_source_args, source_parser
from analysis.runs import OPTIMIZER_ORDER, STRATEGY_ORDER, WHERE, find_sweep, load_curves, load_runs
from analysis.tables import SECONDARY, base_slice, in_order
from sophon_ray import names
from sophon_ray.errors import cli_exit

log = logging.getLogger(__name__)

PROTECTED_COLOURS = ("#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
NORMAL_COLOUR = "#1f77b4"
SCRATCH_COLOUR = "#555555"
LR_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
LR_MARKERS = ("o", "s", "^", "D", "v")


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Epoch-wise mean of curves, ignoring missing epochs of shorter curves; [] when all are empty."""
    length = max((len(c) for c in curves), default=0)
    if length == 0:
        return []
    padded = np.full((len(curves), length), np.nan)
    for row, curve in enumerate(curves):
        padded[row, : len(curve)] = curve
    counts = np.sum(~np.isnan(padded), axis=0)
    return [float(np.nansum(padded[:, e]) / counts[e]) for e in range(length)]


def curve_band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Epoch-wise mean, minimum and maximum of curves (missing epochs of shorter curves ignored)."""
    length = max((len(c) for c in curves), default=0)
    columns = [[c[e] for c in curves if e < len(c)] for e in range(length)]
    return mean_curve(curves), [min(col) for col in columns], [max(col) for col in columns]


def plot_band(ax: Axes, seed_curves: Sequence[Sequence[float]], colour: str, label: str, start: int = 0) -> None:
    """Mean of ``seed_curves`` as a thick line, their min-max as a shaded band and each as a thin line (one
    curve: just the line); x runs from ``start``."""
    mean, low, high = curve_band(seed_curves)
    x = range(start, start + len(mean))
    if len(seed_curves) > 1:
        ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
        for curve in seed_curves:
            ax.plot(range(start, start + len(curve)), curve, color=colour, linewidth=0.7, alpha=0.6)
    ax.plot(x, mean, color=colour, linewidth=2.0, label=label)


def subject_label(subject: str, variant: str) -> str:
    """Legend name of a subject: ``protected (<variant>)``, ``normal`` or ``scratch``."""
    return f"protected ({variant})" if subject == "protected" else subject


def line_table(runs: pd.DataFrame, curves: Mapping[str, Sequence[float]], strategy: str) -> pd.DataFrame:
    """Mean curve per (label, optimizer, lr) for one strategy, scratch taken from every strategy.

    ``runs`` is ``load_runs`` output, ``curves`` maps run_id -> accuracy per epoch.
    """
    chosen = runs[(runs["strategy"] == strategy) | (runs["subject"] == "scratch")]
    chosen = chosen.assign(label=[subject_label(s, v) for s, v in zip(chosen["subject"], chosen["variant"])])
    rows = [{"label": label, "optimizer": optimizer, "lr": lr,
             "curve": mean_curve([curves.get(run_id, []) for run_id in group["run_id"]])}
            for (label, optimizer, lr), group in chosen.groupby(["label", "optimizer", "lr"])]
    return pd.DataFrame(rows, columns=["label", "optimizer", "lr", "curve"])


def colours(labels: Sequence[str]) -> dict[str, str]:
    """Colour per legend label: warm colours for protected variants, blue for normal, grey for scratch."""
    protected = [label for label in labels if label.startswith("protected")]
    table = {label: PROTECTED_COLOURS[k % len(PROTECTED_COLOURS)] for k, label in enumerate(protected)}
    return table | {"normal": NORMAL_COLOUR, "scratch": SCRATCH_COLOUR}


def figure(lines: pd.DataFrame, title: str, subtitle: str, metric: names.Metric = names.ACCURACY) -> Figure:
    """One panel per optimizer (up to 4 per row) on a fixed 0-100 scale, with subject and lr legends."""
    optimizers = in_order(lines["optimizer"], OPTIMIZER_ORDER)
    labels = sorted(lines["label"].unique(), key=lambda l: (not l.startswith("protected"), l != "normal", l))
    lrs = sorted(lines["lr"].unique())
    palette = colours(labels)
    ncols = min(4, len(optimizers))
    nrows = math.ceil(len(optimizers) / ncols)
    width = 3.6 * ncols + 0.6
    fig = Figure(figsize=(width, 2.9 * nrows + 1.4), layout="constrained", dpi=DPI)
    fig.suptitle(fit_title(f"{title}\n{subtitle}", width), fontsize=11)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, optimizer in zip(axes, optimizers):
        for row in lines[lines["optimizer"] == optimizer].itertuples():
            k = lrs.index(row.lr) % len(LR_STYLES)
            ax.plot(range(len(row.curve)), row.curve, color=palette[row.label], linestyle=LR_STYLES[k],
                    marker=LR_MARKERS[k], markersize=3.5, linewidth=1.6)
        ax.set_title(optimizer, fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in axes[len(optimizers):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"restricted {metric.short}, %")
    for ax in axes[(nrows - 1) * ncols:]:
        ax.set_xlabel("epoch (0 = before fine-tuning)")
    subjects = [Line2D([], [], color=palette[label], linewidth=2.5, label=label) for label in labels]
    styles = [Line2D([], [], color="black", linestyle=LR_STYLES[k % len(LR_STYLES)],
                     marker=LR_MARKERS[k % len(LR_MARKERS)], markersize=3.5, label=f"lr {lr:g}")
              for k, lr in enumerate(lrs)]
    handles = subjects + styles
    columns = legend_columns([handle.get_label() for handle in handles], width)
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=9, frameon=False)
    return fig


def make_curves(runs_df: pd.DataFrame, curves: Mapping[str, Sequence[float]], out_dir: str | Path,
                title_prefix: str, metric: names.Metric = names.ACCURACY) -> list[Path]:
    """Write ``[<grid>-<domain>-]curves-<strategy>.png`` per (grid, domain) section and strategy, at the grid's
    base recipe (the curves of one length); returns the paths.

    ``runs_df`` is ``load_runs`` output, ``curves`` maps run_id -> restricted accuracy per epoch
    (``load_curves``). Raises ValueError when ``runs_df`` has no protected or normal runs.
    """
    if runs_df[runs_df["subject"] != "scratch"].empty:
        raise ValueError("no protected or normal attack runs to plot curves for")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = list(runs_df.groupby(list(WHERE), sort=True))
    paths = []
    for (grid, domain), section in parts:
        section = base_slice(section)
        attacked = section[section["subject"] != "scratch"]
        title = f"{title_prefix} [{grid}, {domain}]" if len(parts) > 1 else title_prefix
        for strategy in in_order(attacked["strategy"], STRATEGY_ORDER):
            lines = line_table(section, curves, strategy)
            subtitle = describe(attacked[attacked["strategy"] == strategy], list(SECONDARY))
            fig = figure(lines, f"{title} — {strategy}: restricted-domain {metric.axis} during fine-tuning", subtitle,
                         metric)
            paths.append(save(fig, out / f"{section_prefix(grid, domain, len(parts) > 1)}curves-{strategy}.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the fine-tuning curves of one sweep into --out; returns the exit status."""
    args = parse_source_args(source_parser(__doc__.splitlines()[0]), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def command() -> int:
        sweep = find_sweep(args.tracking_uri, args.experiment, args.sweep_id)
        runs = load_runs(args.tracking_uri, args.experiment, sweep.sweep_id)
        curves = load_curves(args.tracking_uri, runs["run_id"], sweep.metric.restricted)
        for path in make_curves(runs, curves, args.out, args.experiment, sweep.metric):
            print(path)
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
