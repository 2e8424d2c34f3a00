"""Fine-tuning simulation (first-order MAML): adapt a copy of the model with a sampled fine-tuning
environment and return the mean query gradient of the suppression loss.

The real model's parameters and BatchNorm buffers are never written here: the copy is a deep copy (own
parameters and buffers) run in train mode, as an attacker's fine-tuning would, and updated in place.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from sophon_ray.models import Net
from sophon_ray.registry import Registry
from sophon_ray.spec import EnvironmentSpec

Batch = tuple[Tensor, Tensor]
SuppressionLoss = Callable[[Tensor, Tensor], Tensor]


class InnerOptimizer(Protocol):
    """A functional optimizer: explicit state, updates the parameter tensors in place (under no_grad)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]: ...

    def step_(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float,
              t: int) -> None:
        """Apply update number ``t`` (1-based) to ``params`` in place."""


INNER_OPTIMIZERS: Registry[InnerOptimizer] = Registry("inner optimizer")


class Sgd:
    """Plain SGD (the official code's only simulated attacker)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float,
              t: int) -> None:
        torch._foreach_add_(params, grads, alpha=-lr)


class Momentum:
    """SGD with heavy-ball momentum 0.9 (PyTorch's convention: buf = 0.9 buf + g)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {"buf": [torch.zeros_like(p) for p in params]}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float,
              t: int) -> None:
        torch._foreach_mul_(state["buf"], 0.9)
        torch._foreach_add_(state["buf"], grads)
        torch._foreach_add_(params, state["buf"], alpha=-lr)


class Adam:
    """Adam (0.9, 0.999, eps 1e-8) with bias correction; the step count is a Python int (no host sync)."""

    def init(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]], lr: float,
              t: int) -> None:
        torch._foreach_lerp_(state["m"], grads, 0.1)
        torch._foreach_mul_(state["v"], 0.999)
        torch._foreach_addcmul_(state["v"], grads, grads, value=0.001)
        denom = torch._foreach_sqrt(state["v"])
        torch._foreach_div_(denom, math.sqrt(1 - 0.999**t))
        torch._foreach_add_(denom, 1e-8)
        torch._foreach_addcdiv_(params, state["m"], denom, value=-lr / (1 - 0.9**t))


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
    """Run ``inner_steps`` adversary steps on a copy of ``model``; after each, take the gradient of
    ``suppression`` on the held-out query part of that step's batch at the adapted weights.

    First-order: no gradient flows through the inner updates, so the outer gradient is
    (1/K) sum_k grad L_a(theta_k). When ``env.head_reinit`` re-initialises the copy's head (Xavier-uniform
    weight, zero bias), the real head gets a zero gradient from this simulation: the adapted head no
    longer descends from it. Every batch must hold at least four samples (two for support, two for query).

    The copy is one ``deepcopy`` per call (its own parameters and BatchNorm buffers, in train mode, as an
    attacker's fine-tuning would run it), updated in place: each inner step is then exactly one support
    forward/backward, one in-place optimizer step and one query forward/backward, with no per-step
    re-binding of parameters and no host sync (losses stay on the device until the end).
    """
    copy_ = _adversary_copy(model)
    names = [n for n, _ in copy_.named_parameters()]
    params = list(copy_.parameters())
    head = set(model.head_param_names())
    if env.head_reinit:
        _reinit_head(copy_, generator)
    inner = [p for n, p in zip(names, params) if n in head or not env.head_only]
    frozen = [p for n, p in zip(names, params) if not (n in head or not env.head_only)]
    optimizer = INNER_OPTIMIZERS.get(env.optimizer)
    state = optimizer.init(inner)
    total = [torch.zeros_like(p) for p in params]
    device = params[0].device
    fts_loss = torch.zeros((), device=device)
    adversary_loss = torch.zeros((), device=device)
    for t in range(1, inner_steps + 1):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # >= 2 samples on each side: BatchNorm in train mode cannot normalise a single sample
        n_query = min(len(y) - 2, max(2, round(len(y) * query_fraction)))
        _requires_grad(frozen, False)  # head-only: no graph through the frozen body for the support step
        loss = F.cross_entropy(copy_(x[n_query:]), y[n_query:])
        grads = torch.autograd.grad(loss, inner)
        with torch.no_grad():
            optimizer.step_(inner, list(grads), state, env.lr, t)
        _requires_grad(frozen, True)
        q_loss = suppression(copy_(x[:n_query]), y[:n_query])
        torch._foreach_add_(total, torch.autograd.grad(q_loss, params))
        fts_loss += q_loss.detach()
        adversary_loss += loss.detach()
    torch._foreach_div_(total, float(inner_steps))
    grads = dict(zip(names, total))
    if env.head_reinit:
        for n in head:
            grads[n].zero_()
    return Simulation(grads, fts_loss.item() / inner_steps, adversary_loss.item() / inner_steps)


def _adversary_copy(model: Net) -> Net:
    """A train-mode deep copy of ``model`` with its own parameters and buffers, all requiring grad, no .grad."""
    copy_ = copy.deepcopy(model)
    for p in copy_.parameters():
        p.grad = None
        p.requires_grad_(True)
    return copy_.train()


def _reinit_head(model: Net, generator: torch.Generator) -> None:
    """Xavier-uniform head weight drawn on the CPU generator, then moved (same numbers on any device); zero bias."""
    with torch.no_grad():
        fresh = torch.nn.init.xavier_uniform_(torch.empty(model.head.weight.shape), generator=generator)
        model.head.weight.copy_(fresh)
        if model.head.bias is not None:
            model.head.bias.zero_()


def _requires_grad(params: list[Tensor], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)
