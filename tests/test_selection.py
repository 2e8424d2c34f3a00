"""Checkpoint selection as a stated setting (``protect[i].select_tolerance`` / ``select_prefer``): the rule on
hand-made candidates (each test fails if the tolerance or the tie rule is ignored), the keys it keeps, validation
and its advisory, the reason a protection logs, and the report's intactness line."""

import dataclasses
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis.results import intactness_table
from analysis.runs import UNLOGGED_REASON
from sophon_ray import names
from sophon_ray.core.protection import Candidate, select, selection
from sophon_ray.run.checkpoint import CARD, FORMAT
from sophon_ray.run.keys import protect_key, sweep_id
from sophon_ray.run.outbox import Outbox
from sophon_ray.run.stages import log_models
from sophon_ray.run.validate import advisories, parse_spec
from sophon_ray.spec import ProtectSpec, SpecError, SweepSpec

# (iteration, original-domain validation score, worst-case probe score); the floor is 96
CANDIDATES = [Candidate(50, 99.0, 60.0, {}), Candidate(100, 97.0, 20.0, {}), Candidate(150, 98.5, 23.0, {}),
              Candidate(200, 80.0, 5.0, {})]
FLOOR = 96.0   # iteration 200 has the lowest probe of all but breaks the floor: never eligible here


def test_the_tolerance_decides_which_probe_scores_count_as_equal():
    assert select(CANDIDATES, FLOOR, tolerance=5.0, prefer="original").iteration == 150    # 23 is within 5 of 20
    assert select(CANDIDATES, FLOOR, tolerance=2.0, prefer="original").iteration == 100    # ... not within 2
    assert select(CANDIDATES, FLOOR, tolerance=0.0, prefer="original").iteration == 100
    assert select(CANDIDATES, FLOOR, tolerance=50.0, prefer="original").iteration == 50    # all three tie


def test_the_tie_rule_decides_among_equals():
    for tolerance in (0.0, 5.0, 50.0):   # protection: the lowest probe, whatever the tolerance
        assert select(CANDIDATES, FLOOR, tolerance, prefer="protection").iteration == 100
    assert select(CANDIDATES, FLOOR, 5.0, prefer="original").iteration == 150
    # equal probe scores under protection: the better original score, then the later iteration
    equal = [Candidate(10, 97.0, 20.0, {}), Candidate(20, 98.0, 20.0, {}), Candidate(30, 98.0, 20.0, {})]
    assert select(equal, FLOOR, 5.0, prefer="protection").iteration == 30
    with pytest.raises(ValueError, match="select_prefer 'latest'.*original, protection"):
        select(CANDIDATES, FLOOR, 5.0, prefer="latest")


def test_the_selection_says_why_and_what_it_cost():
    tied = selection(CANDIDATES, FLOOR, 5.0, "original")
    assert (tied.chosen.iteration, tied.best.iteration, tied.eligible, tied.tied) == (150, 100, 3, 2)
    assert tied.probe_cost == pytest.approx(3.0) and tied.floor_met
    assert tied.reason == ("best original 98.5 of the 2 within 5 of the lowest probe 20.0 (iteration 100, original "
                           "97.0) of 3 probed state(s) at or above the floor 96.0: 3.0 probe points less protected "
                           "(select_tolerance 5, select_prefer original)")
    lowest = selection(CANDIDATES, FLOOR, 5.0, "protection")
    assert lowest.chosen is lowest.best and lowest.probe_cost == 0
    assert lowest.reason == "lowest probe 20.0 of 3 probed state(s) at or above the floor 96.0 (select_prefer protection)"
    same = selection(CANDIDATES, FLOOR, 2.0, "original")   # the lowest probe is also the best original of its band
    assert same.probe_cost == 0 and same.reason.startswith("lowest probe 20.0 of 3 probed state(s)")
    unmet = selection(CANDIDATES, 100.0, 5.0, "protection")   # no state meets the floor: all are eligible
    assert unmet.chosen.iteration == 200 and not unmet.floor_met and unmet.eligible == 4
    assert "no probed state met the floor 100.0, so among all 4" in unmet.reason
    assert all("|" not in s.reason for s in (tied, lowest, same, unmet))   # a markdown table cell


def test_the_defaults_are_the_old_rule_and_change_no_key():
    assert (ProtectSpec().select_tolerance, ProtectSpec().select_prefer) == (5.0, "original")
    spec = SweepSpec()
    with_default = dataclasses.replace(spec, protect=(dataclasses.replace(spec.protect[0], select_tolerance=5,
                                                                          select_prefer="original"),))
    assert protect_key(with_default, 0, 0) == protect_key(spec, 0, 0) and sweep_id(with_default) == sweep_id(spec)
    for change in ({"select_prefer": "protection"}, {"select_tolerance": 2.0}):
        other = dataclasses.replace(spec, protect=(dataclasses.replace(spec.protect[0], **change),))
        assert protect_key(other, 0, 0) != protect_key(spec, 0, 0) and sweep_id(other) != sweep_id(spec)


def test_validation_refuses_bad_settings_and_warns_about_the_default():
    with pytest.raises(SpecError) as err:
        parse_spec({"protect": [{"select_prefer": "protect", "select_tolerance": -1}]})
    text = str(err.value)
    assert "protect.0.select_prefer: unknown rule 'protect' (did you mean 'protection'?)" in text
    assert "protect.0.select_tolerance: must be >= 0, got -1" in text

    def selection_warnings(variant):
        return [w for w in advisories(parse_spec({"protect": [variant]})) if w.path.endswith("select_prefer")]

    [warning] = selection_warnings({})
    assert warning.path == "protect.0.select_prefer" and "less protected" in warning.message
    assert "select_prefer: protection" in warning.message
    assert selection_warnings({"select_prefer": "protection"}) == []
    assert selection_warnings({"select_tolerance": 0}) == []


def test_a_protection_selects_by_its_spec_and_its_card_says_why(tmp_path):
    """protect_variant (what a Ray Train worker runs) on a tiny pair: the spec's rule picks the state, the card holds
    the reason and the cost metrics, and log_models tags the protect run with the reason."""
    import torch

    from sophon_ray.core.data import make_splits
    from sophon_ray.run.checkpoint import initial_model
    from sophon_ray.run.train_driver import protect_job
    from sophon_ray.run.train_worker import protect_variant

    torch.manual_seed(0)
    data = {"original": {"dataset": "shapes", "image_size": 16, "train_size": 120, "test_size": 40},
            "restricted": [{"dataset": "shapes_m", "image_size": 16, "train_size": 120, "test_size": 40}],
            "pretrain": {"epochs": 1},
            "protect": [{"iterations": 3, "inner_steps": 1, "batch_size": 8, "eval_every": 1, "probe_every": 1,
                         "probe_epochs": 1, "select_drop": 1000, "max_drop": 1000, "select_prefer": "protection",
                         "probes": [{"strategy": "direct-all", "optimizer": "sgd", "lr": 1e-3, "batch_size": 16,
                                     "data_fraction": 0.5}]}],
            "attack": {"evaluation": {"strategy": ["direct-all"], "lr": [1e-2]}}}
    spec = parse_spec(data)
    splits = make_splits(spec)
    normal, _ = initial_model(spec)
    job = protect_job(spec, 0, 0, protect_key(spec, 0, 0))
    _, metrics, card = protect_variant(spec, normal, splits, job, normal_acc=50.0)
    assert card["metrics"] == metrics                                   # what the worker reports and logs
    assert metrics[names.SELECT_PROBE_COST] == 0.0                      # the lowest probe, by the spec's rule
    assert metrics[names.SELECT_BEST_ITERATION] == metrics["selected_iteration"]
    assert card[names.SELECTED_REASON].startswith("lowest probe ") and "select_prefer protection" in card[
        names.SELECTED_REASON]

    tied = dataclasses.replace(spec, protect=(dataclasses.replace(spec.protect[0], select_prefer="original",
                                                                  select_tolerance=1000.0),))
    _, tied_metrics, tied_card = protect_variant(tied, normal, splits, protect_job(tied, 0, 0, "k"), 50.0)
    assert "select_tolerance 1000, select_prefer original" in tied_card[names.SELECTED_REASON]
    assert tied_metrics[names.SELECT_PROBE_COST] >= 0.0

    # log_models: the reason becomes the protect run's tag; a card without one (an older checkpoint) sets none
    tracker = SimpleNamespace(finished_keys=lambda *a: set())
    outbox = Outbox(None)   # never started: what log_models journals stays queued
    dirs = {}
    for name, extra in (("normal", {}), (f"protect/{spec.protect[0].label}/s0", {names.SELECTED_REASON: "why"}),
                        ("protect/old/s0", {})):
        d = tmp_path / name.replace("/", "_")
        d.mkdir()
        (d / CARD).write_text(json.dumps({"format": FORMAT, "spec_hash": name, "metrics": {}, **extra}))
        dirs[name] = d
    log_models(SimpleNamespace(spec=spec, tracker=tracker, sweep_id="sid", parent="parent"), outbox,
               dirs.pop("normal"), dirs)
    ops = outbox.queued()
    tags = [(op.key, op.data["tag"], op.data["value"]) for op in ops if op.kind == "tag"]
    assert tags == [(f"protect-protect/{spec.protect[0].label}/s0", names.SELECTED_REASON, "why")]
    assert {op.key for op in ops if op.kind == "finish"} == {f"{role}-{name}" for role, name in (
        ("pretrain", "normal"), ("protect", f"protect/{spec.protect[0].label}/s0"), ("protect", "protect/old/s0"))}


def test_the_report_says_which_iteration_and_why():
    protect = pd.DataFrame([
        {names.VARIANT: "ice", names.PROTECT_SEED: 0, "original_val": 94.0, "original_test": 93.0,
         "selected_iteration": 150.0, "rollbacks": 0.0, names.SELECTED_REASON: "best original 98.5 of the 2 within 5"},
        {names.VARIANT: "ice", names.PROTECT_SEED: 1, "original_val": 94.0, "original_test": 92.0,
         "selected_iteration": 100.0, "rollbacks": 1.0, names.SELECTED_REASON: UNLOGGED_REASON}])
    table = intactness_table(protect, 95.0)
    assert table.splitlines()[0].endswith("| selected iteration | rollbacks | why this iteration |")
    assert "| ice | 0 | 94.0 | 93.0 | +2.0 | 150 | 0 | best original 98.5 of the 2 within 5 |" in table
    assert f"| ice | 1 | 94.0 | 92.0 | +3.0 | 100 | 1 | {UNLOGGED_REASON} |" in table
    assert "select_tolerance 5, select_prefer original" in UNLOGGED_REASON   # an older run says its rule
    # a table without the column at all (a caller's own frame) reads as older runs
    assert UNLOGGED_REASON in intactness_table(protect.drop(columns=[names.SELECTED_REASON]), 95.0)
