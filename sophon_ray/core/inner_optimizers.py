"""The simulated attacker's optimizers: one per attacker optimizer in the recipe table
(:mod:`sophon_ray.recipes.builtin`), each the same algorithm and hyperparameters as the ``torch.optim`` optimizer
the table builds, written as functional ``_foreach`` steps with explicit state.

A step updates the parameters in place and never syncs with the host (no ``.item()``, no branching on tensor
values): ``lr`` and ``t`` are 0-dim device tensors, so a CUDA graph can capture the step and replay it. Weight
decay is a Python float, applied as ``torch.optim`` applies it for that optimizer.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from sophon_ray.recipes.builtin import ADAMW_DECAY
from sophon_ray.registry import Registry

State = dict[str, list[Tensor]]


class InnerOptimizer(Protocol):
    """An inner optimizer: explicit state, updates the parameters in place (under no_grad).

    ``lr`` (the parameters' dtype) and ``t`` (float64, the 1-based step count, already incremented) are 0-dim
    tensors on the parameters' device, so a step never syncs with the host and can be captured in a CUDA
    graph. A tensor scalar handed to a ``_foreach`` op must have the list's dtype (CUDA's fast path does
    not convert it). ``weight_decay`` is a Python float, applied as the matching ``torch.optim`` optimizer
    applies it (L2 added to the gradient, except AdamW's decoupled decay)."""

    def init(self, params: list[Tensor]) -> State: ...

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None: ...


INNER_OPTIMIZERS: Registry[InnerOptimizer] = Registry("inner optimizer")


def _zeros(params: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) for p in params]


def _l2(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """torch.optim's coupled weight decay: ``g + weight_decay * p`` (a new list; ``grads`` untouched)."""
    return torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads


def _scaled_descent(params: list[Tensor], grads: list[Tensor], squares: list[Tensor], eps: float, lr: Tensor) -> None:
    """``p -= lr * g / (sqrt(squares) + eps)``: RMSprop's and Adagrad's step, in torch.optim's order of ops."""
    denom = torch._foreach_sqrt(squares)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(grads, denom)
    torch._foreach_mul_(update, lr)
    torch._foreach_sub_(params, update)


class Sgd:
    """torch.optim.SGD (no momentum; the official code's only simulated attacker)."""

    def init(self, params: list[Tensor]) -> State:
        return {}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        grads = _l2(grads, params, weight_decay)
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


class Momentum:
    """torch.optim.SGD with momentum 0.9 (heavy ball, PyTorch's convention: buf = 0.9 buf + g), or with
    ``nesterov`` (nesterov=True: the step goes along g + 0.9 buf)."""

    def __init__(self, nesterov: bool = False) -> None:
        self.nesterov = nesterov

    def init(self, params: list[Tensor]) -> State:
        return {"buf": _zeros(params)}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        grads = _l2(grads, params, weight_decay)
        torch._foreach_mul_(state["buf"], 0.9)
        torch._foreach_add_(state["buf"], grads)
        if not self.nesterov:
            torch._foreach_sub_(params, torch._foreach_mul(state["buf"], lr))
            return
        update = torch._foreach_add(grads, state["buf"], alpha=0.9)
        torch._foreach_mul_(update, lr)
        torch._foreach_sub_(params, update)


class Adam:
    """torch.optim.Adam (betas 0.9, 0.999, eps 1e-8) with bias correction computed on the device from ``t``."""

    def init(self, params: list[Tensor]) -> State:
        return {"m": _zeros(params), "v": _zeros(params)}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        grads = _l2(grads, params, weight_decay)
        torch._foreach_lerp_(state["m"], grads, 0.1)
        torch._foreach_mul_(state["v"], 0.999)
        torch._foreach_addcmul_(state["v"], grads, grads, value=0.001)
        denom = torch._foreach_sqrt(state["v"])
        torch._foreach_mul_(denom, torch.rsqrt(1 - torch.pow(0.999, t)).to(lr.dtype))
        torch._foreach_add_(denom, 1e-8)
        update = torch._foreach_div(state["m"], denom)
        torch._foreach_mul_(update, (-lr / (1 - torch.pow(0.9, t))).to(lr.dtype))
        torch._foreach_add_(params, update)


class AdamW:
    """torch.optim.AdamW (betas 0.9, 0.999, eps 1e-8), decoupled weight decay: p *= 1 - lr wd (wd 0 means 0.01)."""

    def init(self, params: list[Tensor]) -> State:
        return _ADAM.init(params)

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        torch._foreach_mul_(params, 1 - lr * (weight_decay or ADAMW_DECAY))
        _ADAM.step_(params, grads, state, lr, t)


class RmsProp:
    """torch.optim.RMSprop (alpha 0.99, eps 1e-8, no momentum, not centred): v = 0.99 v + 0.01 g^2."""

    def init(self, params: list[Tensor]) -> State:
        return {"square_avg": _zeros(params)}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        grads = _l2(grads, params, weight_decay)
        torch._foreach_mul_(state["square_avg"], 0.99)
        torch._foreach_addcmul_(state["square_avg"], grads, grads, value=1 - 0.99)
        _scaled_descent(params, grads, state["square_avg"], 1e-8, lr)


class Adagrad:
    """torch.optim.Adagrad (lr_decay 0, eps 1e-10, initial_accumulator_value 0): sum += g^2."""

    def init(self, params: list[Tensor]) -> State:
        return {"sum": _zeros(params)}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        grads = _l2(grads, params, weight_decay)
        torch._foreach_addcmul_(state["sum"], grads, grads, value=1)
        _scaled_descent(params, grads, state["sum"], 1e-10, lr)


class Adadelta:
    """torch.optim.Adadelta (rho 0.9, eps 1e-6; lr scales the update, 1.0 being the classic setting)."""

    def init(self, params: list[Tensor]) -> State:
        return {"square_avg": _zeros(params), "acc_delta": _zeros(params)}

    def step_(self, params: list[Tensor], grads: list[Tensor], state: State, lr: Tensor,
              t: Tensor, *, weight_decay: float = 0.0) -> None:
        grads = _l2(grads, params, weight_decay)
        torch._foreach_mul_(state["square_avg"], 0.9)
        torch._foreach_addcmul_(state["square_avg"], grads, grads, value=1 - 0.9)
        std = torch._foreach_add(state["square_avg"], 1e-6)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(state["acc_delta"], 1e-6)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, grads)
        torch._foreach_mul_(state["acc_delta"], 0.9)
        torch._foreach_addcmul_(state["acc_delta"], delta, delta, value=1 - 0.9)
        torch._foreach_mul_(delta, lr)
        torch._foreach_sub_(params, delta)


_ADAM = Adam()

INNER_OPTIMIZERS.register("sgd")(Sgd())
INNER_OPTIMIZERS.register("momentum")(Momentum())
INNER_OPTIMIZERS.register("nesterov")(Momentum(nesterov=True))
INNER_OPTIMIZERS.register("adam")(_ADAM)
INNER_OPTIMIZERS.register("adamw")(AdamW())
INNER_OPTIMIZERS.register("rmsprop")(RmsProp())
INNER_OPTIMIZERS.register("adagrad")(Adagrad())
INNER_OPTIMIZERS.register("adadelta")(Adadelta())

__all__ = ["INNER_OPTIMIZERS", "Adadelta", "Adagrad", "Adam", "AdamW", "InnerOptimizer", "Momentum",
           "RmsProp", "Sgd", "State"]
