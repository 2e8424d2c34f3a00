"""The adaptive attacker (attack.search): how good a recipe a Ray Tune search finds on each subject.

Reads the sweep's search runs (``sophon.role=search``: one per search, attacked model and restricted domain,
with ``best_found_restricted_acc`` at step n = after n trials) and their trials (attack runs on the ``search``
grid). The attacker picks by its own validation split; the restricted test split only scores the pick. Writes:

- ``search-found-<search>-<domain>.png``: the best attack found after n trials, protected (per variant: seed
  mean, min-max band, thin per-seed lines), normal and scratch, chance dashed;
- ``search-explored-<search>-<domain>.png``: what the search tried, strategy x lr decade per subject, the best
  test accuracy (at the trial's best-validation epoch) there and the trial count;
- tables: the final pick per subject (per protection seed and mean) and the worst-case gap to the baselines.

    python -m analysis.search --tracking-uri sqlite:///mlflow.db --experiment quickstart --out report/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from analysis.curves import colours, plot_band, subject_label
from analysis.heatmaps import ACCURACY_CMAP, ACCURACY_NORM, DPI, _text_colour, save
from analysis.cli import part_main
from analysis.runs import (CELL_KEYS, STRATEGY_ORDER, Sweep, has_classes, load_attack_runs, load_curves, param_casts,
                           stage_runs, typed_params)
from analysis.summary import markdown_table, number, setting
from analysis.tables import in_order
from sophon_ray import names
from sophon_ray.core.metrics import Cell, chance

log = logging.getLogger(__name__)

# one search run per (search, domain, attacked model)
SEARCH_KEYS = (names.SEARCH, names.DOMAIN, names.SUBJECT, names.VARIANT, names.PROTECT_SEED)
SEARCH_PARAMS = param_casts((names.SUBJECT, names.VARIANT, names.PROTECT_SEED, names.DOMAIN, names.SEARCH,
                              "algorithm", "scheduler", "num_samples", "val_fraction"))
TRIAL_PARAMS = param_casts((names.SEARCH, names.SEARCH_TRIAL))
def trial_metrics(metric: names.Metric = names.ACCURACY) -> dict[str, str]:
    """A search trial's extra columns -> the MLflow names of the sweep's metric."""
    return {"val_best": metric.val_best, "at_val_best": metric.at_val_best, "stopped": names.STOPPED}


@dataclass(frozen=True)
class Searches:
    """A sweep's searches: ``runs`` one row per search run (SEARCH_PARAMS, run_id, ``found``: the best-found
    test accuracy after n = 1..N trials), ``trials`` one ``attack_table`` row per finished search trial with
    search, search_trial, val_best, at_val_best and stopped."""

    runs: pd.DataFrame
    trials: pd.DataFrame

    @property
    def empty(self) -> bool:
        return self.runs.empty and self.trials.empty


def load_searches(sweep: Sweep) -> Searches:
    """The sweep's search runs (with their best-found histories) and search trials; both empty when none."""
    runs = pd.DataFrame([{"run_id": run.info.run_id, **typed_params(run, SEARCH_PARAMS)}
                         for run in stage_runs(sweep, "search")], columns=["run_id", *SEARCH_PARAMS])
    found = load_curves(sweep.tracking_uri, runs["run_id"], sweep.metric.found_test)
    runs["found"] = [found[run_id] for run_id in runs["run_id"]]
    trials = load_attack_runs(sweep, (names.SEARCH_GRID,), TRIAL_PARAMS, trial_metrics(sweep.metric))
    return Searches(runs.sort_values(list(SEARCH_KEYS), ignore_index=True), trials)


def searched_fields(trials: pd.DataFrame) -> list[str]:
    """The recipe fields that took several values in these trials (what the search chose), in RECIPE order."""
    return [key for key in CELL_KEYS if key in trials and trials[key].nunique() > 1]


def picks(trials: pd.DataFrame) -> pd.DataFrame:
    """The attacker's final pick per search run: the trial with the best validation accuracy (ties: the
    earlier search_trial), as its trial row plus ``trials`` (how many that search ran)."""
    ordered = trials.sort_values([*SEARCH_KEYS, names.SEARCH_TRIAL], kind="stable")
    groups = ordered.groupby(list(SEARCH_KEYS), sort=True)
    best = ordered.loc[groups["val_best"].idxmax()].reset_index(drop=True)
    return best.assign(trials=groups.size().to_numpy())


def subject_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered protected (by variant, seed), normal, scratch."""
    rank = {"protected": 0, "normal": 1, "scratch": 2}
    return table.sort_values([names.SUBJECT, names.VARIANT, names.PROTECT_SEED],
                             key=lambda c: c.map(rank) if c.name == names.SUBJECT else c, ignore_index=True)


def final_found(runs: pd.DataFrame) -> pd.DataFrame:
    """Per search run its final best-found test accuracy (the last step of ``found``; NaN when never logged)."""
    return runs.assign(test=[curve[-1] if curve else math.nan for curve in runs["found"]])


def worst_case_gap(found: pd.DataFrame, chance_level: float = 0.0) -> pd.DataFrame:
    """Per (search, domain, variant): the best-found test accuracy on protected (mean over protection seeds and
    the highest seed), normal and scratch, and the gaps protected - scratch and protected - normal on
    accuracies floored at chance (``sophon_ray.core.metrics.Cell``); ``held``: protected <= scratch + 1 (for the
    mean and for the worst seed). ``found`` has SEARCH_KEYS and ``test`` (``final_found``)."""
    rows = []
    for (search, domain), group in found.groupby([names.SEARCH, names.DOMAIN], sort=True):
        baseline = {s: group.loc[group[names.SUBJECT] == s, "test"].mean() for s in ("normal", "scratch")}
        protected = group[group[names.SUBJECT] == "protected"]
        for variant, seeds in protected.groupby(names.VARIANT, sort=True):
            mean = Cell(seeds["test"].mean(), baseline["normal"], baseline["scratch"], chance_level)
            worst = Cell(seeds["test"].max(), baseline["normal"], baseline["scratch"], chance_level)
            rows.append({names.SEARCH: search, names.DOMAIN: domain, names.VARIANT: variant, "seeds": len(seeds),
                         "protected_mean": mean.protected, "protected_max": worst.protected,
                         "normal": mean.normal, "scratch": mean.scratch,
                         "mean_minus_scratch": mean.floor(mean.protected) - mean.floor(mean.scratch),
                         "max_minus_scratch": worst.floor(worst.protected) - worst.floor(worst.scratch),
                         "mean_minus_normal": -mean.gap, "max_minus_normal": -worst.gap,
                         "held": mean.held, "worst_held": worst.held})
    return pd.DataFrame(rows)


def search_overview(data: Searches, chance_level: float = 0.0, metric: names.Metric = names.ACCURACY) -> str:
    """The console's lines for the searches: per (search, domain, variant) the best found on protected (seed mean
    and worst seed) against scratch and normal, and whether it held ('' when the sweep ran no search); a score
    other than accuracy is named ("best denoising skill found")."""
    if data.runs.empty:
        return ""
    what = "" if has_classes(metric) else f" {metric.noun}"  # accuracy goes unnamed
    lines = []
    for _, g in worst_case_gap(final_found(data.runs), chance_level).iterrows():
        verdict = "held" if g["held"] and g["worst_held"] else "NOT held"
        lines.append(f"search {g[names.SEARCH]}/{g[names.DOMAIN]}, {g[names.VARIANT]}: best{what} found on protected "
                     f"{number(g['protected_mean'])} (worst seed {number(g['protected_max'])}) vs scratch "
                     f"{number(g['scratch'])}, normal {number(g['normal'])}: {verdict} (held: protected <= scratch + 1)")
    return "\n".join(lines)


def lr_decade(lr: float) -> int:
    """The decade of a learning rate: floor(log10(lr)) (1e-3 and 5e-3 -> -3)."""
    return math.floor(math.log10(lr) + 1e-9)


def decade_label(decade: int) -> str:
    return f"{10.0 ** decade:g}–{10.0 ** (decade + 1):g}"


def explored(trials: pd.DataFrame, decades: Sequence[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Strategy x lr decade tables of one subject's trials: the best ``at_val_best`` there and the trial
    count (columns ``decades``; cells without trials NaN / 0)."""
    frame = trials.assign(decade=[lr_decade(lr) for lr in trials["lr"]])
    rows = in_order(frame["strategy"], STRATEGY_ORDER)
    best = frame.pivot_table(index="strategy", columns="decade", values="at_val_best", aggfunc="max")
    count = frame.pivot_table(index="strategy", columns="decade", values="at_val_best", aggfunc="size")
    return (best.reindex(index=rows, columns=list(decades)),
            count.reindex(index=rows, columns=list(decades)).fillna(0).astype(int))


def _draw_explored(ax: Axes, best: pd.DataFrame, count: pd.DataFrame, title: str) -> AxesImage:
    """One explored-space panel on the accuracy scale of analysis.heatmaps; empty cells blank."""
    cmap = matplotlib.colormaps[ACCURACY_CMAP].with_extremes(bad="white")
    values = best.to_numpy(float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=ACCURACY_NORM, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.1f}\nn={count.iat[i, j]}", ha="center", va="center", fontsize=8,
                    color=_text_colour(cmap(ACCURACY_NORM(value))))
    ax.set_xticks(range(values.shape[1]), labels=[decade_label(d) for d in best.columns], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), labels=[str(r) for r in best.index])
    ax.set_xlabel("learning rate")
    ax.set_title(title, fontsize=10)
    return image


def subject_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per subject: each protected variant (its protection seeds pooled), normal, scratch."""
    labelled = frame.assign(label=[subject_label(s, v) for s, v in zip(frame[names.SUBJECT], frame[names.VARIANT])])
    order = sorted(labelled["label"].unique(), key=lambda l: (not l.startswith("protected"), l != "normal", l))
    return [(label, labelled[labelled["label"] == label]) for label in order]


def explored_figure(trials: pd.DataFrame, title: str, metric: names.Metric = names.ACCURACY) -> Figure:
    """One explored-space panel per subject (strategy x lr decade), one 0-100 colour bar (dark = attack failed)."""
    decades = list(range(min(map(lr_decade, trials["lr"])), max(map(lr_decade, trials["lr"])) + 1))
    groups = subject_groups(trials)
    rows = trials["strategy"].nunique()
    fig = Figure(figsize=(max(2.6, 1.0 * len(decades) + 1.6) * len(groups) + 1.2, max(2.6, 0.5 * rows + 2.0)),
                 layout="constrained", dpi=DPI)
    fig.suptitle(f"{title}\nbest test {metric.noun} at the best-validation epoch, %, and trials per cell "
                 "(dark = attack failed; blank = not tried)", fontsize=10)
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    images = [_draw_explored(ax, *explored(frame, decades), f"{label} ({len(frame)} trials)")
              for ax, (label, frame) in zip(axes, groups)]
    fig.colorbar(images[-1], ax=list(axes), label=metric.axis, shrink=0.9)
    return fig


def found_figure(runs: pd.DataFrame, title: str, chance_level: float,
                 metric: names.Metric = names.ACCURACY) -> Figure:
    """Best-found test accuracy after n trials per subject: protected variants as seed mean, band and seed
    lines; normal and scratch; chance dashed."""
    groups = subject_groups(runs)
    palette = colours([label for label, _ in groups])
    fig = Figure(figsize=(7.0, 4.6), layout="constrained", dpi=DPI)
    fig.suptitle(f"{title}\nbest attack found after n trials (the attacker's pick by validation; its test "
                 f"{metric.noun})", fontsize=10)
    ax = fig.subplots()
    for label, frame in groups:
        seeds = [curve for curve in frame["found"] if curve]
        if seeds:
            plot_band(ax, seeds, palette[label], f"{label} ({len(seeds)} seeds)" if len(seeds) > 1 else label, start=1)
    if chance_level:
        ax.axhline(chance_level, color="black", linestyle="--", linewidth=1, label=f"chance ({chance_level:.0f}%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trials run (n)")
    ax.set_ylabel(f"restricted test {metric.short} of the pick, %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def make_search_figures(data: Searches, out_dir: str | Path, title: str, chance_level: float = 0.0,
                        metric: names.Metric = names.ACCURACY) -> list[Path]:
    """Write ``search-found-<search>-<domain>.png`` and ``search-explored-<search>-<domain>.png`` per search
    and restricted domain; returns the paths ([] when the sweep ran no search)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (search, domain), runs in data.runs.groupby([names.SEARCH, names.DOMAIN], sort=True):
        paths.append(save(found_figure(runs, f"{title} — search {search}, {domain}", chance_level, metric),
                          out / f"search-found-{search}-{domain}.png"))
    for (search, domain), trials in data.trials.groupby([names.SEARCH, names.DOMAIN], sort=True):
        paths.append(save(explored_figure(trials, f"{title} — search {search}, {domain}: what it explored", metric),
                          out / f"search-explored-{search}-{domain}.png"))
    return paths


def _pick_row(label: str, row: pd.Series, fields: Sequence[str]) -> list[str]:
    return [label, *(setting(row[key]) for key in fields), str(row["trials"]), str(row[names.SEARCH_TRIAL]),
            number(row["val_best"]), number(row["at_val_best"])]


def picks_table(chosen: pd.DataFrame, fields: Sequence[str], per_seed: bool = True,
                metric: names.Metric = names.ACCURACY) -> str:
    """The final picks of one (search, domain): per protection seed (``per_seed``) and the seed mean per
    variant, then normal and scratch; the searched fields (text ones first), trials run, the picked trial, its
    validation and test score (``metric``)."""
    text = [key for key in fields if not pd.api.types.is_numeric_dtype(chosen[key])]
    fields = text + [key for key in fields if key not in text]
    rows = []
    chosen = subject_order(chosen)
    for variant, seeds in chosen[chosen[names.SUBJECT] == "protected"].groupby(names.VARIANT, sort=True):
        if per_seed or len(seeds) == 1:
            rows += [_pick_row(f"protected ({variant}) seed {r[names.PROTECT_SEED]}", r, fields)
                     for _, r in seeds.iterrows()]
        if len(seeds) > 1:
            rows.append([f"**protected ({variant}) mean of {len(seeds)} seeds**", *([""] * len(fields)),
                         number(seeds["trials"].mean(), "g"), "", number(seeds["val_best"].mean()),
                         number(seeds["at_val_best"].mean())])
    rows += [_pick_row(r[names.SUBJECT], r, fields) for _, r in chosen.iterrows() if r[names.SUBJECT] != "protected"]
    header = ["subject", *fields, "trials", "picked trial", f"val {metric.short} (objective)", f"test {metric.short}"]
    return markdown_table(header, rows, text_columns=1 + len(text))


def gap_table(gaps: pd.DataFrame) -> str:
    """The worst-case gap rows of one (search, domain) as markdown."""
    rows = [[g[names.VARIANT], str(g["seeds"]), number(g["protected_mean"]), number(g["protected_max"]),
             number(g["normal"]), number(g["scratch"]), number(g["mean_minus_scratch"], "+.1f"),
             number(g["max_minus_scratch"], "+.1f"), number(g["mean_minus_normal"], "+.1f"),
             number(g["max_minus_normal"], "+.1f"),
             ("held" if g["held"] else "**not held**") + ("" if g["worst_held"] else "; worst seed **not held**")]
            for _, g in gaps.iterrows()]
    return markdown_table(["variant", "seeds", "protected (mean)", "protected (worst seed)", "normal", "scratch",
                           "mean − scratch", "worst − scratch", "mean − normal", "worst − normal", "verdict"], rows)


def protocol(data: Searches, metric: names.Metric = names.ACCURACY) -> str:
    """The search protocol, from the search runs' params."""
    settings = data.runs.drop_duplicates(names.SEARCH)
    lines = [f"- `{r[names.SEARCH]}`: {r['algorithm']} search, scheduler {r['scheduler']}, {r['num_samples']} "
             f"trials per attacked model and domain, validation split {r['val_fraction']:g} of the attacker's pool"
             for _, r in settings.iterrows()]
    return ("Every attacked model gets the same search with the same budget. The attacker's objective is its own "
            "validation split (held out of its data pool); each trial keeps its best-validation epoch, and the "
            f"attacker's pick is the trial with the best validation {metric.noun}. The restricted *test* split only "
            "scores the picks: nothing was chosen on it.\n\n" + "\n".join(lines))


def search_section(data: Searches, chance_level: float = 0.0, per_seed: bool = False, level: int = 2,
                   metric: names.Metric = names.ACCURACY) -> str:
    """The "Adaptive attacker" markdown: the protocol, then per (search, domain) the worst-case gap and the
    attacker's final picks (``per_seed``: every protection seed's pick, else only when one seed). '' when the
    sweep ran no search."""
    if data.empty:
        return ""
    h = "#" * level
    floor = ((f" floored at chance ({chance_level:.0f}%)" if chance_level else "") if has_classes(metric) else
             " floored at 0 (predicting zero noise)")
    parts = [f"{h} Adaptive attacker", protocol(data, metric)]
    found = final_found(data.runs)
    chosen = picks(data.trials) if not data.trials.empty else data.trials
    for (search, domain), trials in data.trials.groupby([names.SEARCH, names.DOMAIN], sort=True):
        here = (found[names.SEARCH] == search) & (found[names.DOMAIN] == domain)
        parts += [f"{h}# Search `{search}`, restricted domain `{domain}`",
                  f"Worst-case gap: the best-found test {metric.noun} after all trials{floor}; *worst seed* is the "
                  f"protection seed the search broke most. held = protected ≤ scratch + 1.",
                  gap_table(worst_case_gap(found[here], chance_level)),
                  f"The attacker's final pick per subject (the searched fields; {metric.noun} at its "
                  "best-validation epoch):",
                  picks_table(chosen[(chosen[names.SEARCH] == search) & (chosen[names.DOMAIN] == domain)],
                              searched_fields(trials), per_seed, metric)]
    return "\n\n".join(parts)


def write_search(sweep: Sweep, out: Path, num_classes: int | None) -> list[Path]:
    """The search figures and ``search.md`` (every protection seed) of one sweep in ``out``; returns the paths."""
    chance_level = chance(num_classes) if num_classes else 0.0
    data = load_searches(sweep)
    path = out / "search.md"
    path.write_text(search_section(data, chance_level, per_seed=True, metric=sweep.metric) + "\n", encoding="utf-8")
    return [*make_search_figures(data, out, sweep.experiment, chance_level, sweep.metric), path]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the search figures and ``search.md`` of one sweep into --out; returns the exit status."""
    return part_main(__doc__.splitlines()[0], argv, write_search)


if __name__ == "__main__":
    raise SystemExit(main())
