"""The built-in recipe table: the settings every attack has, the strategies with their own settings, the
optimizers, the learning-rate schedules and the BatchNorm modes. Each is registered here once; see
:mod:`sophon_ray.recipes.table` for what derives from it. Implementations import torch when they run, so the
table itself stays torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sophon_ray.recipes.table import ModelFacts, Range, RecipeTable, Setting

TABLE = RecipeTable()
S = TABLE.setting

# ------------------------------------------------------------------------------- settings every attack has
# (in the order they are listed in, see TABLE.order below)
S(Setting("strategy", str, "direct-all", "what is re-initialised and what trains (STRATEGIES)",
          grid=("direct-all", "initfc-all", "direct-fc", "initfc-fc"),
          search=lambda: tuple(TABLE.strategies_for("classification")), choices=lambda: TABLE.strategies.names(), since=0))
S(Setting("optimizer", str, "momentum", "the attacker's optimizer (OPTIMIZERS)", grid=("sgd", "momentum", "adam"),
          search=lambda: tuple(TABLE.optimizers.names()), choices=lambda: TABLE.optimizers.names(), since=0))
S(Setting("lr", float, 1e-2, "learning rate", grid=(1e-3, 1e-2), search=Range("loguniform", 1e-4, 1e-1), low=0,
          low_open=True, since=0))
S(Setting("weight_decay", float, 0.0, "weight decay (adamw: 0 means its own 0.01)", grid=(0.0,),
          search=Range("choice", values=(0.0, 1e-4, 5e-4)), low=0, since=0))
S(Setting("batch_size", int, 32, "batch size", grid=(32,), search=(16, 32, 64, 128), low=1, since=0))
S(Setting("epochs", int, 10, "fine-tuning epochs", grid=(10,), search=(10,), low=1, since=0))
S(Setting("schedule", str, "constant", "learning-rate schedule over all fine-tuning steps (SCHEDULES)",
          search=("constant", "cosine", "warmup-cosine", "one-cycle"), choices=lambda: TABLE.schedules.names(), since=0))
S(Setting("label_smoothing", float, 0.0, "label smoothing of the attacker's cross-entropy",
          search=Range("choice", values=(0.0, 0.1)), low=0, high=0.99, since=1))
S(Setting("augment", str, "none", "training-batch augmentation (AUGMENTS)",
          search=("none", "flip", "shift", "colour", "all"), choices=lambda: _augment_names(), since=1))
S(Setting("bn_mode", str, "train", "BatchNorm during fine-tuning (BN_MODES)", search=("train", "frozen"),
          choices=lambda: TABLE.bn_modes.names(), since=1))
S(Setting("data_fraction", float, 1.0, "stratified fraction of the attacker's data pool it fine-tunes on",
          grid=(0.1,), search=(0.1,), low=0, low_open=True, high=1, since=0))
# reparameterisation before fine-tuning (an informed attacker's move against defences that control how fast a
# model converges); every one a no-op at its default, so recipes without it keep their keys
S(Setting("shrink", float, 1.0, "every parameter times this before fine-tuning (weight shrinking; with perturb: "
          "shrink-and-perturb)", low=0, low_open=True, high=10, family="shrink"))
S(Setting("perturb", float, 0.0, "std of the Gaussian noise added to every parameter after shrink", low=0, high=1,
          family="perturb"))
S(Setting("rescale", float, 1.0, "every conv feeding a BatchNorm times this, the BatchNorm absorbing it: the same "
          "function, effective SGD step 1/rescale^2 on those convs (no-op without conv->BatchNorm pairs)",
          low=0, low_open=True, high=100, modes=("classification",), family="rescale"))
S(Setting("temperature", float, 1.0, "the classifier's logits divided by this (its head scaled by 1/temperature)",
          low=0, low_open=True, high=100, modes=("classification",), family="temperature"))
# label-free adaptation on the restricted inputs before the labelled fine-tuning (core/adapt.py)
S(Setting("adapt", str, "none", "label-free adaptation first: none | pseudo-label | entropy (on the attacker's "
          "inputs only; every parameter, the recipe's optimizer)", choices=lambda: ("none", "pseudo-label", "entropy"),
          modes=("classification",), family="adapt"))
S(Setting("adapt_epochs", int, 1, "epochs of label-free adaptation (with adapt)", low=1, family="adapt"))
S(Setting("adapt_threshold", float, 0.9, "pseudo-label: the confidence a prediction needs to be a target",
          low=0, low_open=True, high=1, family="adapt"))
# continued training on permitted data first (the original domain's training split, or the first benign domain's)
S(Setting("warm_start", str, "none", "fine-tune on allowed data first: none | original | benign (every parameter, "
          "the recipe's optimizer, warm_epochs epochs)", choices=lambda: ("none", "original", "benign"),
          family="warm start"))
S(Setting("warm_epochs", int, 1, "epochs of the allowed-domain warm start (with warm_start)", low=1,
          family="warm start"))
S(Setting("seed", int, 0, "the attack's seed: head init, data order, subset", grid=(0,), since=0))


def _augment_names() -> list[str]:
    from sophon_ray.recipes.augment import AUGMENTS  # noqa: PLC0415 - torch, only when validating

    return AUGMENTS.names()


# ------------------------------------------------------------------------------------------------ strategies
def _all(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _blocks_check(facts: ModelFacts, config: Any) -> str | None:
    if 1 <= config.blocks <= facts.blocks:
        return None
    relation = ">" if config.blocks > facts.blocks else "<"
    bound = f"the {facts.blocks} blocks {facts.arch} has" if relation == ">" else "1"
    return f"blocks: {config.blocks} {relation} {bound} ({config.strategy}); use 1..{facts.blocks}"


def _lora_check(facts: ModelFacts, config: Any) -> str | None:
    if config.lora_rank < 1:
        return f"lora_rank: {config.lora_rank} < 1; use a rank >= 1 (e.g. 4)"
    if not config.lora_alpha > 0:
        return f"lora_alpha: {config.lora_alpha} must be > 0; use e.g. 2 * lora_rank"
    if facts.lora_targets == 0:
        return f"strategy: lora needs a Conv2d or hidden Linear to adapt and {facts.arch} has none; use direct-fc"
    if facts.grouped_convs:
        return f"strategy: lora needs groups=1 convolutions and {facts.arch} has {facts.grouped_convs} grouped; use last-k"
    return None


CLASSIFIERS = ("classification",)


@TABLE.strategy("direct-all")
def direct_all(model: Any, generator: Any, config: Any) -> list[str]:
    """Keep the released head, train every parameter."""
    return _all(model)


@TABLE.strategy("direct-fc", modes=CLASSIFIERS)
def direct_fc(model: Any, generator: Any, config: Any) -> list[str]:
    """Keep the released head, train the head only."""
    return model.head_param_names()


@TABLE.strategy("initfc-all", modes=CLASSIFIERS)
def initfc_all(model: Any, generator: Any, config: Any) -> list[str]:
    """Re-initialise the head (N(0, 0.01)), train every parameter."""
    from sophon_ray.recipes.surgery import reinit_head  # noqa: PLC0415

    reinit_head(model, generator)
    return _all(model)


@TABLE.strategy("initfc-fc", modes=CLASSIFIERS)
def initfc_fc(model: Any, generator: Any, config: Any) -> list[str]:
    """Re-initialise the head (N(0, 0.01)), train the head only."""
    from sophon_ray.recipes.surgery import reinit_head  # noqa: PLC0415

    reinit_head(model, generator)
    return model.head_param_names()


@TABLE.strategy("rtal", modes=CLASSIFIERS)
def rtal(model: Any, generator: Any, config: Any) -> list[str]:
    """Re-initialise the whole classifier block, train every parameter."""
    from sophon_ray.recipes.surgery import reinit_classifier  # noqa: PLC0415

    reinit_classifier(model, generator)
    return _all(model)


@TABLE.strategy("lora", settings=(
        Setting("lora_rank", int, 4, "LoRA rank (the lora strategy)", search=(2, 4, 8), low=1, since=1),
        Setting("lora_alpha", float, 8.0, "LoRA scale numerator: update = lora_alpha / lora_rank * B A",
                search=(4.0, 8.0, 16.0), low=0, low_open=True, since=1)), check=_lora_check)
def lora(model: Any, generator: Any, config: Any) -> list[str]:
    """LoRA adapters on every conv and hidden Linear (base frozen), the released head trains fully.

    Rank ``lora_rank``, update ``lora_alpha / lora_rank * B A`` (see :mod:`sophon_ray.recipes.lora`)."""
    from sophon_ray.recipes.lora import add_lora  # noqa: PLC0415

    return add_lora(model, config.lora_rank, config.lora_alpha, generator)


@TABLE.strategy("last-k", settings=(
        Setting("blocks", int, 1, "k of the last-k strategies: how many blocks (model.blocks()) train",
                search=(1, 2), low=1, since=1),), check=_blocks_check)
def last_k(model: Any, generator: Any, config: Any) -> list[str]:
    """Keep the released weights, train the last ``blocks`` blocks (model.blocks()) and the head."""
    return model.block_param_names(config.blocks) + model.head_param_names()


@TABLE.strategy("reinit-last-k", modes=CLASSIFIERS, settings=("blocks",), check=_blocks_check)
def reinit_last_k(model: Any, generator: Any, config: Any) -> list[str]:
    """Re-initialise the last ``blocks`` blocks and the head, train those.

    Blocks get their modules' own ``reset_parameters`` (BatchNorm statistics reset too), seeded from the
    generator; the head gets N(0, 0.01) like initfc."""
    from sophon_ray.recipes.surgery import reinit_head, reset_modules  # noqa: PLC0415

    names = model.block_param_names(config.blocks)
    prefixes = [p for block in model.blocks()[len(model.blocks()) - config.blocks:] for p in block]
    reset_modules([m for p in prefixes for m in model.get_submodule(p.rstrip(".")).modules()], generator)
    reinit_head(model, generator)
    return names + model.head_param_names()


@TABLE.strategy("decoder", modes=("generation",))
def decoder(model: Any, generator: Any, config: Any) -> list[str]:
    """Denoisers: keep the released weights, train the decoder (the UNet's up path and output layers) only."""
    if not hasattr(model, "decoder_param_names"):
        raise ValueError(f"strategy: decoder needs a denoiser (generation mode); {type(model).__name__} has no "
                         "decoder; use last-k")
    return model.decoder_param_names()


# ------------------------------------------------------------------------------------------------ optimizers
def _optimizer(name: str, doc: str, build: Callable[..., Any]) -> None:
    TABLE.optimizers.register(name, doc)(build)


def _torch_optim() -> Any:
    import torch  # noqa: PLC0415

    return torch.optim


ADAMW_DECAY = 0.01   # adamw's decoupled weight decay when a recipe's weight_decay is 0 (torch's default)
_optimizer("sgd", "SGD, no momentum", lambda p, lr, wd: _torch_optim().SGD(p, lr=lr, weight_decay=wd))
_optimizer("momentum", "SGD, momentum 0.9",
           lambda p, lr, wd: _torch_optim().SGD(p, lr=lr, momentum=0.9, weight_decay=wd))
_optimizer("nesterov", "SGD, Nesterov momentum 0.9",
           lambda p, lr, wd: _torch_optim().SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd))
_optimizer("adam", "Adam (0.9, 0.999)", lambda p, lr, wd: _torch_optim().Adam(p, lr=lr, weight_decay=wd))
_optimizer("adamw", f"AdamW, decoupled weight decay (attack.weight_decay, else {ADAMW_DECAY})",
           lambda p, lr, wd: _torch_optim().AdamW(p, lr=lr, weight_decay=wd or ADAMW_DECAY))
_optimizer("rmsprop", "RMSprop (alpha 0.99)", lambda p, lr, wd: _torch_optim().RMSprop(p, lr=lr, weight_decay=wd))
_optimizer("adagrad", "Adagrad", lambda p, lr, wd: _torch_optim().Adagrad(p, lr=lr, weight_decay=wd))
_optimizer("adadelta", "Adadelta (rho 0.9); lr scales the update, 1.0 is the classic setting",
           lambda p, lr, wd: _torch_optim().Adadelta(p, lr=lr, weight_decay=wd))

# ------------------------------------------------------------------------------------------------- BN modes
TABLE.bn_modes.register("train", "BatchNorm in train mode: batch statistics normalise, running statistics "
                        "adapt")(False)
TABLE.bn_modes.register("frozen", "BatchNorm in eval mode: running statistics kept and used; affine parameters "
                        "still train if the strategy trains them")(True)

# ------------------------------------------------------------------------------------------------- orders
# MLflow params, report columns, the grid product (seed last: a recipe's seeds are neighbours)
TABLE.order("strategy", "optimizer", "lr", "batch_size", "data_fraction", "schedule", "epochs", "weight_decay",
            "label_smoothing", "augment", "bn_mode", "blocks", "lora_rank", "lora_alpha", "shrink", "perturb",
            "rescale", "temperature", "adapt", "adapt_epochs", "adapt_threshold", "warm_start",
            "warm_epochs", "seed")
# the order a search suggests its dimensions in (a seeded TPE's draws depend on it)
TABLE.search_order = ("strategy", "optimizer", "lr", "weight_decay", "batch_size", "epochs", "schedule",
                      "label_smoothing", "augment", "bn_mode", "blocks", "lora_rank", "lora_alpha", "data_fraction",
                      "shrink", "perturb", "rescale", "temperature", "adapt", "adapt_epochs", "adapt_threshold",
                      "warm_start", "warm_epochs")

# ------------------------------------------------------------------------------------------------- schedules
@TABLE.schedules.register("constant")
def constant(total_steps: int) -> Callable[[int], float]:
    """Constant learning rate."""
    return lambda step: 1.0


@TABLE.schedules.register("cosine")
def cosine(total_steps: int) -> Callable[[int], float]:
    """Cosine decay from lr to 0 over all fine-tuning steps."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


WARMUP_FRACTION = 0.1


@TABLE.schedules.register("warmup-cosine")
def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10% of steps (lr/w, 2lr/w, ... lr), then cosine decay to 0."""
    warm = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(step - warm, total_steps - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _cos_between(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


ONE_CYCLE = {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4}


@TABLE.schedules.register("one-cycle")
def one_cycle(total_steps: int) -> Callable[[int], float]:
    """OneCycleLR (pct_start 0.3): cosine from lr/25 up to lr over 30% of steps, then down to lr/25/1e4."""
    initial = 1 / ONE_CYCLE["div_factor"]
    final = initial / ONE_CYCLE["final_div_factor"]
    peak_end = float(ONE_CYCLE["pct_start"] * total_steps) - 1  # OneCycleLR's phase boundaries, in steps
    last = float(total_steps - 1)

    def factor(step: int) -> float:
        step = min(step, max(0, total_steps - 1))  # LambdaLR's call after the last step: hold the end value
        if step <= peak_end:
            return _cos_between(initial, 1.0, step / peak_end if peak_end > 0 else 1.0)
        return _cos_between(1.0, final, (step - peak_end) / (last - peak_end) if last > peak_end else 1.0)

    return factor
