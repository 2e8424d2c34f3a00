"""The simulated attacker's optimizers are the real attacker's: one inner optimizer per optimizer in the recipe
table, each stepping exactly as the ``torch.optim`` optimizer the table builds for it."""

from __future__ import annotations

import pytest
import torch

from sophon_ray.core.inner_optimizers import INNER_OPTIMIZERS
from sophon_ray.recipes import OPTIMIZERS

STEPS = 5
# (lr, weight_decay, dtype): the table's default lr with no and with a typical decay, in float32; and a large lr and
# decay, where the decay moves the parameters enough to tell apart even in Adadelta (whose steps start at ~1e-3 lr),
# in float64 (steps of ~1 in float32 leave one-ulp differences of op order above the tolerance)
SETTINGS = [pytest.param(1e-2, 0.0, torch.float32, id="lr1e-2-wd0-f32"),
            pytest.param(1e-2, 5e-4, torch.float32, id="lr1e-2-wd5e-4-f32"),
            pytest.param(1.0, 0.1, torch.float64, id="lr1-wd0.1-f64")]


def test_every_attacker_optimizer_has_an_inner_one():
    assert set(INNER_OPTIMIZERS.names()) == set(OPTIMIZERS.names())


@pytest.mark.parametrize(("lr", "weight_decay", "dtype"), SETTINGS)
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_inner_optimizer_steps_as_the_attackers_torch_optim(name: str, lr: float, weight_decay: float,
                                                            dtype: torch.dtype):
    assert name in INNER_OPTIMIZERS, f"attacker optimizer '{name}' has no inner optimizer"
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=gen, dtype=dtype), torch.randn(5, generator=gen, dtype=dtype)]
    grads = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in start] for _ in range(STEPS)]

    reference = [p.clone().requires_grad_(True) for p in start]
    optimizer = OPTIMIZERS.get(name)(reference, lr, weight_decay)
    for step_grads in grads:
        for p, g in zip(reference, step_grads):
            p.grad = g.clone()
        optimizer.step()

    inner = INNER_OPTIMIZERS.get(name)
    params = [p.clone() for p in start]
    state = inner.init(params)
    lr_t = torch.tensor(lr, dtype=dtype)  # the parameters' dtype, as simulate makes it
    t = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for step_grads in grads:
            given = [g.clone() for g in step_grads]
            t += 1
            inner.step_(params, given, state, lr_t, t, weight_decay=weight_decay)
            for g, kept in zip(given, step_grads):
                assert torch.equal(g, kept), "an inner step must not write the gradients"

    for p, ref in zip(params, reference):
        torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(p, s) for p, s in zip(params, start))
