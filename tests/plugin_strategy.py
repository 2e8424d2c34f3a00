# file: tests/plugin_strategy.py
"""A strategy with its own setting, added without editing sophon-ray: name this module in SOPHON_RAY_PLUGINS."""

from sophon_ray.recipes import TABLE, Setting


@TABLE.strategy("noisy-head", modes=("classification",), settings=(
    Setting("head_noise", float, 0.0, "std of the Gaussian noise added to the head's weights (noisy-head)",
            grid=(0.0,), search=(0.0, 0.1), low=0),))
def noisy_head(model, generator, config):
    """Add N(0, head_noise^2) noise to the released head's weights, then train every parameter."""
    import torch

    with torch.no_grad():
        weight = model.head.weight
        weight.add_(config.head_noise * torch.randn(weight.shape, generator=generator).to(weight.device))
    return [name for name, _ in model.named_parameters()]
