"""The adaptive attacker's pure parts: the space, the warm start, the attacker's pick, search templates and
numbering, the per-epoch running objective, and the search history read back from a real MLflow store."""

import optuna
import pytest

from sophon_ray import names
from sophon_ray.run.context import RunOptions
from sophon_ray.run.keys import protected_models
from sophon_ray.run.search_stage import search_history
from sophon_ray.run.texts import dry_run_text
from sophon_ray.run.search_space import DefineByRun, best_found, dimensions, searcher, warm_study
from sophon_ray.spec import Range, SearchSpace, SearchSpec
from sophon_ray.run.plan import plan_trials, search_budget, search_templates
from sophon_ray.run.trials_worker import EpochReporter
from sophon_ray.run.tune_driver import SearchNumbering
from sophon_ray.run.validate import parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPEC = {
    "restricted": [{"dataset": "shapes_m"}],
    "protect": [{"name": "a", "seeds": [0, 1]}],
    "attack": {"evaluation": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3]}],
               "search": [{"name": "s", "num_samples": 5, "space": {"epochs": [4, 8], "batch_size": [32],
                                                                     "lr": {"distribution": "loguniform",
                                                                            "low": 1e-3, "high": 1e-1}}}]},
}


def test_conditional_dimensions_follow_the_strategy_and_scratch_has_none():
    space = SearchSpace(batch_size=(32,))
    plain = dimensions(space, "direct-all")
    assert "strategy" in plain and "batch_size" not in plain          # one value: fixed, not searched
    assert not {"blocks", "lora_rank", "lora_alpha"} & set(plain)
    assert {"lora_rank", "lora_alpha"} <= set(dimensions(space, "lora")) and "blocks" not in dimensions(space, "lora")
    assert "blocks" in dimensions(space, "reinit-last-k")
    assert "strategy" not in dimensions(space, "direct-all", scratch=True)
    assert dimensions(space, "direct-all")["lr"].log


def test_define_by_run_samples_inside_the_space_and_only_what_the_strategy_uses():
    space = SearchSpace()
    define = DefineByRun(space, "direct-all", scratch=False)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        define(trial)
        p = trial.params
        seen.add(p["strategy"])
        assert ("lora_rank" in p) == (p["strategy"] == "lora")
        assert ("blocks" in p) == (p["strategy"] in ("last-k", "reinit-last-k"))
        assert space.lr.low <= p["lr"] <= space.lr.high and p["augment"] in space.augment
        study.tell(trial, 0.0)
    assert seen == set(space.strategy)


def test_the_searcher_pickles_with_its_warm_study():
    """Tune pickles the searcher into its experiment state after every step."""
    import pickle

    search = SearchSpec(space=SearchSpace(strategy=("direct-all", "lora")))
    limited = searcher(search, "direct-all", False, [], "p")
    assert pickle.loads(pickle.dumps(limited)) is not None


def test_warm_study_holds_the_earlier_trials_and_skips_those_the_space_cannot_hold():
    search = SearchSpec(space=SearchSpace(strategy=("direct-all", "lora"), optimizer=("sgd", "adam"), batch_size=(32,),
                                          schedule=("constant",), augment=("none",), bn_mode=("train",),
                                          weight_decay=Range("choice", values=(0.0,)),
                                          label_smoothing=Range("choice", values=(0.0,))))
    history = [({"strategy": "lora", "optimizer": "adam", "lr": 1e-2, "lora_rank": 4, "lora_alpha": 8.0}, 40.0),
               ({"strategy": "direct-all", "optimizer": "sgd", "lr": 1e-3}, 20.0),
               ({"strategy": "direct-all", "optimizer": "rmsprop", "lr": 1e-3}, 90.0)]   # not in the space
    storage = warm_study(search, "direct-all", False, history, "w")
    study = optuna.load_study(study_name="w", storage=storage)
    assert [t.value for t in study.trials] == [40.0, 20.0]
    assert study.best_trial.params["lora_rank"] == 4


def test_the_attacker_picks_by_validation_and_is_scored_on_test():
    found = best_found([(2, 50.0, 31.0), (0, 40.0, 60.0), (1, 55.0, 20.0), (3, 55.0, 99.0)])
    assert [(f.n, f.trial, f.val, f.test) for f in found] == [
        (1, 0, 40.0, 60.0), (2, 1, 55.0, 20.0), (3, 1, 55.0, 20.0), (4, 1, 55.0, 20.0)]  # a tie keeps the earlier


def test_every_attacked_model_gets_the_same_search_and_budget():
    spec = parse_spec(SPEC)
    protected = protected_models(spec, RunOptions())
    templates = search_templates(spec, protected)
    assert [t.subject.label for t in templates] == ["protected/a/s0", "protected/a/s1", "normal", "scratch"]
    assert search_budget(spec, protected) == 4 * 5
    assert {t.config.batch_size for t in templates} == {32} and templates[-1].config.strategy == "direct-all"
    text = dry_run_text(spec, plan_trials(spec, protected), search_budget(spec, protected))
    assert "search s: tpe" in text and "5 trials x 4" in text and "= 20 trials" in text and "160 fine-tuning" in text


def test_search_trials_are_numbered_in_start_order_and_a_retry_keeps_its_number():
    template = search_templates(parse_spec(SPEC), [("a", 0)])[0]

    class TuneTrial:
        def __init__(self, trial_id, config):
            self.trial_id, self.config = trial_id, config

    number = SearchNumbering(template, first=3)
    a = number(TuneTrial("x", {"lr": 0.01, "strategy": "lora", "lora_rank": 2}))
    b = number(TuneTrial("y", {"lr": 0.02, "strategy": "direct-fc"}))
    assert (a.search_trial, b.search_trial, number(TuneTrial("x", {})).search_trial) == (3, 4, 3)
    assert a.config.lora_rank == 2 and a.config.batch_size == 32 and a.key != b.key
    assert a.params()[names.SEARCH] == "s" and a.params()[names.SEARCH_TRIAL] == 3 and "#3" in a.name


def test_the_running_objective_is_the_best_validation_so_far_and_its_test_accuracy():
    reports = []
    reporter = EpochReporter(reports.append, final_epoch=3, every_s=0.0)
    for epoch, (val, test) in enumerate([(10, 11), (50, 40), (45, 60), (50, 70)]):
        reporter(epoch, {names.RESTRICTED_ACC: test, names.RESTRICTED_LOSS: 1.0, names.VAL_ACC: val})
    reporter.flush(done=True)
    assert [r[names.VAL_BEST] for r in reports[:3]] == [10, 50, 50]
    assert reports[-1][names.AT_VAL_BEST] == 40 and reports[-1][names.BEST] == 70   # a tie keeps the earlier epoch


@pytest.fixture()
def tracker(tmp_path):
    from sophon_ray.run.tracking import Tracker

    return Tracker(f"sqlite:///{tmp_path / 'm.db'}", "e")


def test_search_history_reads_finished_trials_back_and_kills_unfinished_ones(tracker):
    template = search_templates(parse_spec(SPEC), [("a", 0)])[0]
    parent = tracker.child_run(tracker.sweep_run("sid", "sweep"), "sid", "search", "k", "search")
    numbering = SearchNumbering(template, first=0)

    class TuneTrial:
        def __init__(self, trial_id, config):
            self.trial_id, self.config = trial_id, config

    rows = [({"lr": 0.01, "epochs": 8, "strategy": "lora", "lora_rank": 8, "lora_alpha": 4.0}, 61.0),
            ({"lr": 0.002, "epochs": 4, "strategy": "direct-fc"}, 30.0), ({"lr": 0.05, "epochs": 4}, None)]
    for i, (config, val) in enumerate(rows):
        trial = numbering(TuneTrial(str(i), config))
        run = tracker.child_run(parent, "sid", "attack", trial.key, trial.name, trial.params())
        if val is not None:
            tracker.log_rows(run, [(0, {names.VAL_BEST: val, names.AT_VAL_BEST: val - 1, names.FINAL: val - 2})])
            tracker.finish(run)
    history, first = search_history(tracker, parent, scratch=False)
    assert first == 3
    assert [(n, v, t) for n, _, v, t in history] == [(0, 61.0, 60.0), (1, 30.0, 29.0)]
    params = history[0][1]
    assert params["lora_rank"] == 8 and isinstance(params["lora_rank"], int) and params["strategy"] == "lora"
    assert params["lr"] == pytest.approx(0.01) and params["epochs"] == 8
    assert {r.info.status for r in tracker.child_runs(parent)} == {"FINISHED", "KILLED"}


def test_every_number_setting_takes_a_range_or_a_list_in_a_search_space():
    """A defence-aware setting has no default search dimension; a spec widens the space with a range or a list,
    and validation holds the range to the setting's bounds (naming the field)."""
    widened = {"shrink": {"distribution": "uniform", "low": 0.2, "high": 1.0}, "perturb": [0.0, 0.01],
               "adapt": ["none", "entropy"], "warm_epochs": [1, 2]}
    spec = {**SPEC, "attack": {**SPEC["attack"], "search": [{**SPEC["attack"]["search"][0],
                                                            "space": {**SPEC["attack"]["search"][0]["space"],
                                                                      **widened}}]}}
    space = parse_spec(spec).attack.search[0].space
    assert space.shrink == Range("uniform", 0.2, 1.0) and space.perturb == (0.0, 0.01)
    dims = dimensions(space, "direct-all")
    assert not dims["shrink"].log and {"perturb", "adapt", "warm_epochs"} <= set(dims)
    bad = {**widened, "shrink": {"distribution": "uniform", "low": 0.0, "high": 1.0}}
    spec["attack"]["search"][0]["space"].update(bad)
    with pytest.raises(Exception, match=r"attack\.search\.0\.space\.shrink\.low: must be > 0"):
        parse_spec(spec)
