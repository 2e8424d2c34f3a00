"""Defence-aware attack families (docs/attacks.md): on each grid, how much of the gap between training from scratch
and fine-tuning the unprotected model each family of attacks recovers on every protected model, per protection
seed, and which families break which protections.

A recipe's family is the recipe table's (``TABLE.family``: ``shrink``, ``shrink + perturb``, ``adapt entropy``,
``warm start original``, ...; ``plain`` for ordinary fine-tuning). Every family is compared on the same footing:
its own cells on the three subjects, so scratch gets the same treatment (a warm start on the original domain
is pretraining the attacker does itself). ``plain`` is restricted to the base recipes the families were run on,
so every row of a grid answers for the same recipes. Pure pandas on the attack table of ``analysis.runs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from analysis.runs import CELL_KEYS, WHERE, on_grids
from sophon_ray import names
from sophon_ray.core.metrics import HOLD_MARGIN
from sophon_ray.recipes import PLAIN, SETTINGS, TABLE

FAMILY = "family"
FAMILY_SETTINGS = tuple(n for n, s in SETTINGS.items() if s.family)
COLUMNS = [*WHERE, "variant", names.PROTECT_SEED, FAMILY, "cells", "protected", "normal", "scratch", "recovered",
           "held"]


def with_families(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``family`` column and a ``base`` column (the recipe with every family setting at its
    default: the ordinary fine-tuning it starts from)."""
    out = runs.copy()
    out[FAMILY] = [TABLE.family(row) for row in out[list(CELL_KEYS)].to_dict("records")]
    base_keys = [k for k in CELL_KEYS if k not in FAMILY_SETTINGS and k != "strategy"]
    out["base"] = list(zip(*(out[k] for k in ["strategy", *base_keys])))
    scratch = out[names.SUBJECT] == "scratch"
    # scratch ran once per recipe without strategy: its base matches any strategy's
    out.loc[scratch, "base"] = pd.Series([b[1:] for b in out.loc[scratch, "base"]], index=out.index[scratch],
                                         dtype=object)
    return out


def _on_family_bases(section: pd.DataFrame) -> pd.DataFrame:
    """The section's runs on the base recipes the non-plain families were run on (plain cells elsewhere dropped)."""
    informed = section[section[FAMILY] != PLAIN]
    bases = set(informed["base"])
    short = {b[1:] for b in bases}
    keep = [row_base in (short if subject == "scratch" else bases)
            for row_base, subject in zip(section["base"], section[names.SUBJECT])]
    return section[keep]


def _best(runs: pd.DataFrame, chance_level: float) -> float:
    """The best recipe's attack-seed-mean final score (floored at chance), NaN for no runs."""
    if runs.empty:
        return math.nan
    means = runs.groupby(list(CELL_KEYS), dropna=False)["final"].mean()
    return max(float(means.max()), chance_level)


def recovered(protected: float, normal: float, scratch: float) -> float:
    """Share (%) of the gap between scratch and normal the attack recovers on the protected model: 0 as hard as
    scratch, 100 as easy as the unprotected model; NaN where normal is not above scratch + 1 (no gap to speak
    of)."""
    gap = normal - scratch
    return 100.0 * (protected - scratch) / gap if gap > HOLD_MARGIN else math.nan


def family_rows(runs: pd.DataFrame, chance_level: float, grids: Sequence[str] = names.CELL_GRIDS) -> pd.DataFrame:
    """One row per (grid, domain, variant, protection seed, family) of every grid that ran a defence-aware
    family: the family's best recipe on the protected model, on normal and on scratch (each the max over the
    family's cells of the attack-seed mean, floored at chance), ``recovered`` (:func:`recovered`) and ``held``
    (protected <= scratch + 1). Empty when no grid ran one."""
    runs = on_grids(runs, grids)
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    runs = with_families(runs)
    rows = []
    for where, section in runs.groupby(list(WHERE), sort=False):
        if (section[FAMILY] == PLAIN).all():
            continue
        section = _on_family_bases(section)
        for family, fam in section.groupby(FAMILY, sort=False):
            normal = _best(fam[fam[names.SUBJECT] == "normal"], chance_level)
            scratch = _best(fam[fam[names.SUBJECT] == "scratch"], chance_level)
            protected = fam[fam[names.SUBJECT] == "protected"]
            for (variant, seed), model in protected.groupby(["variant", names.PROTECT_SEED], sort=True):
                best = _best(model, chance_level)
                rows.append([*where, variant, seed, family, model.drop_duplicates(list(CELL_KEYS)).shape[0], best,
                             normal, scratch, recovered(best, normal, scratch), best <= scratch + HOLD_MARGIN])
    return pd.DataFrame(rows, columns=COLUMNS)


def family_order(families: Sequence[str]) -> list[str]:
    """``plain`` first, then the families in the recipe table's order of their settings."""
    def rank(family: str) -> tuple[int, str]:
        first = family.split(" + ")[0].split(" ")[0]
        order = [SETTINGS[n].family.split(" ")[0] for n in FAMILY_SETTINGS]
        return (-1 if family == PLAIN else order.index(first) if first in order else len(order), family)

    return sorted(set(families), key=rank)


__all__ = ["FAMILY", "FAMILY_SETTINGS", "family_order", "family_rows", "recovered", "with_families"]
