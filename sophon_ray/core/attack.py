"""The one fine-tuning loop (``finetune``): an attack recipe (:class:`~sophon_ray.recipes.AttackConfig`) applied to a
copy of a model, and the from-scratch baseline (``scratch_model``)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from sophon_ray.recipes import BN_MODES, SCHEDULES, STRATEGIES, AttackConfig
from sophon_ray.recipes.augment import make_augment
from sophon_ray.recipes.surgery import reparameterise
from sophon_ray.core.adapt import adapt, inputs_of
from sophon_ray.core.data import stratified_subset
from sophon_ray.seam import Model as Net
from sophon_ray.seam import Evaluation, Task
from sophon_ray.core.training import evaluate, make_optimizer, train_epoch


REPARAMETERISE_SEED = 20_000  # offset of the reparameterisation's noise seed from the attack's seed


def prepare(model: Net, config: AttackConfig, generator: torch.Generator) -> list[nn.Parameter]:
    """Apply ``config.strategy`` in place: re-initialise (or wrap: lora) what it says, freeze the rest; the
    trainable parameters. Call before building the optimizer: a strategy may change the module tree."""
    trainable = set(STRATEGIES.get(config.strategy).apply(model, generator, config))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return [p for n, p in model.named_parameters() if n in trainable]


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
             val: Dataset | None = None, *, task: Task, keep_model: bool = False,
             warm: Dataset | None = None) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on a stratified ``data_fraction`` of ``train`` as ``config`` says.

    ``config.bn_mode`` 'train' runs the model in train mode, so BatchNorm running statistics adapt even
    when only the head trains (what an attacker calling ``model.train()`` gets); 'frozen' keeps BatchNorm
    in eval mode. Training batches get ``config.augment`` and a ``config.label_smoothing`` loss. The
    input model is not modified. Returns the restricted test score/loss (``task``'s metric: classification
    accuracy, generation denoising skill and MSE) after every epoch (and before the first), the score on ``val``
    at the same points when given (what an adaptive attacker selects by: never the test curve), and the
    original-domain score at the end when ``original_test`` is given. ``on_epoch`` gets them under the task's
    MLflow names, and before the first and after the last epoch the task's finer numbers too (generation:
    ``restricted_skill_t<t>`` and ``restricted_mse_t<t>`` per evaluation timestep). Training minimises the task's
    ``attack`` stage loss (generation: the DDPM loss at ``generation.attack_t``). ``keep_model`` keeps the fine-tuned copy in the result. ``warm``: the allowed data a
    ``warm_start`` recipe trains on first (after any reparameterisation, before label-free adaptation and the
    strategy).
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    model = copy.deepcopy(model).to(device)
    # its own generator: a recipe without reparameterisation draws exactly what it drew before
    reparameterise(model, config, torch.Generator().manual_seed(REPARAMETERISE_SEED + config.seed))
    if config.warm_start != "none":  # continued training on allowed data, every parameter, its own generator
        if warm is None:
            raise ValueError(f"warm_start: {config.warm_start} needs its allowed data (finetune(..., warm=...)); "
                             "set warm_start: none or pass the data")
        warm_up = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        warm_gen = torch.Generator().manual_seed(REPARAMETERISE_SEED + 2 + config.seed)
        for _ in range(config.warm_epochs):
            train_epoch(model, warm, warm_up, config.batch_size, warm_gen, device=device, task=task, stage="attack")
    data = stratified_subset(train, config.data_fraction, config.seed)
    if config.adapt != "none":  # label-free first, on the attacker's inputs only, with its own generator
        adapt(model, inputs_of(data), config.adapt, config.adapt_epochs,
              make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay),
              config.batch_size, torch.Generator().manual_seed(REPARAMETERISE_SEED + 1 + config.seed),
              config.adapt_threshold, device)
    params = prepare(model, config, gen)
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    steps = config.epochs * -(-len(data) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.get(config.schedule)(steps))
    augment, freeze_bn = make_augment(config.augment), BN_MODES.get(config.bn_mode)
    result = FinetuneResult(train_size=len(data))
    for epoch in range(config.epochs + 1):
        if epoch:
            train_epoch(model, data, optimizer, config.batch_size, gen, scheduler, device,
                        label_smoothing=config.label_smoothing, augment=augment, freeze_bn=freeze_bn, task=task,
                        stage="attack")
        ev = evaluate(model, test, device, task=task)
        result.restricted.append(ev.score)
        result.restricted_loss.append(ev.loss)
        val_ev = evaluate(model, val, device, task=task) if val is not None else None
        if val_ev is not None:
            result.val.append(val_ev.score)
        metrics = epoch_metrics(task, epoch, config.epochs, ev, val_ev)
        if on_epoch:
            on_epoch(epoch, metrics)
    if original_test is not None:
        result.original = evaluate(model, original_test, device, task=task).score
    result.seconds = time.perf_counter() - start
    result.model = model if keep_model else None
    return result


def epoch_metrics(task: Task, epoch: int, epochs: int, test: Evaluation, val: Evaluation | None) -> dict[str, float]:
    """What a fine-tuning hands ``on_epoch`` after ``epoch``: the restricted score and loss under the task's MLflow
    names, before the first and after the last epoch the task's finer numbers too (generation: per timestep), and
    the score on the attacker's own ``val`` data when there is one."""
    metric = task.metric
    metrics = {metric.restricted: test.score, metric.restricted_loss: test.loss}
    if epoch in (0, epochs):
        metrics |= test.logged("restricted")
    if val is not None:
        metrics[metric.val] = val.score
    return metrics


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

