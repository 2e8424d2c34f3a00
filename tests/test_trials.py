"""Trial planning and protection keys: pure functions, no Ray."""

from collections import Counter

from sophon_ray import names
from sophon_ray.run.context import RunOptions
from sophon_ray.run.keys import protect_key, protected_models
from sophon_ray.run.plan import Subject, domain_names, plan_trials
from sophon_ray.run.validate import parse_spec

SPEC = {
    "restricted": [{"dataset": "shapes_m"}, {"dataset": "shapes_m", "seed": 1}, {"dataset": "digits"}],
    "protect": [{"name": "a", "seeds": [0, 1]}, {"name": "b"}],
    "attack": {"development": {"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [3e-3]},
               "evaluation": [{"strategy": ["direct-all", "direct-fc"], "optimizer": ["adam"], "lr": [1e-3],
                               "seed": [0, 1]}]},
}


def test_every_protection_seed_is_a_subject_and_scratch_is_shared_across_strategies():
    spec = parse_spec(SPEC)
    models = protected_models(spec, RunOptions())
    assert models == [("a", 0), ("a", 1), ("b", 0)]
    trials = plan_trials(spec, models)
    evaluation = [t for t in trials if t.grid == names.EVALUATION]
    per_domain = 2 * 2 * (3 + 1) + 2          # 2 strategies x 2 seeds x (3 protected + normal) + scratch per seed
    assert len(evaluation) == 3 * per_domain
    assert len([t for t in trials if t.grid == names.DEVELOPMENT]) == 3 * (3 + 1 + 1)
    assert Counter(t.subject.kind for t in evaluation)["scratch"] == 3 * 2
    assert {t.config.strategy for t in evaluation if t.subject.kind == "scratch"} == {"direct-all"}
    assert len({t.key for t in trials}) == len(trials)                          # every trial its own MLflow run
    assert trials[0].params()[names.PROTECT_SEED] == 0 and trials[0].params()[names.GRID] == names.DEVELOPMENT
    assert {t.subject.model for t in trials} == {"protected/a/s0", "protected/a/s1", "protected/b/s0", "normal"}


def test_domains_are_named_by_dataset_and_told_apart_when_a_dataset_repeats():
    assert domain_names(parse_spec(SPEC)) == ["shapes_m#0", "shapes_m#1", "digits"]


def test_adding_a_protection_seed_keeps_the_keys_of_the_seeds_already_protected():
    one = parse_spec({"protect": [{"name": "a", "seeds": [0]}]})
    two = parse_spec({"protect": [{"name": "a", "seeds": [0, 1]}]})
    assert protect_key(one, 0, 0) == protect_key(two, 0, 0) != protect_key(two, 0, 1)
    changed = parse_spec({"protect": [{"name": "a", "seeds": [0], "alpha": 1}]})
    assert protect_key(changed, 0, 0) != protect_key(one, 0, 0)


def test_an_audited_checkpoint_is_one_protected_subject_without_a_seed():
    spec = parse_spec(SPEC)
    [(variant, seed)] = protected_models(spec, RunOptions(audit="ckpt"))
    assert Subject("protected", variant, seed).model == "protected/audited/s-1"


def test_parallel_protections_are_balanced_by_cost():
    from sophon_ray.run.train_driver import balance

    costs = {"a0": 1, "a1": 1, "a2": 1, "b0": 2.5, "b1": 2.5, "b2": 2.5}
    jobs = [{"label": k} for k in costs]
    groups = balance(jobs, 2, lambda j: costs[j["label"]])
    loads = sorted(sum(costs[j["label"]] for j in g) for g in groups)
    assert loads == [5.0, 5.5]                      # a round-robin split gives 4.5 and 6.0
    assert sorted(j["label"] for g in groups for j in g) == sorted(costs)
    assert balance(jobs[:1], 3, lambda j: 1) == [[jobs[0]]]
