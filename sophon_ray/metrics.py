"""Metric definitions (the README's 'Metrics' section quotes these docstrings).

All accuracies are percentages; gaps are in points.
"""

from __future__ import annotations

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
    """Overhead ratio for one cell (epochs counted from 1, so reaching tau before training costs 1)."""
    tau = target_accuracy(scratch_curve[-1])
    budget = len(subject_curve) - 1
    scratch_epochs = max(1, epochs_to_target(scratch_curve, tau) or budget)
    subject_epochs = epochs_to_target(subject_curve, tau)
    if subject_epochs is None:
        return Overhead(budget / scratch_epochs, censored=True)
    return Overhead(max(1, subject_epochs) / scratch_epochs, censored=False)


@dataclass(frozen=True)
class Cell:
    """Final restricted accuracies of one attack cell (same strategy, optimizer, lr, batch, seed)."""

    protected: float
    normal: float
    scratch: float

    @property
    def meaningful(self) -> bool:
        """Pretraining clearly helps the attacker here: normal > scratch + 5 points."""
        return self.normal > self.scratch + MEANINGFUL_GAP

    @property
    def held(self) -> bool:
        """Protection holds: protected <= scratch + 1 point."""
        return self.protected <= self.scratch + HOLD_MARGIN

    @property
    def normal_held(self) -> bool:
        """The unprotected model already sits at or below scratch + 1 (the reference share)."""
        return self.normal <= self.scratch + HOLD_MARGIN

    @property
    def gap(self) -> float:
        """normal - protected (points): what protection took away from the attacker."""
        return self.normal - self.protected


def below_chance(accuracy: float, num_classes: int) -> bool:
    """Accuracy more than 2 points under chance (100 / C): the model's errors carry label information."""
    return accuracy < 100.0 / num_classes - BELOW_CHANCE_MARGIN


def summarise(cells: Sequence[Cell], num_classes: int) -> dict[str, float]:
    """Robustness of one protected model over a grid of cells.

    worst_case: max protected accuracy; share_held: share of cells with protected <= scratch + 1, next
    to normal_share_held (the unprotected model's own share); on meaningful cells: their count, the
    share held and the median gap; min_gap: the minimum of normal - protected over all cells (< 0 means
    protection made fine-tuning easier there); below_chance: cells where protected is under chance.
    """
    meaningful = [c for c in cells if c.meaningful]
    nan = float("nan")
    return {
        "cells": len(cells),
        "worst_case": max(c.protected for c in cells),
        "share_held": sum(c.held for c in cells) / len(cells),
        "normal_share_held": sum(c.normal_held for c in cells) / len(cells),
        "meaningful": len(meaningful),
        "meaningful_share_held": sum(c.held for c in meaningful) / len(meaningful) if meaningful else nan,
        "meaningful_median_gap": statistics.median(c.gap for c in meaningful) if meaningful else nan,
        "median_gap": statistics.median(c.gap for c in cells),
        "min_gap": min(c.gap for c in cells),
        "below_chance": sum(below_chance(c.protected, num_classes) for c in cells),
    }
