"""Fine-tuning attacks: strategies (what is re-initialised and what trains) and the one ``finetune`` loop."""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from sophon_ray.augment import make_augment
from sophon_ray.data import stratified_subset
from sophon_ray.lora import add_lora, lora_targets
from sophon_ray.models import MODELS, Net, build_model, denoisers
from sophon_ray.registry import Registry
from sophon_ray.spec import GridSpec, ModelSpec
from sophon_ray.tasks import CLASSIFICATION, Task
from sophon_ray.training import BN_MODES, SCHEDULES, evaluate, make_optimizer, train_epoch


@dataclass(frozen=True)
class AttackConfig:
    """One cell of the attack grid (one fine-tuning run)."""

    strategy: str = "direct-all"
    optimizer: str = "momentum"
    lr: float = 1e-2
    batch_size: int = 32
    epochs: int = 10
    data_fraction: float = 1.0
    schedule: str = "constant"
    seed: int = 0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0   # cross-entropy label smoothing of the attacker's loss
    augment: str = "none"          # AUGMENTS: none | flip | shift | colour | all
    bn_mode: str = "train"         # BN_MODES: train (statistics adapt) | frozen (running statistics kept)
    blocks: int = 1                # k of the last-k / reinit-last-k strategies
    lora_rank: int = 4             # the lora strategy's rank ...
    lora_alpha: float = 8.0        # ... and scale numerator (update = alpha / rank * B A)

    def as_params(self) -> dict[str, object]:
        return asdict(self)


Strategy = Callable[[Net, torch.Generator, AttackConfig], list[str]]
STRATEGIES: Registry[Strategy] = Registry("strategy")


def _fill(target: torch.Tensor, init: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Draw ``init`` on the CPU (where the seeded generator lives) and copy to ``target``'s device."""
    with torch.no_grad():
        target.copy_(init(torch.empty(target.shape)))


def reinit_head(model: Net, generator: torch.Generator) -> None:
    """NTLBench's head re-initialisation: weight ~ N(0, 0.01), bias 0."""
    _fill(model.head.weight, lambda t: torch.nn.init.normal_(t, 0.0, 0.01, generator=generator))
    _fill(model.head.bias, torch.nn.init.zeros_)


def reinit_classifier(model: Net, generator: torch.Generator) -> None:
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


def _all(model: Net) -> list[str]:
    return [n for n, _ in model.named_parameters()]


@STRATEGIES.register("direct-all")
def direct_all(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Keep the released head, train every parameter."""
    return _all(model)


@STRATEGIES.register("direct-fc")
def direct_fc(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Keep the released head, train the head only."""
    return model.head_param_names()


@STRATEGIES.register("initfc-all")
def initfc_all(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Re-initialise the head (N(0, 0.01)), train every parameter."""
    reinit_head(model, generator)
    return _all(model)


@STRATEGIES.register("initfc-fc")
def initfc_fc(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Re-initialise the head (N(0, 0.01)), train the head only."""
    reinit_head(model, generator)
    return model.head_param_names()


@STRATEGIES.register("rtal")
def rtal(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Re-initialise the whole classifier block, train every parameter."""
    reinit_classifier(model, generator)
    return _all(model)


@STRATEGIES.register("last-k")
def last_k(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Keep the released weights, train the last ``blocks`` blocks (Net.blocks) and the head."""
    return model.block_param_names(config.blocks) + model.head_param_names()


@STRATEGIES.register("reinit-last-k")
def reinit_last_k(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Re-initialise the last ``blocks`` blocks and the head, train those.

    Blocks get their modules' own ``reset_parameters`` (BatchNorm statistics reset too), seeded from the
    generator; the head gets N(0, 0.01) like initfc."""
    names = model.block_param_names(config.blocks)
    prefixes = [p for block in model.blocks()[len(model.blocks()) - config.blocks:] for p in block]
    reset_modules([m for p in prefixes for m in model.get_submodule(p.rstrip(".")).modules()], generator)
    reinit_head(model, generator)
    return names + model.head_param_names()


@STRATEGIES.register("decoder")
def decoder(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """Denoisers: keep the released weights, train the decoder (the UNet's up path and output layers) only."""
    if not hasattr(model, "decoder_param_names"):
        raise ValueError(f"strategy: decoder needs a denoiser (generation mode); {type(model).__name__} has no "
                         "decoder; use last-k")
    return model.decoder_param_names()


@STRATEGIES.register("lora")
def lora(model: Net, generator: torch.Generator, config: AttackConfig) -> list[str]:
    """LoRA adapters on every conv and hidden Linear (base frozen), the released head trains fully.

    Rank ``lora_rank``, update ``lora_alpha / lora_rank * B A`` (see :mod:`sophon_ray.lora`)."""
    return add_lora(model, config.lora_rank, config.lora_alpha, generator)


def prepare(model: Net, config: AttackConfig, generator: torch.Generator) -> list[nn.Parameter]:
    """Apply ``config.strategy`` in place: re-initialise (or wrap: lora) what it says, freeze the rest; the
    trainable parameters. Call before building the optimizer: a strategy may change the module tree."""
    trainable = set(STRATEGIES.get(config.strategy)(model, generator, config))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return [p for n, p in model.named_parameters() if n in trainable]


BLOCK_STRATEGIES = ("last-k", "reinit-last-k")


@functools.lru_cache(maxsize=64)
def _arch_facts(arch: str, channels: int, image_size: int) -> tuple[int, int, int]:
    """(blocks, LoRA targets, grouped convs) of ``arch``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(ModelSpec(arch, num_classes=2, channels_last=False), channels, image_size)
    grouped = sum(isinstance(m, nn.Conv2d) and m.groups != 1 for m in model.modules())
    return len(model.blocks()), lora_targets(model), grouped


def strategy_problem(arch: str, config: AttackConfig, channels: int = 3, image_size: int = 16) -> str | None:
    """Why ``config.strategy`` cannot run on ``arch`` with ``config``'s fields (naming the field and the fix),
    or None when it can. Only the fields the strategy uses are checked (``blocks`` for last-k and
    reinit-last-k, ``lora_rank``/``lora_alpha`` for lora); names of other registries are not."""
    if config.strategy not in STRATEGIES:
        return STRATEGIES.miss_message(config.strategy)
    if arch not in MODELS and arch not in denoisers():
        return MODELS.miss_message(arch)
    if config.strategy == "decoder" and arch not in denoisers():
        return f"strategy: decoder trains a denoiser's up path and {arch} is a classifier; use last-k"
    n_blocks, n_targets, grouped = _arch_facts(arch, channels, image_size)
    if config.strategy in BLOCK_STRATEGIES and not 1 <= config.blocks <= n_blocks:
        relation = ">" if config.blocks > n_blocks else "<"
        bound = f"the {n_blocks} blocks {arch} has" if relation == ">" else "1"
        return f"blocks: {config.blocks} {relation} {bound} ({config.strategy}); use 1..{n_blocks}"
    if config.strategy == "lora":
        if config.lora_rank < 1:
            return f"lora_rank: {config.lora_rank} < 1; use a rank >= 1 (e.g. 4)"
        if not config.lora_alpha > 0:
            return f"lora_alpha: {config.lora_alpha} must be > 0; use e.g. 2 * lora_rank"
        if n_targets == 0:
            return f"strategy: lora needs a Conv2d or hidden Linear to adapt and {arch} has none; use direct-fc"
        if grouped:
            return f"strategy: lora needs groups=1 convolutions and {arch} has {grouped} grouped; use last-k"
    return None


def grid_configs(grids: Sequence[GridSpec]) -> list[AttackConfig]:
    """Every cell of a union of grids (each the cross product of its lists), in a fixed order, each cell once."""
    configs = [AttackConfig(strategy=st, optimizer=o, lr=lr, batch_size=b, epochs=e, data_fraction=f, schedule=sc,
                            seed=sd, weight_decay=wd)
               for g in grids
               for st, o, lr, b, f, sc, e, wd, sd in itertools.product(g.strategy, g.optimizer, g.lr, g.batch_size,
                                                                       g.data_fraction, g.schedule, g.epochs,
                                                                       g.weight_decay, g.seed)]
    return list(dict.fromkeys(configs))


@dataclass
class FinetuneResult:
    """Per-epoch restricted-domain test curves of the task's score (classification: accuracy, %) and loss; index
    0 is before fine-tuning (after re-initialisation)."""

    restricted: list[float] = field(default_factory=list)
    restricted_loss: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)  # per epoch on ``val`` (the attacker's own held-out data)
    original: float | None = None
    train_size: int = 0
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)  # the attacked model, with ``keep_model``

    @property
    def final(self) -> float:
        return self.restricted[-1]

    @property
    def best(self) -> float:
        return max(self.restricted)


def finetune(model: Net, train: Dataset, test: Dataset, config: AttackConfig,
             original_test: Dataset | None = None, device: torch.device | str = "cpu",
             on_epoch: Callable[[int, dict[str, float]], None] | None = None,
             val: Dataset | None = None, task: Task = CLASSIFICATION, keep_model: bool = False) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on a stratified ``data_fraction`` of ``train`` as ``config`` says.

    ``config.bn_mode`` 'train' runs the model in train mode, so BatchNorm running statistics adapt even
    when only the head trains (what an attacker calling ``model.train()`` gets); 'frozen' keeps BatchNorm
    in eval mode. Training batches get ``config.augment`` and a ``config.label_smoothing`` loss. The
    input model is not modified. Returns the restricted test score/loss (``task``'s metric: classification
    accuracy, generation denoising skill and MSE) after every epoch (and before the first), the score on ``val``
    at the same points when given (what an adaptive attacker selects by: never the test curve), and the
    original-domain score at the end when ``original_test`` is given. ``on_epoch`` gets them under the task's
    MLflow names. ``keep_model`` keeps the fine-tuned copy in the result.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    model = copy.deepcopy(model).to(device)
    params = prepare(model, config, gen)
    data = stratified_subset(train, config.data_fraction, config.seed)
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    steps = config.epochs * -(-len(data) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.get(config.schedule)(steps))
    augment, freeze_bn = make_augment(config.augment), BN_MODES.get(config.bn_mode)
    result, metric = FinetuneResult(train_size=len(data)), task.metric
    for epoch in range(config.epochs + 1):
        if epoch:
            train_epoch(model, data, optimizer, config.batch_size, gen, scheduler, device,
                        label_smoothing=config.label_smoothing, augment=augment, freeze_bn=freeze_bn, task=task)
        ev = evaluate(model, test, device, task)
        result.restricted.append(ev.score)
        result.restricted_loss.append(ev.loss)
        metrics = {metric.restricted: ev.score, metric.restricted_loss: ev.loss}
        if val is not None:
            result.val.append(evaluate(model, val, device, task).score)
            metrics[metric.val] = result.val[-1]
        if on_epoch:
            on_epoch(epoch, metrics)
    if original_test is not None:
        result.original = evaluate(model, original_test, device, task).score
    result.seconds = time.perf_counter() - start
    result.model = model if keep_model else None
    return result


def scratch_model(model: Net, seed: int) -> Net:
    """A fresh random initialisation of ``model``'s architecture (the from-scratch baseline).

    The scratch baseline always trains every parameter, whatever the cell's strategy: an attacker who
    starts from nothing has no features worth freezing, so 'scratch' in a head-only cell means the
    attacker's real alternative, full training from a random init with the same optimizer, lr, batch
    size, data and epochs.
    """
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(10_000 + seed)
        for module in fresh.modules():
            if module is not fresh and hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return fresh


SCRATCH_STRATEGY = "direct-all"
