"""The defender search's pure parts: a candidate from sampled values, the space as Optuna dimensions, the objective
under the capability guard, the probe estimate, the choice, validation (field and fix), the dry-run line, and the
walls: a defender trial gets development data and the development grid only (each shown failing with the leak put
in: the attacker's pool or the test split in its data, the evaluation grid as its recipes)."""

from __future__ import annotations

import hashlib
import math

import optuna
import pytest

from sophon_ray.core.data import make_splits
from sophon_ray.core.metrics import INFEASIBLE
from sophon_ray.core.metrics import defend_objective as objective
from sophon_ray.core.metrics import defend_protects as protects
from sophon_ray.run.defend import (DROP, FEASIBLE, LAST, OBJECTIVE, DefineByRun, candidate, candidate_key, choose,
                                   dimensions, final_step)
from sophon_ray.run.development import development_data, probe_report
from sophon_ray.run.plan import development_configs, plan_trials
from sophon_ray.run.texts import dry_run_text
from sophon_ray.run.validate import parse_spec
from sophon_ray.spec import ProtectSpec, SpecError

DEFEND = {"num_samples": 4, "guard": 2.0,
          "space": {"alpha": {"distribution": "loguniform", "low": 1.0, "high": 10.0}, "inner_steps": [10, 30],
                    "ntr_steps": [2], "env_optimizers": [["sgd"], ["sgd", "momentum", "adam"]],
                    "env_lr_low": [1e-3], "env_lr_high": [3e-2, 1e-4]}}
SPEC = {
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 8, "train_size": 200, "test_size": 50},
    "restricted": [{"dataset": "shapes_m", "image_size": 8, "train_size": 400, "test_size": 100}],
    "protect": [{"name": "d", "iterations": 40, "probe_every": 10, "seeds": [0, 1, 2], "defend": DEFEND}],
    "attack": {"development": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [3e-3]}],
               "evaluation": [{"strategy": ["initfc-all"], "optimizer": ["adam"], "lr": [1e-3]}]},
}


@pytest.fixture(scope="module")
def spec():
    return parse_spec(SPEC)


def test_a_candidate_is_the_variant_with_the_sampled_values_one_seed_and_no_defend_block(spec):
    base = spec.protect[0]
    values = {**base.defend.space.fixed(), "alpha": 4.0, "inner_steps": 30, "env_optimizers": "sgd+momentum+adam",
              "env_lr_high": 1e-4}
    c = candidate(base, values, seed=7)
    assert (c.alpha, c.inner_steps, c.ntr_steps, c.seeds, c.defend) == (4.0, 30, 2, (7,), None)
    assert c.environments.optimizers == ("sgd", "momentum", "adam")
    assert c.environments.lr == (1e-4, 1e-3)                     # the ends sorted
    assert (c.iterations, c.beta, c.name) == (base.iterations, base.beta, base.name)
    assert candidate_key(c) == candidate_key(candidate(base, values, seed=7))
    assert candidate_key(c) != candidate_key(candidate(base, {**values, "alpha": 4.5}, seed=7))
    assert candidate_key(c) != candidate_key(candidate(base, values, seed=8))


def test_the_space_searches_what_has_several_values_and_fixes_the_rest(spec):
    space = spec.protect[0].defend.space
    dims = dimensions(space)
    assert set(dims) == {"alpha", "inner_steps", "env_optimizers", "env_lr_high"} and dims["alpha"].log
    assert dims["env_optimizers"].choices == ("sgd", "sgd+momentum+adam")
    assert space.fixed() == {"ntr_steps": 2, "env_lr_low": 1e-3}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        DefineByRun(space)(trial)
        assert 1.0 <= trial.params["alpha"] <= 10.0 and trial.params["inner_steps"] in (10, 30)
        study.tell(trial, 0.0)


def test_the_objective_is_the_development_worst_case_minus_scratch_under_the_guard():
    assert objective(40.0, 35.0, drop=1.5, guard=2.0) == (5.0, True)
    assert objective(40.0, 35.0, drop=-0.5, guard=2.0) == (5.0, True)      # better than normal: fine
    value, feasible = objective(12.0, 35.0, drop=3.0, guard=2.0)         # wrecked the original task
    assert not feasible and value == INFEASIBLE + 3.0 and value > objective(100.0, 10.0, 0.0, 2.0)[0]
    assert not objective(12.0, 35.0, drop=math.nan, guard=2.0)[1]


def test_a_probe_reports_its_estimate_and_only_at_probe_rows():
    assert probe_report({"fts_loss": 1.0}, 90.0, 30.0, 2.0, "probe_acc", "original_acc") is None
    est = probe_report({"probe_acc": 33.0, "original_acc": 89.0}, 90.0, 30.0, 2.0, "probe_acc", "original_acc")
    assert est == {OBJECTIVE: 3.0, FEASIBLE: 1.0, "probe_acc": 33.0, DROP: 1.0}   # the drop: for a candidate ASHA stops
    bad = probe_report({"probe_acc": 10.0, "original_acc": 80.0}, 90.0, 30.0, 2.0, "probe_acc", "original_acc")
    assert bad[FEASIBLE] == 0.0 and bad[OBJECTIVE] == INFEASIBLE + 10.0 and bad[DROP] == 10.0


def test_the_choice_is_the_best_feasible_candidate_ties_to_the_gentler_one():
    done = [({"alpha": 1}, 3.0, "a", {FEASIBLE: 1.0, DROP: 1.5, LAST: 1.0}),
            ({"alpha": 2}, -9.0, "b", {FEASIBLE: 0.0, LAST: 1.0}),
            ({"alpha": 3}, 3.0, "c", {FEASIBLE: 1.0, DROP: 0.5, LAST: 1.0}),
            ({"alpha": 4}, 5.0, "d", {FEASIBLE: 1.0, DROP: 0, LAST: 1.0}),
            ({"alpha": 5}, -5.0, "e", {FEASIBLE: 1.0, DROP: 0})]          # stopped by ASHA: a probe estimate only
    assert choose(done)[2] == "c"
    assert choose([d for d in done if d[2] in ("b", "e")]) is None
    # a feasible candidate can still be no protection: one that rolled back to its start is the normal model
    assert protects(1.0, unprotected=29.0) and not protects(29.1, unprotected=29.0)
    assert not protects(28.5, unprotected=29.0)   # within the 1-point hold margin of the unprotected model


def test_asha_ends_a_candidate_one_step_after_its_longest_protection(spec):
    assert final_step(spec.protect[0]) == 41
    longer = parse_spec({**SPEC, "protect": [{**SPEC["protect"][0], "defend": {
        **DEFEND, "space": {**DEFEND["space"], "iterations": [40, 80]}}}]})
    assert final_step(longer.protect[0]) == 81


def test_validation_names_the_field_and_the_fix():
    def problems(defend: dict) -> str:
        with pytest.raises(SpecError) as err:
            parse_spec({**SPEC, "protect": [{**SPEC["protect"][0], "defend": defend}]})
        return str(err.value)

    assert "protect.0.defend.space.learning_rate: unknown key" in problems({"space": {"learning_rate": [1e-3]}})
    text = problems({"space": {"alpha": {"distribution": "uniform", "low": -1.0, "high": 3.0}, "inner_steps": [0]}})
    assert "protect.0.defend.space.alpha.low: -1.0 is not a valid value of protect.alpha: must be >= 0" in text
    assert "protect.0.defend.space.inner_steps.0: 0 is not a valid value of protect.inner_steps" in text
    assert "protect.0.defend.space.env_optimizers.0: ('lion',) is not a valid value" in problems(
        {"space": {"env_optimizers": [["lion"]]}})
    assert "protect.0.defend.objective: objective 'evaluation' would choose the protection on evaluation data" in \
        problems({"objective": "evaluation"})
    assert "protect.0.defend: a defender search scores candidates on the development grid" in str(
        pytest.raises(SpecError, parse_spec, {**SPEC, "attack": {"evaluation": SPEC["attack"]["evaluation"]}}).value)


def test_dry_run_states_the_defender_budget(spec):
    text = dry_run_text(spec, plan_trials(spec, [("d", s) for s in (0, 1, 2)]))
    assert ("defend d: tpe (4 random first) + ASHA over probe checkpoints, 4 candidates x (1 protection of at most "
            "40 iterations + 1 development attacks), 1 at once; searches inner_steps, alpha, env_optimizers, "
            "env_lr_high; sets ntr_steps, env_lr_low; objective: development worst case minus scratch, guard 2 "
            "points; then 3 protection(s) of the chosen setting") in text


def test_a_defend_block_leaves_the_sweep_id_of_a_spec_without_one_alone():
    from sophon_ray.run.keys import sweep_id

    assert ProtectSpec().defend is None
    plain = {"restricted": [{"dataset": "shapes_m"}], "protect": [{"name": "d"}]}
    assert sweep_id(parse_spec(plain)) == "68382dc0093f"  # the id this spec had before the defend field existed
    dev = {"attack": {"development": [{"strategy": ["direct-all"]}]}}
    assert sweep_id(parse_spec({**plain, **dev, "protect": [{"name": "d", "defend": {}}]})) != sweep_id(
        parse_spec({**plain, **dev}))


# ------------------------------------------------------------------------------------------------ the walls
def _prints(dataset) -> set[str]:
    return {hashlib.sha1(dataset[i][0].numpy().tobytes()).hexdigest() for i in range(len(dataset))}


def test_a_defender_trial_gets_the_protectors_data_only(spec):
    splits = make_splits(spec)
    data = development_data(splits)
    seen = set().union(*(_prints(d) for d in (*data.restricted_train, *data.restricted_val)))
    assert seen and not seen & (_prints(splits.restricted_attacker[0]) | _prints(splits.restricted_test[0]))
    assert not _prints(data.original_val) & _prints(splits.original_test)


def test_a_defender_trial_attacks_with_the_development_grid_only(spec):
    configs = development_configs(spec)
    assert [(c.strategy, c.optimizer, c.lr) for c in configs] == [("direct-all", "sgd", 3e-3)]
    evaluation = {(t.config.strategy, t.config.optimizer) for t in plan_trials(spec, [("d", 0)])
                  if t.grid == "evaluation"}
    assert not {(c.strategy, c.optimizer) for c in configs} & evaluation


def test_the_report_table_marks_stopped_and_infeasible_candidates_and_the_best_after_n():
    import pandas as pd

    from analysis.defend import Defends, defend_overview, defend_section
    from sophon_ray import names

    variants = pd.DataFrame([{"run_id": "p", "variant": "d", "guard": 2.0, "chosen": "k3",
                              "dev_best_scratch": 30.0, "dev_best_normal": 60.0}])
    candidates = pd.DataFrame([
        {"parent": "p", "n": 1, "param:candidate": "k1", "param:alpha": "2.0", OBJECTIVE: 6.0, FEASIBLE: 1.0,
         names.STOPPED: 0.0, names.DEV_WORST_CASE: 36.0, DROP: 0.5, "iteration": 41},
        {"parent": "p", "n": 2, "param:candidate": "k2", "param:alpha": "9.0", OBJECTIVE: 103.0, FEASIBLE: 0.0,
         names.STOPPED: 0.0, names.DEV_WORST_CASE: float("nan"), DROP: 3.0, "iteration": 41},
        {"parent": "p", "n": 3, "param:candidate": "k3", "param:alpha": "4.0", OBJECTIVE: 1.0, FEASIBLE: 1.0,
         names.STOPPED: 0.0, names.DEV_WORST_CASE: 31.0, DROP: 1.0, "iteration": 41},
        {"parent": "p", "n": 4, "param:candidate": "k4", "param:alpha": "5.0", OBJECTIVE: -4.0, FEASIBLE: 1.0,
         names.STOPPED: 1.0, DROP: 0.2, "iteration": 10},
        {"parent": "p", "n": 5, "param:candidate": "k5", "param:alpha": "8.0", OBJECTIVE: 103.5, FEASIBLE: 0.0,
         names.STOPPED: 1.0, DROP: float("nan"), "iteration": 10}])   # over the guard at its probe: drop from it
    text = defend_section(Defends(variants, candidates))
    assert "| 5 | 8 | n/a | +3.5 | infeasible | +1.0 |  |" in text
    assert "| 1 | 2 | 36.0 | +0.5 | +6.0 | +6.0 |  |" in text
    assert "| 2 | 9 | n/a | +3.0 | infeasible | +6.0 |  |" in text
    assert "| 3 | 4 | 31.0 | +1.0 | +1.0 | +1.0 | **chosen** |" in text
    assert "| 4 | 5 | n/a | +0.2 | stopped at 10 (est. -4.0) | +1.0 |  |" in text   # never the best found
    assert "3 of 5 candidates feasible, 2 stopped early by ASHA" in text
    assert defend_overview(Defends(variants, candidates)) == (
        "defend d: chose #3 (development worst case 31.0 vs scratch 30.0: +1.0) of 5 candidates (3 feasible, "
        "2 stopped by ASHA); development data only")
    unprotected = Defends(variants.assign(dev_best_normal=31.5), candidates)   # normal's objective +1.5
    assert "**The chosen candidate is no better than the unprotected model on the development grid** (+1.0 vs " \
        "+1.5): this search found no protection." in defend_section(unprotected)
    assert "no better than the unprotected model" not in text


def test_the_report_states_each_round_and_restarts_the_best_after_n():
    import pandas as pd

    from analysis.defend import Defends, defend_section
    from sophon_ray import names

    variants = pd.DataFrame([{"run_id": "p", "variant": "d", "guard": 2.0, "chosen": "k4",
                              "round_chosen": {1: "k1", 2: "k4"}, "dev_best_scratch": 30.0, "dev_best_normal": 60.0}])
    row = {"parent": "p", FEASIBLE: 1.0, names.STOPPED: 0.0, DROP: 0.5, "iteration": 41}
    candidates = pd.DataFrame([
        {**row, "n": 1, "param:candidate": "k1", "param:round": "1", OBJECTIVE: 2.0, names.RED_TEAM_BEST: 50.0},
        {**row, "n": 2, "param:candidate": "k2", "param:round": "1", OBJECTIVE: 5.0, names.RED_TEAM_BEST: 55.0},
        {**row, "n": 3, "param:candidate": "k3", "param:round": "2", OBJECTIVE: 9.0, names.RED_TEAM_BEST: 58.0},
        {**row, "n": 4, "param:candidate": "k4", "param:round": "2", OBJECTIVE: 7.0, names.RED_TEAM_BEST: 41.0}])
    text = defend_section(Defends(variants, candidates))
    assert "- round 1: 2 candidates, chose #1, objective +2.0, its red team's best 50.0" in text
    assert "- round 2: 2 candidates, chose #4, objective +7.0, its red team's best 41.0" in text
    assert "| 3 | 2 | n/a | +0.5 | +9.0 | +9.0 |  |" in text       # round 2's best after n starts again


def test_the_results_protocol_names_a_defended_variants_chosen_setting_and_its_simulated_attacker():
    import pandas as pd

    from analysis.results import protocol_section
    from sophon_ray import names

    chosen = {"name": "d", "loss": "ice", "iterations": 300, "inner_steps": 30, "base_lr": 1e-3, "alpha": 1.4023,
              "beta": 3.0, "ntr_steps": 3, "batch_size": 100, "seeds": [0, 1], "probe_epochs": 3, "probes": [],
              "environments": {"optimizers": ["sgd"], "lr": [1e-4, 1e-4],
                               "recipes": {"strategy": ["direct-all", "initfc-all"], "optimizer": ["sgd"],
                                           "lr": {"distribution": "loguniform", "low": 1e-4, "high": 3e-2}},
                               "known": [{"strategy": "initfc-all"}, {"optimizer": "rmsprop"}], "known_share": 0.5},
              "defended": True}
    plain = {**chosen, "name": "p", "alpha": 3.0, "beta": 1.0, "defended": False,
             "environments": {"optimizers": ["sgd", "adam"], "lr": [1e-3, 3e-2], "head_reinit": 0.5}}
    runs = pd.DataFrame([{names.GRID: "evaluation", "seed": 0, "subject": "normal", names.DATA_POOL: "disjoint",
                          **{k: 0 for k in ("strategy", "optimizer", "lr")}}])
    from analysis.runs import CELL_KEYS

    runs = runs.assign(**{k: 0 for k in CELL_KEYS if k not in runs})
    text = protocol_section({"attack": {"evaluation": []}, "protect": [chosen, plain]}, runs)
    assert ("**Protection `d`** (chosen by the defender search on development data: *Defender search* below): loss "
            "`ice`, 300 iterations, 30 inner steps, base lr 0.001, alpha 1.4, beta 3") in text
    assert ("simulated attacker: a recipe drawn from a space (strategy direct-all, initfc-all; lr loguniform "
            "0.0001..0.03), or one of 2 known recipes (the red team's finds) with probability 0.5") in text
    assert "**Protection `p`**: loss `ice`" in text and "simulated attacker: sgd, adam at lr 0.001-0.03, head re-init p 0.5" in text


def test_a_round_with_fewer_candidates_than_asked_chooses_nothing():
    """Ctrl-C stops Tune gracefully (tuner.fit() returns): a run once chose from the 2 of 8 candidates it had."""
    from sophon_ray.run.defend import DefendError, incomplete

    assert incomplete(8, 8, "protect.1.defend", "dos-defended") is None
    err = incomplete(2, 8, "protect.1.defend", "dos-defended")
    assert isinstance(err, DefendError) and "2 of 8 candidates" in str(err) and "--resume" in str(err)
