import copy
import random

import pytest
import torch
import torch.nn.functional as F

from sophon_ray.modes.classification.losses import ice, klu
from sophon_ray.core.simulation import INNER_OPTIMIZERS, Environment, _adversary, sample_environment, simulate
from sophon_ray.spec import EnvironmentSpec
from sophon_ray.modes.classification.task import CLASSIFICATION
from tests.tiny import tiny_data, tiny_net

ICE, KLU = CLASSIFICATION.suppression("ice"), CLASSIFICATION.suppression("klu")

TORCH_OPT = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
}


def _batches(k: int, n: int = 10):
    data = tiny_data(k * n)
    x, y = data.tensors
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(k)]


def hand_outer_gradient(model, batches, optimizer, lr, suppression, query_fraction, head_only):
    """First-order MAML by hand: a real module copy, a torch optimizer, explicit query gradients."""
    m = copy.deepcopy(model)
    m.train()
    names = [n for n, _ in m.named_parameters()]
    head = set(m.head_param_names())
    inner = [p for n, p in m.named_parameters() if (n in head or not head_only)]
    opt = TORCH_OPT[optimizer](inner, lr)
    total = [torch.zeros_like(p) for p in m.parameters()]
    for x, y in batches:
        nq = round(len(y) * query_fraction)
        opt.zero_grad()
        F.cross_entropy(m(x[nq:]), y[nq:]).backward()
        opt.step()
        grads = torch.autograd.grad(suppression(m(x[:nq]), y[:nq]), list(m.parameters()))
        total = [t + g for t, g in zip(total, grads)]
    return {n: t / len(batches) for n, t in zip(names, total)}


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("head_only", [False, True])
def test_outer_gradient_equals_hand_computed_mean_of_query_gradients(optimizer, head_only):
    model = tiny_net()
    batches = _batches(5)
    env = Environment(optimizer=optimizer, lr=0.05, head_reinit=False, head_only=head_only)
    sim = simulate(model, iter(batches), env, ICE, inner_steps=5, query_fraction=0.3,
                   generator=torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    expected = hand_outer_gradient(model, batches, optimizer, 0.05, ice, 0.3, head_only)
    for name, grad in expected.items():
        assert torch.allclose(sim.grads[name], grad, atol=1e-6), name


def _tensors(model) -> dict[str, torch.Tensor]:
    """Deep clones of every parameter and buffer (BN running_mean, running_var, num_batches_tracked)."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def test_simulation_leaves_parameters_and_batchnorm_statistics_bit_identical():
    model = tiny_net(bn=True)
    before = _tensors(model)
    assert {"body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"} <= set(before)
    env = Environment(optimizer="adam", lr=0.1, head_reinit=True, head_only=False)
    simulate(model, iter(_batches(4)), env, KLU, 4, 0.2, torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    after = _tensors(model)  # the real model, read after the call
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    # ... while the simulation itself did run BatchNorm in train mode on its own copy of the buffers
    adversary = _adversary(model)
    assert adversary.net is not model
    copied = dict(adversary.net.named_buffers())
    assert all(c is not b for c, b in zip(adversary.buffers, model.buffers()))
    assert copied["body.1.num_batches_tracked"].item() == 2 * 4  # a support and a query forward per step
    assert not torch.equal(copied["body.1.running_mean"], before["body.1.running_mean"])
    assert not torch.equal(copied["body.1.running_var"], before["body.1.running_var"])


def test_head_reinit_gives_the_real_head_no_gradient():
    model = tiny_net()
    env = Environment(optimizer="sgd", lr=0.05, head_reinit=True, head_only=False)
    sim = simulate(model, iter(_batches(3)), env, ICE, 3, 0.3, torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    for name in model.head_param_names():
        assert not sim.grads[name].any()
    assert sim.grads["body.0.weight"].abs().sum() > 0


def test_inner_optimizers_registered():
    from sophon_ray.recipes import OPTIMIZERS

    assert set(INNER_OPTIMIZERS.names()) == set(OPTIMIZERS.names())   # every attacker optimizer can be simulated


def test_environment_sampling_covers_the_spec():
    spec = EnvironmentSpec(optimizers=("sgd", "adam"), lr=(1e-4, 1e-2), head_reinit=0.5, head_only=0.25)
    rng = random.Random(0)
    envs = [sample_environment(spec, rng) for _ in range(2000)]
    assert {e.optimizer for e in envs} == {"sgd", "adam"}
    assert all(1e-4 <= e.lr <= 1e-2 for e in envs)
    assert 0.45 < sum(e.head_reinit for e in envs) / 2000 < 0.55
    assert 0.2 < sum(e.head_only for e in envs) / 2000 < 0.3


def test_official_single_environment_is_expressible():
    spec = EnvironmentSpec(optimizers=("sgd",), lr=(1e-4, 1e-4), head_reinit=0.0, head_only=0.0)
    env = sample_environment(spec, random.Random(1))
    assert env == Environment("sgd", pytest.approx(1e-4), False, False)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_the_persistent_adversary_starts_every_simulation_from_the_model_and_a_fresh_state(optimizer):
    model = tiny_net(bn=True)
    env = Environment(optimizer=optimizer, lr=0.05, head_reinit=False, head_only=False)
    first = simulate(model, iter(_batches(4)), env, ICE, 4, 0.3, torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    second = simulate(model, iter(_batches(4)), env, ICE, 4, 0.3, torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    assert all(torch.equal(first.grads[n], second.grads[n]) for n in first.grads)
    with torch.no_grad():  # the model moves on (as protect's outer step does): the adversary follows it
        for p in model.parameters():
            p.mul_(0.5)
    moved = simulate(model, iter(_batches(4)), env, ICE, 4, 0.3, torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    expected = hand_outer_gradient(model, _batches(4), optimizer, 0.05, ice, 0.3, head_only=False)
    assert all(torch.allclose(moved.grads[n], expected[n], atol=1e-6) for n in expected)


def test_a_batch_of_another_size_mid_simulation_keeps_the_optimizer_state():
    model = tiny_net()
    batches = _batches(3) + [_batches(1, n=7)[0]]
    env = Environment(optimizer="momentum", lr=0.05, head_reinit=False, head_only=False)
    sim = simulate(model, iter(batches), env, ICE, 4, 0.3, torch.Generator().manual_seed(0), fit=CLASSIFICATION.fit_loss)
    expected = hand_outer_gradient(model, batches, "momentum", 0.05, ice, 0.3, head_only=False)
    assert all(torch.allclose(sim.grads[n], expected[n], atol=1e-6) for n in expected)
