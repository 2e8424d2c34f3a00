import math

import pytest

from sophon_ray.core.metrics import Cell, below_chance, chance, epochs_to_target, intactness_drop, overhead, summarise


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


def test_scratch_reaching_tau_before_training_counts_one_epoch_not_the_whole_budget():
    # scratch's tau = 0.9 x 9.3 = 8.37 is reached at epoch 0 (10%); so is the subject's: the ratio is 1, not 1/10
    result = overhead([10] + [6] * 10, [10] + [9.3] * 10)
    assert result.value == 1.0 and not result.censored
    # the subject needs 5 epochs where scratch needed none (counted as one): 5x more costly
    assert overhead([5, 5, 5, 5, 5, 9, 9], [10] + [9.3] * 6).value == 5.0


def test_intactness_drop_sign():
    assert intactness_drop(97.0, 95.5) == pytest.approx(1.5)


def test_summary_counts_on_accuracies_floored_at_chance():
    c = chance(10)
    cells = [Cell(protected=12, normal=60, scratch=20, chance=c),   # meaningful, held, gap 48
             Cell(protected=40, normal=45, scratch=30, chance=c),   # meaningful, not held, gap 5
             Cell(protected=5, normal=25, scratch=20, chance=c),    # not meaningful, held, leak; floored 10
             Cell(protected=30, normal=10, scratch=12, chance=c)]   # normal held, gap -20
    s = summarise(cells)
    assert s["cells"] == 4 and s["meaningful"] == 2
    assert s["share_held"] == 0.5 and s["normal_share_held"] == 0.25
    assert s["meaningful_share_held"] == 0.5 and s["meaningful_median_gap"] == 26.5
    assert s["min_gap"] == -20 and s["worst_case"] == 40 and s["leaks"] == 1
    assert s["median_gap"] == pytest.approx((5 + 15) / 2)     # gaps 48, 5, 15 (not 20: floored), -20
    assert s["best_scratch"] == 30 and s["best_normal"] == 60 and s["best_vs_scratch"] == 10


def test_below_chance_cells_earn_no_credit():
    # 3% on 10 classes counts as 10%: the gap to normal shrinks by 7 points, and the leak is counted
    cell = Cell(protected=3, normal=40, scratch=12, chance=10)
    assert cell.gap == 30 and cell.leak and cell.held
    assert Cell(protected=3, normal=40, scratch=12).gap == 37  # without a chance level nothing is floored


def test_no_meaningful_cells_gives_nan_not_a_crash():
    s = summarise([Cell(10, 10, 10, 10)])
    assert s["meaningful"] == 0 and math.isnan(s["meaningful_median_gap"])


def test_below_chance():
    assert below_chance(7.9, 10) and not below_chance(8.1, 10)
