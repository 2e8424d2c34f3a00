"""The defender search in the report: per defended variant, every candidate (its searched settings, development
worst case, original-domain drop, objective, feasible), the chosen one, the best found after n candidates, and the
Pareto figure (intactness drop vs development worst case minus scratch) over all candidates.

Reads the ``defend`` and ``defend-candidate`` runs ``sophon_ray.run.defend`` logs; pandas and matplotlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.runs import Sweep, stage_runs  # noqa: E402
from analysis.summary import markdown_table, number  # noqa: E402
from sophon_ray import names  # noqa: E402
from sophon_ray.core.metrics import INFEASIBLE, defend_protects  # noqa: E402

OBJECTIVE, WORST_CASE, DROP, FEASIBLE = names.DEFEND_OBJECTIVE, names.DEV_WORST_CASE, names.DEFEND_DROP, names.FEASIBLE
NOT_SETTINGS = {"candidate"}


@dataclass(frozen=True)
class Defends:
    """The sweep's defend runs (one per defended variant) and their candidates (in the order they started)."""

    variants: pd.DataFrame
    candidates: pd.DataFrame

    @property
    def empty(self) -> bool:
        return self.variants.empty


def load_defends(sweep: Sweep) -> Defends:
    """Every defend run and candidate of a sweep (both empty when it defended nothing)."""
    variants = pd.DataFrame([{"run_id": r.info.run_id, "variant": r.data.params.get("variant", ""),
                              "guard": float(r.data.params.get("guard", "nan")),
                              "chosen": r.data.tags.get(names.CHOSEN_TAG, ""),
                              "round_chosen": {int(k[5:-7]): v for k, v in r.data.tags.items()
                                               if k.startswith("round") and k.endswith("_chosen")},
                              **r.data.metrics}
                             for r in stage_runs(sweep, names.DEFEND_ROLE)],
                            columns=["run_id", "variant", "guard", "chosen", "round_chosen", "dev_best_scratch",
                                     "dev_best_normal"])
    rows = []
    for r in stage_runs(sweep, names.CANDIDATE_ROLE):
        if r.info.status != "FINISHED" or OBJECTIVE not in r.data.metrics:
            continue
        rows.append({"parent": r.data.tags.get(names.PARENT, ""), "start": r.info.start_time, "end": r.info.end_time,
                     **{f"param:{k}": v for k, v in r.data.params.items()}, names.STOPPED: 0.0, **r.data.metrics})
    candidates = pd.DataFrame(rows)
    if not candidates.empty:
        candidates = candidates.sort_values(["parent", "start"], ignore_index=True)
        candidates["n"] = candidates.groupby("parent").cumcount() + 1
    return Defends(variants, candidates)


def best_found(candidates: pd.DataFrame) -> list[float]:
    """The best objective of a feasible candidate that ran its development attacks, after each candidate (NaN
    until there is one)."""
    best, out = math.inf, []
    for objective, feasible, stopped in zip(candidates[OBJECTIVE], candidates[FEASIBLE], candidates[names.STOPPED]):
        if feasible == 1.0 and stopped != 1.0:
            best = min(best, objective)
        out.append(best if math.isfinite(best) else math.nan)
    return out


def defend_table(variant: pd.Series, candidates: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate of ``variant``: n, its searched settings, worst case, drop, objective, feasible,
    chosen."""
    mine = candidates[candidates["parent"] == variant["run_id"]]
    settings = [c for c in mine.columns if c.startswith("param:") and c[6:] not in NOT_SETTINGS]
    for column in (WORST_CASE, DROP, "iteration"):
        if column not in mine:
            mine = mine.assign(**{column: math.nan})
    # a candidate infeasible at a probe (stopped there by ASHA) logged no drop, only its estimate INFEASIBLE + drop
    over = mine[OBJECTIVE].between(INFEASIBLE, 2 * INFEASIBLE, inclusive="left")
    mine = mine.assign(**{DROP: mine[DROP].where(mine[DROP].notna() | ~over, mine[OBJECTIVE] - INFEASIBLE)})
    table = mine[["n", *settings, WORST_CASE, DROP, OBJECTIVE, FEASIBLE, names.STOPPED, "iteration"]].rename(
        columns={c: c[6:] for c in settings})
    rounds = (mine["param:round"].astype(int) if "param:round" in mine else pd.Series(1, index=mine.index))
    found = pd.concat([pd.Series(best_found(group), index=group.index) for _, group in mine.groupby(rounds)]) \
        if not mine.empty else pd.Series(dtype=float)
    return table.assign(key=mine["param:candidate"].to_numpy(),
                        chosen=(mine["param:candidate"] == variant["chosen"]).to_numpy(),
                        best_found=found.reindex(mine.index).to_numpy(), round=rounds.to_numpy(),
                        red_team=(mine[names.RED_TEAM_BEST] if names.RED_TEAM_BEST in mine
                                  else pd.Series(math.nan, index=mine.index)).to_numpy())


def round_lines(variant: pd.Series, table: pd.DataFrame) -> list[str]:
    """Per round of a defender search with rounds: its candidates and its choice (objective, red team's best)."""
    chosen = variant.get("round_chosen")
    chosen = chosen if isinstance(chosen, dict) else {}
    if len(chosen) < 2:
        return []
    out = []
    for r in sorted(chosen):
        mine = table[table["round"] == r]
        pick = mine[mine["key"] == chosen[r]]
        what = (f"chose #{int(pick['n'].iloc[0])}, objective {number(pick[OBJECTIVE].iloc[0], '+.1f')}, its red "
                f"team's best {number(pick['red_team'].iloc[0])}" if not pick.empty else "chose nothing")
        out.append(f"round {r}: {len(mine)} candidates, {what}")
    return out


def defend_section(data: Defends, level: int = 2) -> str:
    """The "Defender search" markdown ('' when the sweep defended nothing)."""
    if data.empty or data.candidates.empty:
        return ""
    h = "#" * level
    parts = [f"{h} Defender search",
             "Each candidate is one protection (its settings drawn by the defender's Tune search) attacked by the "
             "development grid on the protector's restricted share, scored on restricted validation data; "
             "*objective* = its best development attack minus scratch's best (lower is better); a candidate whose "
             "original-domain validation drop exceeds the guard is infeasible (not attacked). The chosen candidate "
             "(the best feasible one) is the variant's setting for every protection seed; nothing here reads "
             "evaluation data."]
    for _, variant in data.variants.iterrows():
        table = defend_table(variant, data.candidates)
        settings = [c for c in table.columns if c not in ("n", WORST_CASE, DROP, OBJECTIVE, FEASIBLE, "chosen",
                                                           "best_found", names.STOPPED, "iteration", "red_team",
                                                           "key")]
        if table["round"].nunique() <= 1:   # one round: no round column
            settings = [c for c in settings if c != "round"]
        rows = [[str(r["n"]), *(_setting(r[s]) for s in settings), number(r[WORST_CASE]), number(r[DROP], "+.1f"),
                 _objective(r), number(r["best_found"], "+.1f"), "**chosen**" if r["chosen"] else ""]
                for _, r in table.iterrows()]
        parts += [f"{h}# `{variant['variant']}`",
                  f"Development best on scratch {number(variant['dev_best_scratch'])}, on normal "
                  f"{number(variant['dev_best_normal'])} (the unprotected model's objective "
                  f"{number(variant['dev_best_normal'] - variant['dev_best_scratch'], '+.1f')}); guard "
                  f"{variant['guard']:g} points; "
                  f"{int((table[FEASIBLE] == 1.0).sum())} of {len(table)} candidates feasible, "
                  f"{int((table[names.STOPPED] == 1.0).sum())} stopped early by ASHA (their probe estimate shown).",
                  markdown_table(["#", *settings, "dev worst case", "drop (val)", "objective", "best after n", ""],
                                 rows, text_columns=1 + len(settings))]
        rounds = round_lines(variant, table)
        if rounds:
            parts.append("Red team, then blue team: each round's choice met a development attacker search whose best "
                         "recipes joined the next round's simulated attacker and development grid (best after n "
                         "restarts each round: the objectives of two rounds are on different grids).\n\n"
                         + "\n".join(f"- {line}" for line in rounds))
        chosen = table[table["chosen"]]
        unprotected = variant["dev_best_normal"] - variant["dev_best_scratch"]
        if not chosen.empty and not defend_protects(chosen[OBJECTIVE].iloc[0], unprotected):
            parts.append(f"**The chosen candidate is no better than the unprotected model on the development grid** "
                         f"({number(chosen[OBJECTIVE].iloc[0], '+.1f')} vs {number(unprotected, '+.1f')}): this search "
                         "found no protection.")
    return "\n\n".join(parts)


def defend_overview(data: Defends) -> str:
    """The console's lines for the defender searches: per defended variant the chosen candidate and what it was
    chosen from ('' when the sweep defended nothing)."""
    if data.empty or data.candidates.empty:
        return ""
    lines = []
    for _, variant in data.variants.iterrows():
        table = defend_table(variant, data.candidates)
        chosen = table[table["chosen"]]
        what = (f"chose #{int(chosen['n'].iloc[0])} (development worst case {number(chosen[WORST_CASE].iloc[0])} "
                f"vs scratch {number(variant['dev_best_scratch'])}: {number(chosen[OBJECTIVE].iloc[0], '+.1f')})"
                if not chosen.empty else "chose nothing")
        lines.append(f"defend {variant['variant']}: {what} of {len(table)} candidates "
                     f"({int((table[FEASIBLE] == 1.0).sum())} feasible, {int((table[names.STOPPED] == 1.0).sum())} "
                     f"stopped by ASHA); development data only")
    return "\n".join(lines)


def _objective(row: pd.Series) -> str:
    if row[FEASIBLE] != 1.0:
        return "infeasible"
    if row[names.STOPPED] == 1.0:
        return f"stopped at {number(row['iteration'], '.0f')} (est. {number(row[OBJECTIVE], '+.1f')})"
    return number(row[OBJECTIVE], "+.1f")


def _setting(value: object) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def make_defend_figures(data: Defends, out_dir: str | Path, title: str) -> list[Path]:
    """``defend-pareto-<variant>.png`` (drop vs objective, every candidate) and ``defend-found-<variant>.png``
    (best feasible objective after n candidates) per defended variant; [] when the sweep defended nothing."""
    if data.empty or data.candidates.empty:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, variant in data.variants.iterrows():
        table = defend_table(variant, data.candidates)
        if table.empty:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        feasible = table[(table[FEASIBLE] == 1.0) & (table[names.STOPPED] != 1.0)]
        stopped = table[(table[FEASIBLE] == 1.0) & (table[names.STOPPED] == 1.0)]
        other = table[table[FEASIBLE] != 1.0]
        ax.scatter(feasible[DROP], feasible[OBJECTIVE], label="feasible candidates", color="tab:blue")
        if not stopped.empty:
            ax.scatter(stopped[DROP], stopped[OBJECTIVE], facecolors="none", edgecolors="tab:blue",
                       label="stopped by ASHA (probe estimate)")
        if not other.empty:
            ax.scatter(other[DROP], [0.0] * len(other), marker="x", color="grey",
                       label="infeasible (not attacked; drawn at 0)")
        chosen = table[table["chosen"]]
        ax.scatter(chosen[DROP], chosen[OBJECTIVE], s=160, facecolors="none", edgecolors="tab:red",
                   label="chosen")
        ax.axvline(variant["guard"], color="tab:red", linestyle=":", label=f"guard ({variant['guard']:g} points)")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("original-domain validation drop vs normal (points)")
        ax.set_ylabel("development worst case − scratch (points)")
        ax.set_title(f"{title} — defend {variant['variant']}: every candidate", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / f"defend-pareto-{variant['variant']}.png"))
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.plot(table["n"], table["best_found"], marker="o")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("candidates run")
        ax.set_ylabel("best feasible objective so far")
        ax.set_title(f"{title} — defend {variant['variant']}: best found after n candidates", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out / f"defend-found-{variant['variant']}.png"))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["Defends", "best_found", "defend_overview", "defend_section", "defend_table", "load_defends", "make_defend_figures"]
