"""Model surgery by parameter name, for the attack strategies and the model families: re-initialising heads,
classifier blocks and whole modules reproducibly from a seeded generator, and naming the parameters of the last
k blocks."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def last_blocks(model: nn.Module, blocks: list[list[str]], k: int) -> list[str]:
    """Names of ``model``'s parameters under the prefixes of the last ``k`` of ``blocks`` (0 <= k <= len(blocks))."""
    if not 0 <= k <= len(blocks):
        raise ValueError(f"blocks: {k} is outside 0..{len(blocks)} (this model has {len(blocks)} blocks)")
    prefixes = tuple(p for block in blocks[len(blocks) - k:] for p in block)
    return [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]



def _fill(target: torch.Tensor, init: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Draw ``init`` on the CPU (where the seeded generator lives) and copy to ``target``'s device."""
    with torch.no_grad():
        target.copy_(init(torch.empty(target.shape)))


def reinit_head(model: nn.Module, generator: torch.Generator) -> None:
    """NTLBench's head re-initialisation: weight ~ N(0, 0.01), bias 0."""
    _fill(model.head.weight, lambda t: torch.nn.init.normal_(t, 0.0, 0.01, generator=generator))
    _fill(model.head.bias, torch.nn.init.zeros_)


def reinit_classifier(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every Linear of the classifier block (Kaiming-uniform, PyTorch's default scheme)."""
    for layer in model.classifier:
        if isinstance(layer, nn.Linear):
            bound = 1 / layer.in_features**0.5
            _fill(layer.weight, lambda t: torch.nn.init.kaiming_uniform_(t, a=5**0.5, generator=generator))
            _fill(layer.bias, lambda t: torch.nn.init.uniform_(t, -bound, bound, generator=generator))


def reset_modules(modules: list[nn.Module], generator: torch.Generator) -> None:
    """Re-initialise ``modules`` with their own ``reset_parameters`` (BatchNorm: statistics too), seeded from
    ``generator``: each is reset on a CPU copy under a forked CPU RNG, then copied back, so the draw is the
    same on every device and the global RNG is left as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(seed)
        for module in modules:
            if hasattr(module, "reset_parameters"):
                fresh = copy.deepcopy(module).cpu()
                fresh.reset_parameters()
                module.load_state_dict(fresh.state_dict())
