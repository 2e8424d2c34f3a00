"""A simulated attacker drawn from the recipe space (``environments.recipes`` / ``environments.known``): each inner
loop is the real attacker's fine-tuning (its strategy, optimizer, weight decay, schedule, label smoothing,
augmentation, BatchNorm mode and reparameterisation through the attacker's own code: ``core.attack.prepare``, the
recipe table's ``torch.optim`` builders, ``LambdaLR``) with first-order query gradients, and the legacy environments
draw exactly what they drew before."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace

import pytest
import torch

from sophon_ray.core.attack import prepare
from sophon_ray.core.simulation import Environment, recipe_environment, sample_environment, simulate
from sophon_ray.core.training import set_bn_eval
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.recipes import BN_MODES, OPTIMIZERS, SCHEDULES, AttackConfig, SearchSpace
from sophon_ray.recipes.augment import make_augment
from sophon_ray.recipes.surgery import reparameterise
from sophon_ray.spec import EnvironmentSpec
from tests.tiny import tiny_data, tiny_net

ICE = CLASSIFICATION.suppression("ice")
FIT = CLASSIFICATION.fit_loss
QUERY = 0.3


def _batches(k: int, n: int = 10) -> list:
    x, y = tiny_data(k * n).tensors
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(k)]


def attacker_outer_gradient(model, batches, recipe: AttackConfig, seed: int) -> dict[str, torch.Tensor]:
    """The real attacker's fine-tuning, step by step, with the query gradient of the suppression loss after each
    step: the attacker's reparameterisation and strategy, the table's torch.optim optimizer, LambdaLR, its
    augmentation, BatchNorm mode and label smoothing."""
    gen = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model).train()
    reparameterise(m, recipe, gen)
    trainable = prepare(m, recipe, gen)
    reinit = [n for (n, p), q in zip(m.named_parameters(), model.parameters())
              if recipe.strategy.startswith("initfc") and n in m.head_param_names()]
    opt = OPTIMIZERS.get(recipe.optimizer)(trainable, recipe.lr, recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES.get(recipe.schedule)(len(batches)))
    if BN_MODES.get(recipe.bn_mode):
        set_bn_eval(m)
    augment = make_augment(recipe.augment)
    params = list(m.parameters())
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        nq = min(len(y) - 2, max(2, round(len(y) * QUERY)))
        x = torch.cat([x[:nq], augment(x[nq:], gen)]) if augment else x
        frozen = [p for p in params if not p.requires_grad]
        opt.zero_grad()
        FIT(m, x[nq:], y[nq:], recipe.label_smoothing).backward()
        opt.step()
        sched.step()
        for p in frozen:
            p.requires_grad_(True)
        grads = torch.autograd.grad(ICE(m, x[:nq], y[:nq]), params)
        for p in frozen:
            p.requires_grad_(False)
        total = [t + g for t, g in zip(total, grads)]
    out = {n: t / len(batches) for (n, _), t in zip(m.named_parameters(), total)}
    for n in reinit:
        out[n] = torch.zeros_like(out[n])
    return out


def _simulate(model, batches, env: Environment, seed: int):
    return simulate(model, iter(batches), env, ICE, inner_steps=len(batches), query_fraction=QUERY,
                    generator=torch.Generator().manual_seed(seed), fit=FIT)


RECIPES = [
    AttackConfig(strategy="direct-all", optimizer="sgd", lr=0.05),
    AttackConfig(strategy="direct-fc", optimizer="momentum", lr=0.05, weight_decay=5e-4),
    AttackConfig(strategy="initfc-all", optimizer="adam", lr=1e-2, schedule="cosine"),
    AttackConfig(strategy="initfc-fc", optimizer="rmsprop", lr=1e-3, label_smoothing=0.1),
    AttackConfig(strategy="direct-all", optimizer="adamw", lr=1e-3, schedule="warmup-cosine", augment="flip"),
    AttackConfig(strategy="direct-all", optimizer="nesterov", lr=1e-2, bn_mode="frozen", shrink=0.5, perturb=0.01),
    AttackConfig(strategy="direct-all", optimizer="adagrad", lr=1e-2, schedule="one-cycle", temperature=2.0),
    AttackConfig(strategy="direct-all", optimizer="adadelta", lr=1.0, augment="shift", weight_decay=1e-4),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.strategy}-{r.optimizer}")
def test_a_recipe_simulation_is_the_real_attackers_fine_tuning_with_query_gradients(recipe):
    model = tiny_net(bn=True)
    batches = _batches(5)
    sim = _simulate(model, batches, recipe_environment(recipe), seed=3)
    expected = attacker_outer_gradient(model, batches, recipe, seed=3)
    for name, grad in expected.items():
        torch.testing.assert_close(sim.grads[name], grad, atol=2e-6, rtol=1e-4, msg=name)


def test_a_plain_recipe_is_the_legacy_environment_and_head_only_is_direct_fc():
    model = tiny_net()
    batches = _batches(4)
    for recipe, legacy in [(AttackConfig(strategy="direct-all", optimizer="adam", lr=1e-2),
                            Environment("adam", 1e-2, head_reinit=False, head_only=False)),
                           (AttackConfig(strategy="direct-fc", optimizer="sgd", lr=5e-2),
                            Environment("sgd", 5e-2, head_reinit=False, head_only=True))]:
        a, b = _simulate(model, batches, recipe_environment(recipe), 0), _simulate(model, batches, legacy, 0)
        assert all(torch.equal(a.grads[n], b.grads[n]) for n in a.grads)


def test_a_re_initialised_head_gets_no_outer_gradient_and_the_model_is_untouched():
    model = tiny_net(bn=True)
    before = copy.deepcopy(model.state_dict())
    sim = _simulate(model, _batches(3), recipe_environment(AttackConfig(strategy="initfc-all", optimizer="adam",
                                                                          lr=1e-2, shrink=0.5)), 0)
    assert all(not sim.grads[n].any() for n in model.head_param_names())
    assert any(sim.grads[n].any() for n in sim.grads if n not in model.head_param_names())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_legacy_environments_draw_what_they_always_drew():
    spec = EnvironmentSpec(optimizers=("sgd", "momentum", "adam"), lr=(1e-3, 3e-2), head_reinit=0.5, head_only=0.25)
    rng, ref = random.Random(5), random.Random(5)
    for _ in range(20):
        env = sample_environment(spec, rng)
        opt = ref.choice(spec.optimizers)
        lr = math.exp(ref.uniform(math.log(1e-3), math.log(3e-2)))
        assert env == Environment(opt, lr, ref.random() < 0.5, ref.random() < 0.25)


def test_known_recipes_are_drawn_at_their_share_and_the_space_otherwise():
    known = (AttackConfig(strategy="initfc-all", optimizer="adam", lr=1e-3),)
    space = SearchSpace(strategy=("direct-fc",), optimizer=("sgd",), lr=(0.1,))
    spec = EnvironmentSpec(recipes=space, known=known, known_share=0.25)
    rng = random.Random(0)
    drawn = [sample_environment(spec, rng).recipe for _ in range(2000)]
    share = sum(r == known[0] for r in drawn) / len(drawn)
    assert 0.22 < share < 0.28
    assert {r.strategy for r in drawn if r != known[0]} == {"direct-fc"}
    always = replace(spec, known_share=1.0)
    assert all(sample_environment(always, rng).recipe == known[0] for _ in range(50))
    no_space = EnvironmentSpec(known=known, known_share=0.0)
    assert all(sample_environment(no_space, rng).recipe is None for _ in range(50))


def test_a_strategy_that_rewrites_the_model_cannot_be_simulated():
    with pytest.raises(ValueError, match="cannot run lora"):
        _simulate(tiny_net(), _batches(2), recipe_environment(AttackConfig(strategy="lora", lora_rank=2)), 0)
