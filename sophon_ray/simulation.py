"""Fine-tuning simulation (first-order MAML): adapt a functional copy of the model with a sampled
fine-tuning environment and return the mean query gradient of the suppression loss.

The real model's parameters and BatchNorm buffers are never written here: the copy runs on cloned
tensors through ``torch.func.functional_call`` in train mode, as an attacker's fine-tuning would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from sophon_ray.models import Net
from sophon_ray.registry import Registry
from sophon_ray.spec import EnvironmentSpec

Batch = tuple[Tensor, Tensor]
SuppressionLoss = Callable[[Tensor, Tensor], Tensor]


class InnerOptimizer(Protocol):
    """A functional optimizer: explicit state, returns new parameter tensors (no autograd history)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]: ...

    def step(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float) -> list[Tensor]: ...


INNER_OPTIMIZERS: Registry[InnerOptimizer] = Registry("inner optimizer")


class Sgd:
    """Plain SGD (the official code's only simulated attacker)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {}

    def step(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float) -> list[Tensor]:
        return torch._foreach_add(params, grads, alpha=-lr)


class Momentum:
    """SGD with heavy-ball momentum 0.9 (PyTorch's convention: buf = 0.9 buf + g)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {"buf": [torch.zeros_like(p) for p in params]}

    def step(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float) -> list[Tensor]:
        torch._foreach_mul_(state["buf"], 0.9)
        torch._foreach_add_(state["buf"], grads)
        return torch._foreach_add(params, state["buf"], alpha=-lr)


class Adam:
    """Adam (0.9, 0.999, eps 1e-8) with bias correction."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params],
                "t": [torch.zeros(())]}

    def step(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float) -> list[Tensor]:
        state["t"][0] += 1
        t = state["t"][0].item()
        torch._foreach_lerp_(state["m"], grads, 0.1)
        torch._foreach_mul_(state["v"], 0.999)
        torch._foreach_addcmul_(state["v"], grads, grads, value=0.001)
        denom = torch._foreach_sqrt(state["v"])
        torch._foreach_div_(denom, math.sqrt(1 - 0.999**t))
        torch._foreach_add_(denom, 1e-8)
        return torch._foreach_addcdiv(params, state["m"], denom, value=-lr / (1 - 0.9**t))


INNER_OPTIMIZERS.register("sgd")(Sgd())
INNER_OPTIMIZERS.register("momentum")(Momentum())
INNER_OPTIMIZERS.register("adam")(Adam())


@dataclass(frozen=True)
class Environment:
    """One sampled fine-tuning environment."""

    optimizer: str
    lr: float
    head_reinit: bool
    head_only: bool


def sample_environment(spec: EnvironmentSpec, rng: random.Random) -> Environment:
    """Draw an optimizer uniformly, an lr log-uniformly in ``spec.lr``, and the head/scope coins."""
    low, high = spec.lr
    return Environment(
        optimizer=rng.choice(spec.optimizers),
        lr=math.exp(rng.uniform(math.log(low), math.log(high))),
        head_reinit=rng.random() < spec.head_reinit,
        head_only=rng.random() < spec.head_only,
    )


@dataclass
class Simulation:
    """The first-order outer gradient (mean over inner steps of the query gradients) and the losses."""

    grads: dict[str, Tensor]
    fts_loss: float
    adversary_loss: float


def simulate(model: Net, batches: Iterator[Batch], env: Environment, suppression: SuppressionLoss,
             inner_steps: int, query_fraction: float, generator: torch.Generator) -> Simulation:
    """Run ``inner_steps`` adversary steps on a functional copy of ``model``; after each, take the
    gradient of ``suppression`` on the held-out query part of that step's batch at the adapted weights.

    First-order: no gradient flows through the inner updates, so the outer gradient is
    (1/K) sum_k grad L_a(theta_k). When ``env.head_reinit`` re-initialises the copy's head (Xavier-uniform
    weight, zero bias), the real head gets a zero gradient from this simulation: the adapted head no
    longer descends from it. Every batch must hold at least four samples (two for support, two for query).
    """
    names = [n for n, _ in model.named_parameters()]
    head = set(model.head_param_names())
    fast = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    if env.head_reinit:
        for n in head:
            if fast[n].dim() > 1:  # drawn on the CPU generator, then moved: same numbers on any device
                fresh = torch.empty(fast[n].shape)
                fast[n].copy_(torch.nn.init.xavier_uniform_(fresh, generator=generator))
            else:
                fast[n].zero_()
    inner = [n for n in names if n in head] if env.head_only else names
    optimizer = INNER_OPTIMIZERS.get(env.optimizer)
    state = optimizer.init([fast[n] for n in inner])
    total = {n: torch.zeros_like(fast[n]) for n in names}
    fts_loss = adversary_loss = 0.0
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for _ in range(inner_steps):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        # >= 2 samples on each side: BatchNorm in train mode cannot normalise a single sample
        n_query = min(len(y) - 2, max(2, round(len(y) * query_fraction)))
        support = {n: fast[n].requires_grad_(n in inner) for n in names}
        loss = F.cross_entropy(functional_call(model, (support, buffers), (x[n_query:],)), y[n_query:])
        grads = torch.autograd.grad(loss, [support[n] for n in inner])
        updated = optimizer.step([fast[n].detach() for n in inner], list(grads), state, env.lr)
        fast = {n: t.detach() for n, t in fast.items()} | dict(zip(inner, updated))
        query = {n: fast[n].requires_grad_() for n in names}
        q_loss = suppression(functional_call(model, (query, buffers), (x[:n_query],)), y[:n_query])
        torch._foreach_add_(list(total.values()), list(torch.autograd.grad(q_loss, list(query.values()))))
        fast = {n: t.detach() for n, t in fast.items()}
        fts_loss += q_loss.item()
        adversary_loss += loss.item()
    model.train(was_training)
    grads = {n: g / inner_steps for n, g in total.items()}
    if env.head_reinit:
        grads = {n: torch.zeros_like(g) if n in head else g for n, g in grads.items()}
    return Simulation(grads, fts_loss / inner_steps, adversary_loss / inner_steps)
