"""The defender's hardening: a red team (a development attacker search per candidate), rounds that carry its finds
into the next round's simulated attacker and development grid, and validation of both (fast, no Ray)."""

from __future__ import annotations

import random

import pytest

from sophon_ray.core.data import make_splits
from sophon_ray.core.metrics import chance
from sophon_ray.modes import build_model, task_for
from sophon_ray.recipes import AttackConfig, SearchSpace, draw
from sophon_ray.run.defend import candidate, candidate_key, with_known
from sophon_ray.run.development import development_data, found_recipes, found_text, red_team_search
from sophon_ray.run.plan import plan_trials
from sophon_ray.run.texts import dry_run_text
from sophon_ray.run.validate import parse_spec
from sophon_ray.spec import Range, RedTeamSpec, SpecError

RED = {"num_samples": 3, "random_start": 2, "join": 2, "share": 0.25,
       "space": {"strategy": ["direct-all", "initfc-all"], "optimizer": ["sgd", "adam"], "epochs": [1],
                 "batch_size": [32], "data_fraction": [0.5]}}
SPEC = {
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 8, "train_size": 200, "test_size": 50},
    "restricted": [{"dataset": "shapes_m", "image_size": 8, "train_size": 400, "test_size": 100}],
    "protect": [{"name": "d", "iterations": 40, "probe_every": 10,
                 "defend": {"num_samples": 3, "rounds": 2, "red_team": RED,
                            "space": {"alpha": [1.0, 3.0]}}}],
    "attack": {"development": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [3e-3]}],
               "evaluation": [{"strategy": ["initfc-all"], "optimizer": ["adam"], "lr": [1e-3]}]},
}


def _problems(protect: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec({**SPEC, "protect": [{**SPEC["protect"][0], **protect}]})
    return str(err.value)


def test_a_recipe_drawn_from_a_space_stays_inside_it_and_repeats_with_its_seed():
    space = SearchSpace(strategy=("initfc-fc", "last-k"), optimizer=("adam",), lr=Range("loguniform", 1e-4, 1e-2),
                        batch_size=(16, 64), blocks=(2,))
    drawn = [draw(space, random.Random(3)) for _ in range(2)]
    assert drawn[0] == drawn[1]
    many = [draw(space, random.Random(s)) for s in range(200)]
    assert {c.strategy for c in many} == {"initfc-fc", "last-k"} and {c.batch_size for c in many} == {16, 64}
    assert all(1e-4 <= c.lr <= 1e-2 and c.optimizer == "adam" for c in many)
    # a strategy-specific setting stays at its default where its strategy does not use it
    assert {c.blocks for c in many if c.strategy == "initfc-fc"} == {1}
    assert {c.blocks for c in many if c.strategy == "last-k"} == {2}


def test_the_red_teams_finds_round_trip_through_their_text_best_first():
    found = [(AttackConfig(optimizer="sgd", lr=1e-3), 40.0), (AttackConfig(strategy="initfc-all", shrink=0.5), 70.0),
             (AttackConfig(optimizer="adam", lr=3e-4, schedule="cosine"), 55.0)]
    text = found_text(found, join=2)
    assert found_recipes(text) == (found[1][0], found[2][0])
    assert "shrink" in text and "momentum" not in text          # settings off their defaults only
    assert found_recipes("") == ()


def test_a_red_team_searches_its_space_on_the_protectors_data_and_scores_validation():
    spec = parse_spec(SPEC)
    data = development_data(make_splits(spec))
    model = build_model(spec.model, channels=3, image_size=8)
    red = RedTeamSpec(**{**RED, "space": SearchSpace(strategy=("direct-all", "initfc-all"), optimizer=("sgd", "adam"),
                                                     epochs=(1,), batch_size=(32,), data_fraction=(0.5,))})
    found = red_team_search(model, red, data, task_for(spec), chance(10))
    assert len(found) == 3
    assert all(c.strategy in ("direct-all", "initfc-all") and c.optimizer in ("sgd", "adam") and c.epochs == 1
               for c, _ in found)
    assert all(chance(10) <= score <= 100 for _, score in found)
    again = red_team_search(model, red, data, task_for(spec), chance(10))
    assert [c for c, _ in again] == [c for c, _ in found]          # seeded


def test_a_rounds_finds_join_the_simulated_attacker_and_change_the_candidate():
    spec = parse_spec(SPEC)
    base = spec.protect[0]
    known = (AttackConfig(strategy="initfc-all", optimizer="adam", lr=1e-3),)
    joined = with_known(base, known)
    assert joined.environments.known == known and joined.environments.known_share == 0.25
    assert with_known(base, ()) is base
    first, second = (candidate(v, {"alpha": 3.0}, 0) for v in (base, joined))
    assert second.environments.known == known and candidate_key(first) != candidate_key(second)


def test_rounds_and_the_red_team_are_validated_with_the_field_and_the_fix():
    assert "protect.0.defend.rounds: 2 rounds carry the red team's finds" in _problems(
        {"defend": {"rounds": 2, "space": {"alpha": [1.0, 3.0]}}})
    text = _problems({"defend": {"rounds": 2, "red_team": {**RED, "join": 0, "share": 1.5,
                                                           "space": {**RED["space"], "strategy": ["lora"]}}}})
    assert "protect.0.defend.red_team.join: must be > 0" in text
    assert "protect.0.defend.red_team.share" in text
    assert "protect.0.defend.red_team.space.strategy.0: the simulated attacker cannot run lora" in text
    env = {"environments": {"recipes": {"strategy": ["direct-all"], "adapt": ["entropy"], "optimizer": ["lion"]}}}
    text = _problems(env)
    assert "protect.0.environments.recipes.adapt.0: the simulated attacker cannot run adapt entropy" in text
    assert "protect.0.environments.recipes.optimizer.0" in text


def test_the_dry_run_states_rounds_and_the_red_team():
    spec = parse_spec(SPEC)
    text = dry_run_text(spec, plan_trials(spec, [("d", 0)]))
    assert "3 candidates a round x (1 protection of at most 40 iterations + 1 development attacks + a red team of " \
           "3 searched attacks)" in text
    assert "2 rounds, each round's simulated attacker and development grid joined by the red team's 2 best" in text


def test_new_settings_keep_every_existing_key():
    plain = parse_spec({**SPEC, "protect": [{"name": "d"}]})
    same = parse_spec({**SPEC, "protect": [{"name": "d", "environments": {"known": [], "known_share": 0.5}}]})
    from sophon_ray.run.keys import protect_key, sweep_id

    assert sweep_id(plain) == sweep_id(same) and protect_key(plain, 0, 0) == protect_key(same, 0, 0)
    recipes = parse_spec({**SPEC, "protect": [{"name": "d", "environments": {"recipes": {"strategy": ["direct-all"]}}}]})
    assert protect_key(recipes, 0, 0) != protect_key(plain, 0, 0)


def test_a_later_round_starts_from_the_previous_rounds_choice():
    from sophon_ray.run.defend import JOIN, searcher

    spec = parse_spec({**SPEC, "protect": [{**SPEC["protect"][0], "defend": {
        **SPEC["protect"][0]["defend"], "space": {"alpha": {"distribution": "loguniform", "low": 1.0, "high": 10.0},
                                                  "env_optimizers": [["sgd"], ["sgd", "adam"]]}}}]})
    defend = spec.protect[0].defend
    start = {"alpha": 7.25, "env_optimizers": JOIN.join(("sgd", "adam"))}
    search = searcher(defend, [], "s", round_=2, start=start)
    search.set_search_properties("defend_objective", "min", {})
    assert search.suggest("t1") == start                        # the winner so far first
    assert search.suggest("t2") != start
    fresh = searcher(defend, [], "s", round_=2)
    fresh.set_search_properties("defend_objective", "min", {})
    assert fresh.suggest("t1") != start
    resumed = searcher(defend, [({"alpha": 2.0, "env_optimizers": "sgd"}, 5.0)], "s", round_=2, start=start)
    resumed.set_search_properties("defend_objective", "min", {})
    assert resumed.suggest("t1") != start                        # a resumed round already ran it first
