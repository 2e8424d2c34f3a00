"""Fine-tuning simulation (first-order MAML): adapt a copy of the model with a sampled fine-tuning
environment and return the mean query gradient of the suppression loss.

The real model's parameters and BatchNorm buffers are never written here: the adversary is a persistent
copy of the model (own parameters and buffers, train mode, as an attacker's fine-tuning would run it) that
each simulation reloads from the model and updates in place. Every inner step is one support
forward/backward, one in-place optimizer step and one query forward/backward, with no host sync: the
learning rate and the step count live on the device, so on CUDA the whole step is captured once as a CUDA
graph and replayed K times (eager PyTorch spends more time launching ResNet-18's kernels than running them).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sophon_ray.core.inner_optimizers import INNER_OPTIMIZERS, InnerOptimizer
from sophon_ray.core.training import set_bn_eval
from sophon_ray.recipes import BN_MODES, SCHEDULES, STRATEGIES, AttackConfig, draw
from sophon_ray.recipes.augment import make_augment
from sophon_ray.recipes.surgery import reparameterise
from sophon_ray.seam import Model as Net
from sophon_ray.spec import EnvironmentSpec

Batch = tuple[Tensor, Tensor]
ModelLoss = Callable[[torch.nn.Module, Tensor, Tensor], Tensor]   # (model, x, y) -> scalar, see sophon_ray.modes.classification.task
# SOPHON_CUDA_GRAPHS=0 runs every inner step eagerly on CUDA too (debugging, or a model that cannot be captured)
CUDA_GRAPHS = os.environ.get("SOPHON_CUDA_GRAPHS", "1") != "0"
WARMUP_STEPS = 3  # eager steps on a side stream before a capture (cuDNN/cuBLAS handles, autograd streams)


__all__ = ["Batch", "CUDA_GRAPHS", "Environment", "INNER_OPTIMIZERS", "InnerOptimizer", "ModelLoss", "Simulation",
           "WARMUP_STEPS", "recipe_environment", "sample_environment", "simulate"]


@dataclass(frozen=True)
class Environment:
    """One sampled fine-tuning environment: an optimizer, an lr and the head/scope coins, or a whole attack
    ``recipe`` (its strategy, optimizer, lr, weight decay, schedule over the inner steps, label smoothing,
    augmentation of the support batches, BatchNorm mode and reparameterisation)."""

    optimizer: str
    lr: float
    head_reinit: bool
    head_only: bool
    recipe: AttackConfig | None = None


def recipe_environment(recipe: AttackConfig) -> Environment:
    """The environment of one attack recipe."""
    return Environment(recipe.optimizer, recipe.lr, head_reinit=False, head_only=False, recipe=recipe)


def sample_environment(spec: EnvironmentSpec, rng: random.Random) -> Environment:
    """One of ``spec.known`` with probability ``spec.known_share`` (when there are any), else a recipe drawn from
    ``spec.recipes`` (when set), else: an optimizer uniformly, an lr log-uniformly in ``spec.lr``, and the
    head/scope coins (the draws a spec without known recipes or a recipe space always made)."""
    if spec.known and rng.random() < spec.known_share:
        return recipe_environment(rng.choice(spec.known))
    if spec.recipes is not None:
        return recipe_environment(draw(spec.recipes, rng))
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


def simulate(model: Net, batches: Iterator[Batch], env: Environment, suppression: ModelLoss,
             inner_steps: int, query_fraction: float, generator: torch.Generator,
             *, fit: ModelLoss) -> Simulation:
    """Run ``inner_steps`` adversary steps (each minimising the task's ``fit`` loss on the support part of a fresh
    batch) on a copy of ``model``; after each, take the gradient of ``suppression`` on the held-out query part of
    that step's batch at the adapted weights. Both losses come from the task (``sophon_ray.modes.classification.task``).

    First-order: no gradient flows through the inner updates, so the outer gradient is
    (1/K) sum_k grad L_a(theta_k). When ``env.head_reinit`` re-initialises the copy's head (Xavier-uniform
    weight, zero bias), the real head gets a zero gradient from this simulation: the adapted head no
    longer descends from it. Every batch must hold at least four samples (two for support, two for query).
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    adversary = _adversary(model)
    recipe = env.recipe
    if recipe is None:
        trainable = frozenset(adversary.head) if env.head_only else None
        key = _Key(env.optimizer, trainable, suppression, fit, _autocast_state(adversary.device))
        reinit = list(model.head_param_names()) if env.head_reinit else []
    else:
        trainable, reinit = adversary.strategy(recipe)
        key = _Key(recipe.optimizer, trainable, suppression, _smoothed(fit, recipe.label_smoothing),
                   _autocast_state(adversary.device), recipe.weight_decay, BN_MODES.get(recipe.bn_mode))
    adversary.net.train()
    if key.freeze_bn:
        set_bn_eval(adversary.net)
    step = adversary.step_for(key)
    lrs = _schedule(recipe, inner_steps)
    augment = make_augment(recipe.augment) if recipe is not None else None
    for k in range(inner_steps):
        x, y = next(batches)
        x, y = x.to(adversary.device, non_blocking=True), y.to(adversary.device, non_blocking=True)
        # >= 2 samples on each side: BatchNorm in train mode cannot normalise a single sample
        n_query = min(len(y) - 2, max(2, round(len(y) * query_fraction)))
        if k == 0:
            step.prepare(x, y, n_query)  # a first capture runs steps: everything they wrote is reset next
            adversary.load(model)
            if recipe is not None:   # the real attacker's order: reparameterise, then its strategy
                reparameterise(adversary.net, recipe, generator)
                STRATEGIES.get(recipe.strategy).apply(adversary.net, generator, recipe)
            elif env.head_reinit:
                _reinit_head(adversary.net, generator)
            step.reset(env.lr * (lrs(0) if lrs is not None else 1.0))
        elif lrs is not None:
            step.lr.fill_(env.lr * lrs(k))
        if augment is not None:   # the attacker's augmentation on its training (support) part only
            x = torch.cat([x[:n_query], augment(x[n_query:], generator)])
        step.run(x, y, n_query)
    grads = dict(zip(adversary.names, torch._foreach_div(step.total, float(inner_steps))))
    for n in reinit:   # a re-initialised parameter of the copy no longer descends from the real one
        grads[n].zero_()
    fts_loss, adversary_loss = (step.losses / inner_steps).tolist()
    return Simulation(grads, fts_loss, adversary_loss)


@dataclass(frozen=True)
class _Key:
    """What a captured inner step depends on besides the values of its tensors: ``trainable`` the parameter
    names the inner optimizer updates (None: all)."""

    optimizer: str
    trainable: frozenset[str] | None
    suppression: ModelLoss
    fit: ModelLoss
    autocast: tuple
    weight_decay: float = 0.0
    freeze_bn: bool = False


_SMOOTHED: dict[tuple[ModelLoss, float], ModelLoss] = {}


def _smoothed(fit: ModelLoss, label_smoothing: float) -> ModelLoss:
    """``fit`` with label smoothing, one object per (fit, smoothing) (a key of captured steps)."""
    if not label_smoothing:
        return fit
    return _SMOOTHED.setdefault((fit, label_smoothing), functools.partial(fit, label_smoothing=label_smoothing))


def _schedule(recipe: AttackConfig | None, inner_steps: int) -> Callable[[int], float] | None:
    """A recipe's lr multiplier at each inner step (its schedule over the simulation's steps); None: constant."""
    if recipe is None or recipe.schedule == "constant":
        return None
    return SCHEDULES.get(recipe.schedule)(inner_steps)


@dataclass
class _Step:
    """One inner step's state (optimizer state, lr, step count, accumulators) and, on CUDA, its graph for
    the first batch shape it saw. The same tensors serve the eager and the captured step, so a batch of
    another shape runs eagerly in the middle of a simulation without losing anything."""

    key: _Key
    adversary: _Adversary
    inner: list[Tensor]
    frozen: list[Tensor]
    state: dict[str, list[Tensor]]
    lr: Tensor
    t: Tensor
    total: list[Tensor]
    losses: Tensor  # [query (suppression) loss sum, support (adversary) loss sum]
    graph: torch.cuda.CUDAGraph | None = None
    static: tuple[Tensor, Tensor, int] | None = None  # the captured step's input buffers and its n_query

    def reset(self, lr: float) -> None:
        """Fresh optimizer state, accumulators and step count, and this environment's lr."""
        with torch.no_grad():
            for tensors in self.state.values():
                torch._foreach_zero_(tensors)
            torch._foreach_zero_(self.total)
            self.losses.zero_()
            self.t.zero_()
            self.lr.fill_(lr)

    def eager(self, x: Tensor, y: Tensor, n_query: int) -> None:
        """Support step, in-place update, query gradient accumulation; no host sync. Under autocast, without
        its weight-cast cache: the cache would keep serving the casts of the weights before the update."""
        with _uncached_autocast(self.key.autocast):
            self._step(x, y, n_query)

    def _step(self, x: Tensor, y: Tensor, n_query: int) -> None:
        model = self.adversary.net
        _requires_grad(self.frozen, False)  # head-only: no graph through the frozen body for the support step
        loss = self.key.fit(model, x[n_query:], y[n_query:])
        grads = torch.autograd.grad(loss, self.inner)
        with torch.no_grad():
            self.t.add_(1)
            INNER_OPTIMIZERS.get(self.key.optimizer).step_(self.inner, list(grads), self.state, self.lr, self.t,
                                                           weight_decay=self.key.weight_decay)
        _requires_grad(self.frozen, True)
        q_loss = self.key.suppression(model, x[:n_query], y[:n_query])
        q_grads = torch.autograd.grad(q_loss, self.adversary.params)
        with torch.no_grad():
            torch._foreach_add_(self.total, q_grads)
            self.losses.add_(torch.stack([q_loss.detach().float(), loss.detach().float()]))

    def prepare(self, x: Tensor, y: Tensor, n_query: int) -> None:
        """On CUDA, capture the step for this batch shape once. The capture's warm-up steps write the copy's
        parameters and buffers and this step's state: the caller reloads and resets them afterwards."""
        if self.static is None and self.adversary.device.type == "cuda" and CUDA_GRAPHS:
            self._capture(x, y, n_query)

    def run(self, x: Tensor, y: Tensor, n_query: int) -> None:
        static = self.static
        if self.graph is None or static is None or static[0].shape != x.shape or static[2] != n_query:
            self.eager(x, y, n_query)
            return
        static[0].copy_(x)
        static[1].copy_(y)
        self.graph.replay()

    def _capture(self, x: Tensor, y: Tensor, n_query: int) -> None:
        """Warm up on a side stream, then capture one step reading ``self.static``'s input buffers."""
        self.static = (x.clone(), y.clone(), n_query)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.eager(x, y, n_query)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.eager(self.static[0], self.static[1], n_query)  # eager() disables the autocast cache
        self.graph = graph


@dataclass
class _Adversary:
    """The persistent adversary copy of one model, and its inner steps by key."""

    net: Net
    names: list[str]
    params: list[Tensor]
    buffers: list[Tensor]
    head: set[str]
    device: torch.device
    steps: dict[_Key, _Step] = field(default_factory=dict)
    strategies: dict[tuple[str, int], tuple[frozenset[str] | None, list[str]]] = field(default_factory=dict)

    def strategy(self, recipe: AttackConfig) -> tuple[frozenset[str] | None, list[str]]:
        """(the names ``recipe``'s strategy trains (None: all), the names it re-initialises), found once per
        strategy by applying it to this copy with a throwaway generator (the copy is reloaded before use)."""
        which = (recipe.strategy, recipe.blocks)
        if which not in self.strategies:
            before = [p.detach().clone() for p in self.params]
            names = set(STRATEGIES.get(recipe.strategy).apply(self.net, torch.Generator().manual_seed(0), recipe))
            if [n for n, _ in self.net.named_parameters()] != self.names:
                raise ValueError(f"strategy: the simulated attacker cannot run {recipe.strategy} (it changes the "
                                 "model's modules); leave it out of environments.recipes")
            reinit = [n for n, p, b in zip(self.names, self.params, before) if not torch.equal(p, b)]
            self.strategies[which] = (None if names >= set(self.names) else frozenset(names), reinit)
        return self.strategies[which]

    @classmethod
    def of(cls, model: Net) -> _Adversary:
        twin = copy.deepcopy(model).train()
        for p in twin.parameters():
            p.grad = None
            p.requires_grad_(True)
        names, params = zip(*twin.named_parameters())
        return cls(twin, list(names), list(params), list(twin.buffers()), set(model.head_param_names()),
                   params[0].device)

    def matches(self, model: Net) -> bool:
        """Same parameter names, shapes, dtypes, device and layout (else a new copy is needed)."""
        theirs = list(model.named_parameters())
        return len(theirs) == len(self.params) and all(
            n == m and p.shape == q.shape and p.dtype == q.dtype and p.device == q.device and p.stride() == q.stride()
            for (n, p), m, q in zip(theirs, self.names, self.params))

    def load(self, model: Net) -> None:
        """Overwrite the copy's parameters and buffers with the model's, in place (addresses stay fixed)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, [p.detach() for p in model.parameters()])
            for mine, theirs in zip(self.buffers, model.buffers()):
                mine.copy_(theirs)

    def step_for(self, key: _Key) -> _Step:
        if key not in self.steps:
            inner = [p for n, p in zip(self.names, self.params) if key.trainable is None or n in key.trainable]
            frozen = [p for n, p in zip(self.names, self.params) if not (key.trainable is None or n in key.trainable)]
            self.steps[key] = _Step(
                key, self, inner, frozen, INNER_OPTIMIZERS.get(key.optimizer).init(inner),
                lr=torch.zeros((), dtype=self.params[0].dtype, device=self.device),
                # float64: 1 - 0.999**t in float32 loses 1e-5 of Adam's bias correction to cancellation
                t=torch.zeros((), dtype=torch.float64, device=self.device),
                total=[torch.zeros_like(p) for p in self.params], losses=torch.zeros(2, device=self.device))
        return self.steps[key]


_ADVERSARIES: weakref.WeakKeyDictionary[Net, _Adversary] = weakref.WeakKeyDictionary()


def _adversary(model: Net) -> _Adversary:
    """The model's persistent adversary copy (made on first use, remade if the model's parameters changed)."""
    adversary = _ADVERSARIES.get(model)
    if adversary is None or not adversary.matches(model):
        adversary = _ADVERSARIES[model] = _Adversary.of(model)
    return adversary


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    return (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind == "cuda" else ()


def _uncached_autocast(state: tuple) -> contextlib.AbstractContextManager:
    """CUDA autocast as the caller had it, without its weight-cast cache (stale after an in-place update, and
    not allowed in a graph capture); nothing outside CUDA autocast."""
    if not state or not state[0]:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=state[1], enabled=True, cache_enabled=False)


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
