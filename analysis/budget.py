"""The budget study (does protection delay the attacker or stop it?) and benign fine-tuning (does the protected
model still fine-tune on unrelated domains?).

Budget grid trials fine-tune on the attacker's pool for up to E epochs at several data fractions and log
restricted test accuracy per epoch. The question per data fraction: when does the protected model (seed-mean
curve) reach what the normal model reaches in 10 epochs? *none*: within 10 epochs (as fast as normal);
*delay*: later; *wall*: never within the E epochs run. Writes ``budget-epochs-<domain>.png`` (accuracy vs epoch,
one panel per data fraction) and ``budget-fraction-<domain>.png`` (accuracy at epoch 10 and at the last epoch vs
data fraction). Benign grid trials fine-tune on unrelated domains; there protected should match normal.

    python -m analysis.budget --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.curves import colours, mean_curve, plot_band, subject_label
from analysis.heatmaps import DPI, save
from analysis.cli import part_main
from analysis.runs import CELL_KEYS, Sweep, has_classes, load_attack_runs, load_curves
from analysis.summary import cell_name, markdown_table, number
from analysis.tables import cells, varying
from sophon_ray import names
from sophon_ray.core.metrics import chance, epochs_to_target

log = logging.getLogger(__name__)

READ_EPOCH = 10     # the normal model's accuracy after this many epochs is the target
LAST = 10**9        # at_epoch(curve, LAST): the last epoch
Curves = Mapping[str, Sequence[float]]


@dataclass(frozen=True)
class GridRuns:
    """One grid's finished attack trials (``attack_table`` rows) and their restricted_acc curves by run id."""

    runs: pd.DataFrame
    curves: dict[str, list[float]]

    @property
    def empty(self) -> bool:
        return self.runs.empty


def load_grid(sweep: Sweep, grid: str) -> GridRuns:
    """The sweep's finished trials on ``grid`` (budget or benign) and their per-epoch curves."""
    runs = load_attack_runs(sweep, (grid,))
    return GridRuns(runs, load_curves(sweep.tracking_uri, runs["run_id"], sweep.metric.restricted))


def at_epoch(curve: Sequence[float], epoch: int = READ_EPOCH) -> float:
    """Accuracy after ``epoch`` epochs (the last epoch when the curve is shorter; NaN for no curve)."""
    return curve[min(epoch, len(curve) - 1)] if curve else math.nan


def break_even(curve: Sequence[float], target: float) -> int | None:
    """First epoch at which ``curve`` reaches ``target`` (``sophon_ray.core.metrics.epochs_to_target``); None: never."""
    return epochs_to_target(curve, target) if curve and not math.isnan(target) else None


def break_even_text(curve: Sequence[float], target: float) -> str:
    """``break_even`` as table text: the epoch, or ``>E`` when never reached within the E epochs run."""
    epoch = break_even(curve, target)
    return str(epoch) if epoch is not None else f">{max(0, len(curve) - 1)}"


def verdict(curve: Sequence[float], target: float) -> str:
    """none (reaches target within READ_EPOCH epochs, as fast as normal), delay (later) or wall (never)."""
    epoch = break_even(curve, target)
    return "wall" if epoch is None else ("none" if epoch <= READ_EPOCH else "delay")


def seed_curves(run_ids: Sequence[str], runs: pd.DataFrame, curves: Curves) -> dict[int, list[float]]:
    """Protection seed -> its curve (the mean over its attack seeds), for the runs ``run_ids``."""
    chosen = runs[runs["run_id"].isin(run_ids)]
    return {seed: mean_curve([curves.get(r, []) for r in group["run_id"]])
            for seed, group in chosen.groupby(names.PROTECT_SEED, sort=True)}


def budget_rows(data: GridRuns) -> pd.DataFrame:
    """One row per (domain, variant, budget cell): ``recipe`` (the varying recipe fields but the data fraction),
    data_fraction, epochs, the seed-mean curves ``protected_curve``/``normal_curve``/``scratch_curve``, the
    per-protection-seed ``seed_curves``, accuracies at READ_EPOCH and at the last epoch, ``target`` (normal at
    READ_EPOCH), break-even epochs (text) of protected and scratch and the protected verdict."""
    table = cells(data.runs, (names.BUDGET,))
    keys, _ = varying(table, [k for k in CELL_KEYS if k not in ("data_fraction", "epochs")])
    rows = []
    for r in table.to_dict("records"):
        curve = {s: mean_curve([data.curves.get(i, []) for i in r[f"{s}_runs"]]) for s in ("protected", "normal",
                                                                                         "scratch")}
        target = at_epoch(curve["normal"])
        rows.append({names.DOMAIN: r[names.DOMAIN], names.VARIANT: r[names.VARIANT],
                     "recipe": cell_name(pd.Series(r), keys) if keys else "", "data_fraction": r["data_fraction"],
                     "epochs": r["epochs"], **{f"{s}_curve": c for s, c in curve.items()},
                     "seed_curves": seed_curves(r["protected_runs"], data.runs, data.curves),
                     **{f"{s}@{READ_EPOCH}": at_epoch(c) for s, c in curve.items()},
                     **{f"{s}@last": (c[-1] if c else math.nan) for s, c in curve.items()},
                     "target": target, "break_even_protected": break_even_text(curve["protected"], target),
                     "break_even_scratch": break_even_text(curve["scratch"], target),
                     "verdict": verdict(curve["protected"], target)})
    return pd.DataFrame(rows).sort_values([names.DOMAIN, names.VARIANT, "recipe", "data_fraction"],
                                          ignore_index=True)


def budget_table(rows: pd.DataFrame) -> str:
    """Markdown: per (variant, recipe, data fraction) the accuracies at READ_EPOCH and last, break-evens, verdict."""
    recipe = bool(rows["recipe"].any())
    e = READ_EPOCH
    body = [[r[names.VARIANT], *([r["recipe"]] if recipe else []), f"{r['data_fraction']:g}", str(r["epochs"]),
             number(r[f"normal@{e}"]), number(r[f"protected@{e}"]), number(r[f"scratch@{e}"]),
             number(r["protected@last"]), number(r["scratch@last"]), r["break_even_protected"],
             r["break_even_scratch"], r["verdict"]] for _, r in rows.iterrows()]
    return markdown_table(["variant", *(["recipe"] if recipe else []), "data fraction", "epochs E", f"normal@{e}",
                           f"protected@{e}", f"scratch@{e}", "protected@last", "scratch@last",
                           f"break-even protected (epoch ≥ normal@{e})", "break-even scratch", "verdict"], body,
                          text_columns=1 + recipe)


def verdict_lines(rows: pd.DataFrame, metric: names.Metric = names.ACCURACY) -> str:
    """One line per (variant, recipe, data fraction) saying delay, wall or none in words."""
    score = metric.noun
    lines = []
    for _, r in rows.iterrows():
        where = f"{r[names.VARIANT]}, {r['recipe'] + ', ' if r['recipe'] else ''}data fraction {r['data_fraction']:g}"
        what = {"none": f"protected reaches normal's {READ_EPOCH}-epoch {score} "
                        f"({number(r['target'])}) by epoch {r['break_even_protected']}",
                "delay": f"protected reaches normal's {READ_EPOCH}-epoch {score} ({number(r['target'])}) "
                         f"only at epoch {r['break_even_protected']}",
                "wall": f"protected never reaches normal's {READ_EPOCH}-epoch {score} "
                        f"({number(r['target'])}) within {r['epochs']} epochs (best {number(max(r['protected_curve']))})"
                }[r["verdict"]]
        lines.append(f"- {where}: **{r['verdict']}** — {what}; scratch: epoch {r['break_even_scratch']}.")
    return "\n".join(lines)


def seed_table(rows: pd.DataFrame) -> str:
    """Markdown: per (variant, recipe, data fraction, protection seed) its accuracies and break-even epoch."""
    body = []
    for _, r in rows.iterrows():
        for seed, curve in r["seed_curves"].items():
            body.append([r[names.VARIANT], str(seed), f"{r['data_fraction']:g}", *([r["recipe"]] if r["recipe"] else []),
                         number(at_epoch(curve)), number(curve[-1] if curve else math.nan),
                         break_even_text(curve, r["target"]), verdict(curve, r["target"])])
    recipe = bool(rows["recipe"].any())
    return markdown_table(["variant", "protection seed", "data fraction", *(["recipe"] if recipe else []),
                           f"protected@{READ_EPOCH}", "protected@last", "break-even", "verdict"], body,
                          text_columns=1)


def budget_section(data: GridRuns, per_seed: bool = False, level: int = 2,
                   metric: names.Metric = names.ACCURACY) -> str:
    """The "Budget: delay or wall" markdown per restricted domain ('' when the sweep has no budget trials)."""
    if data.empty or data.runs[data.runs[names.SUBJECT] == "protected"].empty:
        return ""
    h = "#" * level
    rows = budget_rows(data)
    parts = [f"{h} Budget: delay or wall",
             f"Attackers fine-tune on their own pool for E epochs at several data fractions (restricted *test* "
             f"{metric.noun} per epoch; seed means). Target: the normal model's {metric.noun} after {READ_EPOCH} "
             f"epochs. "
             f"Break-even: the first epoch the seed-mean curve reaches it (`>E`: never within the E epochs run). "
             f"Verdict: *none* = within {READ_EPOCH} epochs (as fast as normal), *delay* = later, *wall* = never."]
    for domain, group in rows.groupby(names.DOMAIN, sort=True):
        parts += [f"{h}# Restricted domain `{domain}`", budget_table(group), verdict_lines(group, metric)]
        if per_seed:
            parts += ["Per protection seed:", seed_table(group)]
    return "\n\n".join(parts)


def curves_figure(rows: pd.DataFrame, title: str, chance_level: float,
                  metric: names.Metric = names.ACCURACY) -> Figure:
    """Restricted accuracy vs epoch, one panel per (recipe, data fraction), each protected variant (seed mean
    and band), normal, scratch; the normal model's READ_EPOCH accuracy dotted, chance dashed."""
    panels = list(rows.groupby(["recipe", "data_fraction"], sort=True))
    labels = [subject_label("protected", v) for v in sorted(rows[names.VARIANT].unique())]
    palette = colours(labels)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 0.4, 3.2 * nrows + 1.3), layout="constrained", dpi=DPI)
    fig.suptitle(f"{title}\nrestricted test {metric.noun} during fine-tuning, % (seed mean, band = protection "
                 "seeds)",
                 fontsize=10)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    for ax, ((recipe, fraction), group) in zip(axes, panels):
        for _, row in group.iterrows():
            plot_band(ax, list(row["seed_curves"].values()), palette[subject_label("protected", row[names.VARIANT])],
                      subject_label("protected", row[names.VARIANT]))
        for subject in ("normal", "scratch"):
            if group[f"{subject}_curve"].iloc[0]:
                plot_band(ax, [group[f"{subject}_curve"].iloc[0]], palette[subject], subject)
        ax.axhline(group["target"].iloc[0], color=palette["normal"], linestyle=":", linewidth=1)
        if chance_level:
            ax.axhline(chance_level, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{recipe + ', ' if recipe else ''}data fraction {fraction:g}", fontsize=10)
        ax.set_ylim(0, 100)
        ax.set_xlabel("epoch (0 = before fine-tuning)")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].set_ylabel(f"restricted {metric.short}, %")
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    return fig


def fraction_figure(rows: pd.DataFrame, title: str, chance_level: float,
                    metric: names.Metric = names.ACCURACY) -> Figure:
    """Accuracy at READ_EPOCH and at the last epoch vs data fraction (log x): protected variants (seed mean,
    band), normal, scratch."""
    labels = [subject_label("protected", v) for v in sorted(rows[names.VARIANT].unique())]
    palette = colours(labels)
    fig = Figure(figsize=(9.5, 4.2), layout="constrained", dpi=DPI)
    fig.suptitle(f"{title}\nrestricted test {metric.noun} vs the attacker's data fraction, %", fontsize=10)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (when, epoch) in zip(axes, ((f"after {READ_EPOCH} epochs", READ_EPOCH), ("at the last epoch", LAST))):
        for recipe, group in rows.groupby("recipe", sort=True):
            suffix = f" [{recipe}]" if recipe else ""
            for variant, lines in group.groupby(names.VARIANT, sort=True):
                read = [[at_epoch(c, epoch) for c in seeds.values()] for seeds in lines["seed_curves"]]
                colour = palette[subject_label("protected", variant)]
                ax.fill_between(lines["data_fraction"], [min(r) for r in read], [max(r) for r in read],
                                color=colour, alpha=0.18, linewidth=0)
                ax.plot(lines["data_fraction"], [float(np.mean(r)) for r in read], marker="o", color=colour,
                        label=subject_label("protected", variant) + suffix)
            shared = group.drop_duplicates("data_fraction")
            for subject in ("normal", "scratch"):
                ax.plot(shared["data_fraction"], [at_epoch(c, epoch) for c in shared[f"{subject}_curve"]],
                        marker="s", color=palette[subject], label=subject + suffix)
        if chance_level:
            ax.axhline(chance_level, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        fractions = sorted(rows["data_fraction"].unique())
        ax.set_xticks(fractions, labels=[f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_title(when, fontsize=10)
        ax.set_xlabel("data fraction of the attacker's pool")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"restricted {metric.short}, %")
    axes[1].legend(fontsize=8, loc="best")
    return fig


def make_budget_figures(data: GridRuns, out_dir: str | Path, title: str, chance_level: float = 0.0,
                        metric: names.Metric = names.ACCURACY) -> list[Path]:
    """Write ``budget-epochs-<domain>.png`` and ``budget-fraction-<domain>.png`` per restricted domain; returns
    the paths ([] without budget trials on a protected model)."""
    if data.empty or data.runs[data.runs[names.SUBJECT] == "protected"].empty:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain, rows in budget_rows(data).groupby(names.DOMAIN, sort=True):
        name = f"{title} — budget, {domain}"
        paths.append(save(curves_figure(rows, name, chance_level, metric), out / f"budget-epochs-{domain}.png"))
        paths.append(save(fraction_figure(rows, name, chance_level, metric), out / f"budget-fraction-{domain}.png"))
    return paths


def benign_rows(data: GridRuns) -> pd.DataFrame:
    """Per benign cell and variant: protected (seed mean), normal, scratch final accuracy and protected - normal
    (``analysis.runs.cells`` on the benign grid)."""
    table = cells(data.runs, (names.BENIGN,))
    return table.assign(protected_minus_normal=table["protected"] - table["normal"])


def benign_section(data: GridRuns, per_seed: bool = False, level: int = 2,
                   metric: names.Metric = names.ACCURACY) -> str:
    """The "Benign fine-tuning" markdown ('' when the sweep has no benign trials on a protected model):
    per benign cell protected vs normal vs scratch, then the mean over cells; ``per_seed`` adds each protection
    seed's score (``metric``)."""
    if data.empty or data.runs[data.runs[names.SUBJECT] == "protected"].empty:
        return ""
    rows = benign_rows(data)
    keys, _ = varying(rows, CELL_KEYS)
    body = []
    for _, r in rows.iterrows():
        per = ""
        if per_seed:
            finals = data.runs.set_index("run_id").loc[list(r["protected_runs"])].groupby(names.PROTECT_SEED)["final"]
            per = ", ".join(f"s{seed} {number(v)}" for seed, v in finals.mean().items())
        body.append([r[names.DOMAIN], r[names.VARIANT], *([cell_name(r, keys)] if keys else []),
                     number(r["protected"]), *([per] if per_seed else []), number(r["normal"]), number(r["scratch"]),
                     number(r["protected_minus_normal"], "+.1f")])
    for variant, group in rows.groupby(names.VARIANT, sort=True):
        body.append([f"**mean of {len(group)} cells**", variant, *([""] if keys else []),
                     number(group["protected"].mean()), *([""] if per_seed else []), number(group["normal"].mean()),
                     number(group["scratch"].mean()), number(group["protected_minus_normal"].mean(), "+.1f")])
    header = ["benign domain", "variant", *(["cell"] if keys else []), "protected (seed mean)",
              *(["protected per seed"] if per_seed else []), "normal", "scratch", "protected − normal"]
    h = "#" * level
    floor = "chance" if has_classes(metric) else "0"
    return "\n\n".join([f"{h} Benign fine-tuning",
                        "Fine-tuning on unrelated domains (their training split, scored on their test split; "
                        f"final {metric.noun} %, not floored at {floor}). Protection should leave these as good as "
                        "the normal model's: protected − normal near 0.",
                        markdown_table(header, body, text_columns=2 + bool(keys) + per_seed)])


def write_budget(sweep: Sweep, out: Path, num_classes: int | None) -> list[Path]:
    """The budget figures and ``budget.md`` (budget and benign, every protection seed) of one sweep in ``out``;
    returns the paths."""
    budget, benign = load_grid(sweep, names.BUDGET), load_grid(sweep, names.BENIGN)
    path = out / "budget.md"
    metric = sweep.metric
    path.write_text("\n\n".join(filter(None, [budget_section(budget, per_seed=True, metric=metric),
                                               benign_section(benign, per_seed=True, metric=metric)])) + "\n",
                    encoding="utf-8")
    return [*make_budget_figures(budget, out, sweep.experiment, chance(num_classes) if num_classes else 0.0, metric),
            path]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the budget figures and ``budget.md`` of one sweep into --out; returns the exit status."""
    return part_main(__doc__.splitlines()[0], argv, write_budget)


if __name__ == "__main__":
    raise SystemExit(main())
