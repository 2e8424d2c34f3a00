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


def conv_norm_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]]:
    """(convolution, the BatchNorm right after it) pairs, in registration order: a BatchNorm that is the next module
    with parameters after a Conv2d and normalises its outputs (convnet's Sequential blocks, ResNet's conv1/bn1,
    conv2/bn2 and downsample pairs). Pre-activation nets (GroupNorm before the conv) have none."""
    pairs, previous = [], None
    for module in model.modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if (isinstance(previous, nn.Conv2d) and isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.num_features == previous.out_channels):
            pairs.append((previous, module))
        previous = module
    return pairs


@torch.no_grad()
def rescale_convs(model: nn.Module, factor: float) -> int:
    """Multiply every convolution that feeds a BatchNorm by ``factor`` (weight and bias) and let the BatchNorm absorb
    it (running mean x factor, running variance x factor^2): the function is unchanged (up to the BatchNorm's eps),
    but the convolution's weights are ``factor`` times larger, so a gradient step of the same size changes them
    ``1 / factor`` times less relative to themselves (with SGD, an effective learning rate 1 / factor^2 times the
    nominal one). Returns how many pairs were rescaled."""
    pairs = conv_norm_pairs(model)
    for conv, norm in pairs:
        conv.weight.mul_(factor)
        if conv.bias is not None:
            conv.bias.mul_(factor)
        if norm.running_mean is not None:
            norm.running_mean.mul_(factor)
            norm.running_var.mul_(factor * factor)
    return len(pairs)


@torch.no_grad()
def reparameterise(model: nn.Module, config: object, generator: torch.Generator) -> None:
    """An informed attacker's reparameterisation before fine-tuning, as ``config`` says (each a no-op at its
    default): ``rescale`` (function-preserving conv -> BatchNorm rescaling), ``temperature`` (the classifier's
    logits divided by it: the head's weight and bias scaled by 1 / temperature), then ``shrink`` (every parameter
    times it) and ``perturb`` (plus N(0, perturb^2) noise drawn from ``generator``): shrink-and-perturb."""
    if config.rescale != 1.0:
        rescale_convs(model, config.rescale)
    if config.temperature != 1.0:
        model.head.weight.div_(config.temperature)
        if model.head.bias is not None:
            model.head.bias.div_(config.temperature)
    if config.shrink != 1.0 or config.perturb:
        for param in model.parameters():
            param.mul_(config.shrink)
            if config.perturb:
                noise = torch.randn(param.shape, generator=generator) * config.perturb
                param.add_(noise.to(device=param.device, dtype=param.dtype))
