import math

import pytest

from sophon_ray.metrics import Cell, below_chance, epochs_to_target, intactness_drop, overhead, summarise


def test_epochs_to_target_and_overhead():
    scratch = [10, 30, 50, 60, 70]              # tau = 63 -> reached at epoch 4
    protected_slow = [10, 12, 14, 20, 65]       # epoch 4 -> ratio 1.0
    protected_never = [10, 11, 12, 13, 14]
    normal_fast = [10, 64, 70, 80, 90]           # epoch 1 -> 0.25
    assert epochs_to_target(scratch, 63) == 4 and epochs_to_target(protected_never, 63) is None
    assert overhead(protected_slow, scratch).value == 1.0
    assert overhead(normal_fast, scratch).value == 0.25
    never = overhead(protected_never, scratch)
    assert never.censored and never.value == 1.0 and str(never) == ">=1.0"


def test_intactness_drop_sign():
    assert intactness_drop(97.0, 95.5) == pytest.approx(1.5)


def test_summary_counts():
    cells = [Cell(protected=10, normal=60, scratch=20),   # meaningful, held, gap 50
             Cell(protected=40, normal=45, scratch=30),   # meaningful, not held
             Cell(protected=5, normal=25, scratch=20),    # not meaningful, held, below chance
             Cell(protected=30, normal=10, scratch=12)]   # normal held, gap -20
    s = summarise(cells, num_classes=10)
    assert s["cells"] == 4 and s["meaningful"] == 2
    assert s["share_held"] == 0.5 and s["normal_share_held"] == 0.25
    assert s["meaningful_share_held"] == 0.5 and s["meaningful_median_gap"] == 27.5
    assert s["min_gap"] == -20 and s["worst_case"] == 40 and s["below_chance"] == 1


def test_no_meaningful_cells_gives_nan_not_a_crash():
    s = summarise([Cell(10, 10, 10)], 10)
    assert s["meaningful"] == 0 and math.isnan(s["meaningful_median_gap"])


def test_below_chance():
    assert below_chance(7.9, 10) and not below_chance(8.1, 10)
