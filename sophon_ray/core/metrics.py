"""Metric definitions, one each, used by every report (the README's 'Metrics' section quotes them).

All accuracies are percentages; gaps are in points. Torch-free: ``analysis/`` imports it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

TARGET_SHARE = 0.9      # tau = 0.9 x scratch's final accuracy in the same cell
HOLD_MARGIN = 1.0       # a cell "holds" when protected <= scratch + 1 point
MEANINGFUL_GAP = 5.0    # a cell is "meaningful" when normal > scratch + 5 points
BELOW_CHANCE_MARGIN = 2.0


def intactness_drop(normal_acc: float, protected_acc: float) -> float:
    """Original-domain accuracy lost to protection: normal - protected (points; > 0 is a loss)."""
    return normal_acc - protected_acc


def target_accuracy(scratch_final: float) -> float:
    """tau = 0.9 x the scratch model's final restricted accuracy in the same cell."""
    return TARGET_SHARE * scratch_final


def epochs_to_target(curve: Sequence[float], tau: float) -> int | None:
    """First epoch (0 = before fine-tuning) whose accuracy reaches tau; None when never reached."""
    return next((epoch for epoch, acc in enumerate(curve) if acc >= tau), None)


@dataclass(frozen=True)
class Overhead:
    """Fine-tuning cost of a subject relative to scratch: subject epochs / scratch epochs to reach tau.

    ``censored`` means the subject never reached tau within the budget, so the true ratio is at least
    ``value`` (= budget / scratch epochs).
    """

    value: float
    censored: bool

    def __str__(self) -> str:
        return f">={self.value:.1f}" if self.censored else f"{self.value:.2f}"


def overhead(subject_curve: Sequence[float], scratch_curve: Sequence[float]) -> Overhead:
    """Overhead ratio for one cell: epochs for the subject to reach tau / epochs for scratch, both counted from
    1 (reaching tau before any training costs one epoch, for scratch as for the subject); censored at
    ``budget / scratch epochs`` when the subject never reaches tau. Scratch always reaches its own tau (0.9 x its
    final accuracy) by its last epoch at the latest."""
    tau = target_accuracy(scratch_curve[-1])
    budget = len(subject_curve) - 1
    scratch_reached = epochs_to_target(scratch_curve, tau)
    scratch_epochs = max(1, budget if scratch_reached is None else scratch_reached)
    subject_epochs = epochs_to_target(subject_curve, tau)
    if subject_epochs is None:
        return Overhead(max(1, budget) / scratch_epochs, censored=True)
    return Overhead(max(1, subject_epochs) / scratch_epochs, censored=False)


def chance(num_classes: int) -> float:
    """Chance accuracy, %: 100 / C."""
    return 100.0 / num_classes


def below_chance(accuracy: float, num_classes: int) -> bool:
    """Accuracy more than 2 points under chance (100 / C): the model's errors carry label information."""
    return accuracy < chance(num_classes) - BELOW_CHANCE_MARGIN


@dataclass(frozen=True)
class Cell:
    """Final restricted accuracies of one attack cell (seed means of the same recipe and domain), and the
    chance level. Every comparison uses accuracies *floored at chance*: an attack that ends below chance did
    not fail harder than one at chance (its errors leak label information instead), so it earns no credit."""

    protected: float
    normal: float
    scratch: float
    chance: float = 0.0

    def floor(self, accuracy: float) -> float:
        return max(accuracy, self.chance)

    @property
    def meaningful(self) -> bool:
        """Pretraining clearly helps the attacker here: normal > scratch + 5 points."""
        return self.floor(self.normal) > self.floor(self.scratch) + MEANINGFUL_GAP

    @property
    def held(self) -> bool:
        """Protection holds: protected <= scratch + 1 point."""
        return self.floor(self.protected) <= self.floor(self.scratch) + HOLD_MARGIN

    @property
    def normal_held(self) -> bool:
        """The unprotected model already sits at or below scratch + 1 (the reference share)."""
        return self.floor(self.normal) <= self.floor(self.scratch) + HOLD_MARGIN

    @property
    def gap(self) -> float:
        """normal - protected (points): what protection took away from the attacker."""
        return self.floor(self.normal) - self.floor(self.protected)

    @property
    def leak(self) -> bool:
        """Protected ends more than 2 points under chance: a label-information leak, reported, never credited."""
        return self.protected < self.chance - BELOW_CHANCE_MARGIN


def summarise(cells: Sequence[Cell]) -> dict[str, float]:
    """Robustness of one protected model over a grid of cells (accuracies floored at chance).

    worst_case: the best attack on the protected model (max protected accuracy), next to best_normal and
    best_scratch (the best attack on each baseline, which may be another cell) and best_vs_scratch =
    worst_case - best_scratch (> 0: the attacker's best recipe on the protected model beats its best recipe
    from scratch, so the protection does not hold at grid level); share_held: share of cells with protected
    <= scratch + 1, next to normal_share_held (the unprotected model's own share); on meaningful cells: their
    count, the share held and the median gap; min_gap: the minimum of normal - protected over all cells (< 0
    means protection made fine-tuning easier there); leaks: cells where protected is under chance.
    """
    meaningful = [c for c in cells if c.meaningful]
    nan = float("nan")
    best_protected = max(c.floor(c.protected) for c in cells)
    best_scratch = max(c.floor(c.scratch) for c in cells)
    return {
        "cells": len(cells),
        "worst_case": best_protected,
        "best_normal": max(c.floor(c.normal) for c in cells),
        "best_scratch": best_scratch,
        "best_vs_scratch": best_protected - best_scratch,
        "share_held": sum(c.held for c in cells) / len(cells),
        "normal_share_held": sum(c.normal_held for c in cells) / len(cells),
        "meaningful": len(meaningful),
        "meaningful_share_held": sum(c.held for c in meaningful) / len(meaningful) if meaningful else nan,
        "meaningful_median_gap": statistics.median(c.gap for c in meaningful) if meaningful else nan,
        "median_gap": statistics.median(c.gap for c in cells),
        "min_gap": min(c.gap for c in cells),
        "leaks": sum(c.leak for c in cells),
    }


INFEASIBLE = 100.0   # a defender candidate over its guard: this plus its drop (worse than any feasible one)


def defend_objective(worst_case: float, scratch_best: float, drop: float, guard: float) -> tuple[float, bool]:
    """(objective, feasible): the development worst case minus scratch's best when the candidate's
    original-domain drop is within ``guard``; else INFEASIBLE plus the drop."""
    if drop > guard or not math.isfinite(drop):
        return INFEASIBLE + (drop if math.isfinite(drop) else INFEASIBLE), False
    return worst_case - scratch_best, True


def defend_protects(objective: float, unprotected: float) -> bool:
    """Whether a defender candidate's objective beats the unprotected model's own (normal's best development attack
    minus scratch's) by more than the hold margin: a feasible candidate can still be no protection at all (one that
    rolled back to its start is the normal model)."""
    return objective < unprotected - HOLD_MARGIN
