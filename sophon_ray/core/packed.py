"""Packed attack trials: many fine-tunings of one subject model trained together in one process.

An attack trial is one :func:`~sophon_ray.core.attack.finetune` call; on a small model each of its steps is
mostly per-operation overhead, paid again by every one of thousands of trials. :func:`finetune_pack` trains M
*members* (one attack config each) as one batched model and returns what M ``finetune`` calls would have returned.

Members. Member i is exactly what ``finetune(model, ..., configs[i])`` trains: a copy of the subject model,
reparameterised and prepared by its strategy with its own seeded generators, its own stratified subset (its seed),
its own data order and augmentation draws (its own generator, drawn in ``train_epoch``'s order: the epoch's order,
then each batch's augmentation). Their parameters and buffers are then stacked along a leading member dimension
(``torch.func.stack_module_state``, made contiguous) and trained together, each step on a stacked batch
``[M, B, ...]`` of every member's own batch:

- forward, one of two formulations (``formulation``): ``vmap`` is ``torch.vmap`` over
  ``torch.func.functional_call`` and runs any model; ``grouped`` runs a ``body`` -> ``classifier`` model whose two
  parts are ``nn.Sequential`` s of convolutions, BatchNorm2d, pooling, activations, one Flatten and Linears (the
  convnets) as one wide model: a convolution becomes one convolution of M x groups groups over the members'
  channels side by side (``[B, M*C, H, W]``), a BatchNorm one BatchNorm over M x C channels (per-member statistics
  by construction; in evaluation folded into the convolution before it, :func:`folded_batch_norms`), a Linear one
  batched matmul. ``auto`` (the default) takes ``grouped`` where the model allows it
  (checked on a probe batch against ``vmap``), else ``vmap``. ``grouped`` avoids the layout copies vmap's batching
  rules make around every layer. bench/packed.py measures both against sequential ``finetune`` calls: on this
  project's CPU (1 thread, convnet, 8 px) grouped packs of 8-32 took half the time per member, vmap packs about
  the same as sequential calls (at 16 px vmap was slower, and grouped gained only up to ~8 members); a pack of one
  is slower than ``finetune``.
- loss: the task's ``attack``-stage fitting loss, called on each member's logits and labels; the gradient of the
  sum of the members' losses is every member's own gradient (members share no parameter).
- optimizer: the registered functional twin of the attacker's optimizer
  (:data:`~sophon_ray.core.inner_optimizers.INNER_OPTIMIZERS`), run once over the stacked trainable tensors. Every
  attacker optimizer's step is ``-lr * u`` with an update ``u`` its state computes without the lr, so the twin runs
  with lr 1 on a zeroed scratch copy (giving ``-u``) and each member's own lr scales it: its config's lr times its
  schedule's factor at the step (``LambdaLR``'s). Weight decay is per member too, applied as ``torch.optim`` applies
  it for that optimizer: L2 on the gradient, or adamw's decoupled ``p *= 1 - lr * wd`` (wd 0 meaning 0.01). Frozen
  parameters (the strategy's) are stacked but never updated.
- BatchNorm: ``bn_mode`` train updates every member's own running statistics, frozen keeps BatchNorm in eval mode.
- evaluation: one batched forward over the evaluation set gives every member's logits; the task's own
  ``evaluate`` then scores each member on a view that hands it its logits batch by batch, so the scores and losses
  are the task's (``restricted``, ``restricted_loss``, ``val``, ``original``), per epoch, as ``finetune`` logs them.
  Before training (epoch 0) members with equal tensors are evaluated once, and an evaluation this process already
  made of the same tensors, data and task is reused (:func:`initial_evaluations`): a direct-* strategy leaves every
  member, and the next packs' members, as the subject model is.

What packs. :func:`pack_key` is what members of one pack share: every recipe setting except the per-member ones
(:data:`PER_MEMBER`: lr, weight decay, schedule, augmentation, the reparameterisation settings and the seed), so the
strategy and its own settings, the optimizer, batch size, epochs, data fraction (hence the steps per epoch), BatchNorm
mode and label smoothing. Schedules and augmentations are per member because they change neither the batched graph
nor the number of steps (a member's lr factor and its augmentation of its own batch are computed apart). A new
recipe setting is shared until this module handles it per member, so it can never be silently ignored.
:func:`why_not_packable` says why a config cannot pack at all:

- ``adapt`` (label-free adaptation) and ``warm_start``: each is a training phase of its own before the attack (on
  the member's inputs with pseudo-labels its own model picks, or on separate allowed data); packing batches the
  labelled fine-tuning only. Run these recipes unpacked (``finetune``).
- an optimizer without a functional twin in ``INNER_OPTIMIZERS`` (a plugin's ``torch.optim`` optimizer).
- a strategy for another mode (``decoder``): packing is classification-only. Generation's attack loss draws its
  timesteps and noise from torch's global RNG, whose draws a pack cannot split as sequential trials get them.

The subject model itself cannot pack when it draws random numbers in its forward (``Dropout``: vgg13): the masks
come from the global RNG too (:func:`why_model_not_packable`). LoRA packs (vmap formulation): its rank and alpha are
strategy settings, so members of a pack wrap the same layers the same way.

Same answers: a member's curves and weights are ``finetune``'s up to float32 rounding (other kernels: a grouped or
batched convolution, the lr applied after the update), within 1e-4 on the curves in the tests. Where training is
chaotic at that level (adaptive optimizers at a high lr divide by the root of a tiny second moment), the rounding
grows, as it does between two ``finetune`` runs of one config on 1 and on 2 threads.

Limits: members train in lockstep for all their epochs: one cannot stop early on its own (a scheduler's early stop
would stop the pack). The members' state is held M times (stacked, plus one working copy per member while they are
prepared, and the kept models with ``keep_model``). ``seconds`` of each result is the pack's wall time divided by
its size. ``finetune``'s preparation (copy, reparameterise, subset, strategy) and its per-epoch metrics are mirrored
here, not shared: a change to either must change both (the tests compare the two on every optimizer and packable
strategy). CUDA: written for any device, tested on the CPU only.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state
from torch.utils.data import Dataset, TensorDataset

from sophon_ray.core.attack import REPARAMETERISE_SEED, FinetuneResult, epoch_metrics, prepare
from sophon_ray.core.data import batches, stratified_subset
from sophon_ray.core.inner_optimizers import INNER_OPTIMIZERS, InnerOptimizer, State
from sophon_ray.core.training import set_bn_eval
from sophon_ray.recipes import BN_MODES, SCHEDULES, SETTINGS, STRATEGIES, AttackConfig, normalise
from sophon_ray.recipes.builtin import ADAMW_DECAY
from sophon_ray.recipes.augment import make_augment
from sophon_ray.recipes.surgery import reparameterise
from sophon_ray.seam import Evaluation, Task

# the recipe settings members of one pack may differ in (everything else is in pack_key)
PER_MEMBER = ("lr", "weight_decay", "schedule", "augment", "shrink", "perturb", "rescale", "temperature", "seed")
# optimizer -> the decoupled weight decay it applies when weight_decay is 0 (as recipes/builtin.py builds adamw)
DECOUPLED_DECAY = {"adamw": ADAMW_DECAY}
MODE = "classification"
FORMULATIONS = ("auto", "grouped", "vmap")
PROBE_SIZE = 4          # samples of the probe batch ``auto`` checks the grouped formulation on
# Rows (members x samples) of one packed evaluation forward on the CPU. Measured (bench/tune_throughput.py's grid:
# 6 members, convnet 16 px, 10 epochs, 11 evaluations of 1000 images + 1 of the original test set, 1 thread): a
# pack's finetune_pack took 2.90 s evaluating whole batches of 1000, 1.79 s at 2048 rows, 1.33 at 512, 1.41 at 256,
# 1.51 at 128 (6 sequential finetune calls: 1.79 s).
EVAL_ROWS = 512
PROBE_TOLERANCE = 1e-4  # |grouped - vmap| logits allowed on the probe

PackKey = tuple[tuple[str, Any], ...]
# (x, shared, training) -> logits [M, B, classes]; x is [M, B, ...] (each member's batch) or, shared, [B, ...]
Forward = Callable[[Tensor, bool, bool], Tensor]


# ------------------------------------------------------------------------------------------------ what packs
def why_not_packable(config: AttackConfig) -> str | None:
    """Why ``config`` cannot be a member of any pack (what to do instead), or None: for a dry run."""
    if config.adapt != "none":
        return (f"adapt: {config.adapt} is a label-free adaptation phase before the attack, on pseudo-labels each "
                "member's own model picks; packing batches the labelled fine-tuning only. Run it unpacked (finetune) "
                "or set adapt: none")
    if config.warm_start != "none":
        return (f"warm_start: {config.warm_start} is a training phase on separate allowed data before the attack; "
                "packing batches the attack's fine-tuning only. Run it unpacked (finetune) or set warm_start: none")
    if config.optimizer not in INNER_OPTIMIZERS:
        return (f"optimizer: {config.optimizer} has no functional twin in core.inner_optimizers.INNER_OPTIMIZERS "
                f"(packed: {', '.join(INNER_OPTIMIZERS.names())}); register one or run it unpacked")
    if config.strategy not in STRATEGIES:
        return f"strategy: {STRATEGIES.miss_message(config.strategy)}"
    modes = STRATEGIES.get(config.strategy).modes
    if modes and MODE not in modes:
        return (f"strategy: {config.strategy} is a {'/'.join(modes)} strategy; packing is {MODE}-only (generation's "
                "attack loss draws from the global RNG). Run it unpacked (finetune)")
    return None


def pack_key(config: AttackConfig) -> PackKey | None:
    """What every member of a pack shares: ``(setting, value)`` for every recipe setting but :data:`PER_MEMBER`
    (a strategy's own settings at their defaults where it does not use them); None when the config cannot pack
    (:func:`why_not_packable`). Configs with equal keys can be one :func:`finetune_pack` call."""
    if why_not_packable(config) is not None:
        return None
    config = normalise(config)
    return tuple((name, getattr(config, name)) for name in SETTINGS if name not in PER_MEMBER)


def why_model_not_packable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be packed (its forward draws random numbers), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (f"{name or type(model).__name__}: {type(module).__name__}(p={module.p}) draws its masks from the "
                    "global RNG, which a pack cannot split as sequential trials draw it; run it unpacked (finetune)")
    return None


@dataclass(frozen=True)
class Footprint:
    """What sizes a pack of a model (:func:`sophon_ray.run.packing.pack_size`): its parameters, per input sample the
    values of its widest activation and of all its activations (every leaf module's output), and why only the vmap
    formulation can pack it (None: the grouped one can)."""

    parameters: int
    widest: int
    activations: int
    vmap_only: str | None = None


def footprint(model: nn.Module, channels: int, image_size: int) -> Footprint:
    """:class:`Footprint` of ``model`` from one forward of a zero ``channels`` x ``image_size`` sample (eval mode,
    no gradient; the model is left as it was)."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel())) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters(), None)
            model(torch.zeros(1, channels, image_size, image_size, device=param.device if param is not None else None))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    layers = grouped_layers(model)
    return Footprint(sum(p.numel() for p in model.parameters()), max(sizes, default=0), sum(sizes),
                     layers if isinstance(layers, str) else None)


def _pack_problem(configs: Sequence[AttackConfig], task: Task, model: nn.Module) -> str | None:
    """Why ``configs`` cannot be one pack of ``model`` under ``task`` (naming the config and field), or None."""
    if not configs:
        return "configs: empty; a pack needs at least one member"
    if task.mode != MODE:
        return f"task: packing is {MODE}-only, got {task.mode}; run finetune per config"
    for i, config in enumerate(configs):
        if (reason := why_not_packable(config)) is not None:
            return f"configs[{i}] cannot pack: {reason}"
    first = dict(pack_key(configs[0]) or ())
    for i, config in enumerate(configs[1:], 1):
        for name, value in pack_key(config) or ():
            if value != first[name]:
                return (f"configs[{i}].{name} = {value!r} differs from configs[0].{name} = {first[name]!r}; members "
                        f"of a pack differ only in {', '.join(PER_MEMBER)}: group configs by pack_key")
    return why_model_not_packable(model)


# ------------------------------------------------------------------------------------------------ members
@dataclass
class _Member:
    """One member as ``finetune`` prepares it: its model copy (dropped once stacked, unless kept), its data and its
    generator (after the strategy)."""

    net: nn.Module | None
    data: Dataset
    generator: torch.Generator


def _member(model: nn.Module, train: Dataset, config: AttackConfig, device: torch.device | str) -> _Member:
    """``finetune``'s preparation of ``config`` (its generators and order: reparameterise, subset, strategy)."""
    generator = torch.Generator().manual_seed(config.seed)
    net = copy.deepcopy(model).to(device)
    reparameterise(net, config, torch.Generator().manual_seed(REPARAMETERISE_SEED + config.seed))
    data = stratified_subset(train, config.data_fraction, config.seed)
    prepare(net, config, generator)
    return _Member(net, data, generator)


def _structure(net: nn.Module) -> tuple:
    """Module types, parameter (shape, dtype, trains) and buffer (shape, dtype) by name: what members must share."""
    return (tuple((n, type(m).__name__) for n, m in net.named_modules()),
            tuple((n, p.shape, p.dtype, p.requires_grad) for n, p in net.named_parameters()),
            tuple((n, b.shape, b.dtype) for n, b in net.named_buffers()))


def _check_members(members: Sequence[_Member], configs: Sequence[AttackConfig]) -> None:
    first = _structure(members[0].net)
    for i, member in enumerate(members[1:], 1):
        if _structure(member.net) != first:
            raise ValueError(f"configs[{i}]: strategy {configs[i].strategy} made a model unlike configs[0]'s "
                             "(modules, parameter shapes or trainable set differ); run it unpacked (finetune)")
    if len({len(m.data) for m in members}) != 1:
        raise ValueError(f"the members' training subsets differ in size ({[len(m.data) for m in members]}); "
                         "a pack needs the same steps per epoch: use one data_fraction and one training set")
    if not any(p.requires_grad for p in members[0].net.parameters()):
        raise ValueError(f"strategy: {configs[0].strategy} trains no parameter of this model; nothing to fine-tune")


# ------------------------------------------------------------------------------------------------ forwards
def _train_mode(net: nn.Module, training: bool, freeze_bn: bool) -> None:
    """``train_epoch``'s modes: train (BatchNorm in eval when frozen), or eval."""
    net.train(training)
    if training and freeze_bn:
        set_bn_eval(net)


def vmap_forward(base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], freeze_bn: bool) -> Forward:
    """The members' forward as ``torch.vmap`` over ``functional_call(base, ...)`` (``base``: the members' module
    tree, its own tensors unused, e.g. on the meta device); BatchNorm statistics update in the stacked buffers."""

    def call(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))

    def forward(x: Tensor, shared: bool, training: bool) -> Tensor:
        _train_mode(base, training, freeze_bn)
        return torch.vmap(call, in_dims=(0, 0, None if shared else 0))(params, buffers, x)

    return forward


SPATIAL = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _layer_problem(layer: nn.Module, flat: bool) -> str | None:
    if isinstance(layer, ELEMENTWISE):
        return None
    if isinstance(layer, nn.Flatten):
        ok = not flat and layer.start_dim == 1 and layer.end_dim == -1
        return None if ok else "a Flatten other than one flatten(1) of the features"
    if isinstance(layer, nn.Linear):
        return None if flat else "a Linear before the Flatten"
    if not isinstance(layer, SPATIAL):
        return f"{type(layer).__name__} has no grouped form"
    if flat:
        return f"{type(layer).__name__} after the Flatten"
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode}"
    if isinstance(layer, nn.BatchNorm2d) and not (layer.affine and layer.track_running_stats
                                                  and layer.momentum is not None):
        return "a BatchNorm2d without affine parameters, running statistics or a momentum"
    return None


def grouped_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | str:
    """``model``'s layers as ``(parameter-name prefix, module)`` in forward order when the grouped formulation can
    run it (``body`` then ``classifier``, both ``nn.Sequential`` s of supported layers, one Flatten between the
    spatial and the flat part), else why not."""
    body, classifier = getattr(model, "body", None), getattr(model, "classifier", None)
    if not (isinstance(body, nn.Sequential) and isinstance(classifier, nn.Sequential)):
        return f"{type(model).__name__} is not a body -> classifier pair of nn.Sequential"
    layers = [(f"body.{n}.", m) for n, m in body.named_children()]
    layers += [(f"classifier.{n}.", m) for n, m in classifier.named_children()]
    flat = False
    for prefix, layer in layers:
        if (problem := _layer_problem(layer, flat)) is not None:
            return f"{prefix.rstrip('.')}: {problem}"
        flat = flat or isinstance(layer, nn.Flatten)
    return layers if flat else "no Flatten between the features and the classifier"


def grouped_forward(layers: list[tuple[str, nn.Module]], params: dict[str, Tensor], buffers: dict[str, Tensor],
                    freeze_bn: bool, fmt: torch.memory_format = torch.contiguous_format) -> Forward:
    """The members' forward as one wide model (see the module docstring); ``layers`` from :func:`grouped_layers`;
    ``fmt`` the activations' memory format (the subject's: channels-last convolutions run faster on the CPU)."""
    members = next(iter(params.values())).shape[0]
    prefix, first = layers[0]
    plain_first = isinstance(first, nn.Conv2d) and first.groups == 1

    def forward(x: Tensor, shared: bool, training: bool) -> Tensor:
        bn_training = training and not freeze_bn
        p, run = (params, layers) if training else folded_batch_norms(layers, params, buffers)
        if shared and plain_first:   # one batch for all: one plain convolution into the M x O channels
            h = _conv(x.contiguous(memory_format=fmt), first, p, prefix, groups=1)
            rest = run[1:]
        else:
            h, rest = _side_by_side(x.expand(members, *x.shape) if shared else x, fmt), run
        for name, layer in rest:
            if training and h.dim() == 4 and isinstance(layer, FORMAT_EXITS):
                h = _GradientsIn.apply(h, fmt)
            h = _grouped_layer(h, name, layer, p, buffers, members, bn_training)
        return h

    return forward


FORMAT_EXITS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)   # where 4-D activations end


class _GradientsIn(torch.autograd.Function):
    """Identity whose gradient is made ``fmt``: where the activations leave the memory format (pooled to one value,
    flattened), the gradient flowing back arrives contiguous, and the backward of the channels-last activation before
    it (the convnet's last ReLU) would run TensorIterator's mixed-format path, 10-30x slower per element than with
    matching formats on the CPU (``threshold_backward`` on [32, 384, 4, 4]: 1.0 vs 0.04 ms). On a whole pack that
    is 1-2 % on quiet cores and more under memory contention (bench/NOTES.md, ``bench/packed.py --mixed-formats``)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, fmt: torch.memory_format) -> Tensor:
        ctx.fmt = fmt
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.contiguous(memory_format=ctx.fmt), None


def folded_batch_norms(layers: list[tuple[str, nn.Module]], params: dict[str, Tensor], buffers: dict[str, Tensor]
                       ) -> tuple[dict[str, Tensor], list[tuple[str, nn.Module]]]:
    """For evaluation: every BatchNorm2d right after a Conv2d folded into that convolution (weight x
    ``w / sqrt(var + eps)``, bias ``(bias - mean) x that + b``), as ``torch.nn.utils.fuse_conv_bn_eval`` folds one
    model; the parameters with the folded convolutions' weights and biases, and the layers without those
    BatchNorms. An evaluation BatchNorm is a pass over the widest activations (a quarter of a packed evaluation's
    CPU time, profiled; the fold's gain is ``bench/packed.py --unfolded``, bench/NOTES.md); its fold changes the
    logits by float32 rounding only."""
    out, skip = dict(params), set()
    for (conv_name, conv), (bn_name, bn) in zip(layers, layers[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            scale = params[bn_name + "weight"] * torch.rsqrt(buffers[bn_name + "running_var"] + bn.eps)
            weight = params[conv_name + "weight"]
            out[conv_name + "weight"] = weight * scale.view(*scale.shape, *[1] * (weight.dim() - scale.dim()))
            bias = params.get(conv_name + "bias")
            mean = buffers[bn_name + "running_mean"] if bias is None else buffers[bn_name + "running_mean"] - bias
            out[conv_name + "bias"] = params[bn_name + "bias"] - mean * scale
            skip.add(bn_name)
    kept = [(name, layer) for name, layer in layers if name not in skip]
    return out, kept


def _side_by_side(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``[M, B, C, ...]`` -> ``[B, M*C, ...]``: the members' channels side by side."""
    m, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, m * x.shape[2], *x.shape[3:]).contiguous(memory_format=memory_format)


def _conv(h: Tensor, conv: nn.Conv2d, params: dict[str, Tensor], prefix: str, groups: int) -> Tensor:
    bias = params.get(prefix + "bias")
    return F.conv2d(h, params[prefix + "weight"].flatten(0, 1), None if bias is None else bias.flatten(), conv.stride,
                    conv.padding, conv.dilation, groups)


def _grouped_layer(h: Tensor, prefix: str, layer: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                   members: int, bn_training: bool) -> Tensor:
    """One layer of every member on ``h``: ``[B, M*C, H, W]`` before the Flatten, ``[M, B, features]`` after."""
    if isinstance(layer, nn.Conv2d):
        return _conv(h, layer, params, prefix, groups=members * layer.groups)
    if isinstance(layer, nn.BatchNorm2d):   # as _BatchNorm.forward with running statistics and a momentum
        if bn_training:
            buffers[prefix + "num_batches_tracked"].add_(1)
        return F.batch_norm(h, buffers[prefix + "running_mean"].view(-1), buffers[prefix + "running_var"].view(-1),
                            params[prefix + "weight"].flatten(), params[prefix + "bias"].flatten(), bn_training,
                            layer.momentum, layer.eps)
    if isinstance(layer, nn.Flatten):
        return h.reshape(h.shape[0], members, -1).transpose(0, 1)
    if isinstance(layer, nn.Linear):
        weight, bias = params[prefix + "weight"].transpose(1, 2), params.get(prefix + "bias")
        return torch.bmm(h, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight)
    return layer(h)   # pooling, activations: per channel or per element


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """channels-last when ``model``'s first 4-D parameter is (as ``build_model`` makes it), else contiguous."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    nhwc = weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def _stacked(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stacked tensors made contiguous (a member's channels-last slices would send vmap's pooling down its slow
    per-member fallback), trainable ones still leaves."""
    return {n: t.detach().contiguous().requires_grad_(t.requires_grad) for n, t in tensors.items()}


Builder = Callable[[dict[str, Tensor], dict[str, Tensor]], Forward]   # stacked params, buffers -> their forward


def _forward(formulation: str, base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
             freeze_bn: bool, probe: Tensor, fmt: torch.memory_format) -> tuple[Forward, Builder]:
    """The forward of ``formulation`` and how to build it over other stacked tensors (e.g. some of the members);
    ``auto``: the grouped one when the model's layers allow it and it gives vmap's logits on ``probe`` (eval mode),
    else vmap's."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation: unknown '{formulation}'; allowed: {', '.join(FORMULATIONS)}")

    def vmap_of(p: dict[str, Tensor], b: dict[str, Tensor]) -> Forward:
        return vmap_forward(base, p, b, freeze_bn)

    vmapped = vmap_of(params, buffers)
    if formulation == "vmap":
        return vmapped, vmap_of
    layers = grouped_layers(base)
    if isinstance(layers, str):
        if formulation == "grouped":
            raise ValueError(f"formulation: grouped cannot run this model ({layers}); use vmap or auto")
        return vmapped, vmap_of

    def grouped_of(p: dict[str, Tensor], b: dict[str, Tensor]) -> Forward:
        return grouped_forward(layers, p, b, freeze_bn, fmt)

    grouped = grouped_of(params, buffers)
    with torch.no_grad():
        gap = (grouped(probe, True, False) - vmapped(probe, True, False)).abs().max().item()
    if gap <= PROBE_TOLERANCE:
        return grouped, grouped_of
    if formulation == "grouped":
        raise ValueError(f"formulation: grouped computes other logits than the model on a probe batch ({gap:.3g} "
                         "apart): its forward is not body then classifier; use vmap or auto")
    return vmapped, vmap_of


# ------------------------------------------------------------------------------------------------ optimizer
def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """``values`` [M] shaped to broadcast over ``like`` [M, ...], in its dtype."""
    return values.to(dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class PackedOptimizer:
    """The registered inner optimizer ``name`` over stacked trainable tensors ``[M, ...]``, with per-member lr
    (given at each step) and weight decay (see the module docstring)."""

    inner: InnerOptimizer
    params: list[Tensor]
    state: State
    scratch: list[Tensor]
    decay: list[Tensor] | None      # per parameter, [M, 1, ...]: coupled L2 (None: none)
    decoupled: Tensor | None        # [M] float64: decoupled decay (adamw)
    one: Tensor
    t: Tensor

    @classmethod
    def build(cls, name: str, params: list[Tensor], weight_decay: Sequence[float]) -> PackedOptimizer:
        inner = INNER_OPTIMIZERS.get(name)
        device = params[0].device
        wd = torch.tensor(list(weight_decay), dtype=torch.float64, device=device)
        decoupled = torch.where(wd == 0, DECOUPLED_DECAY[name], wd) if name in DECOUPLED_DECAY else None
        coupled = [_per_member(wd, p) for p in params] if decoupled is None and bool((wd != 0).any()) else None
        with torch.no_grad():
            scratch = [torch.zeros_like(p) for p in params]
            state = inner.init(scratch)
        return cls(inner, params, state, scratch, coupled, decoupled,
                   one=torch.ones((), dtype=params[0].dtype, device=device),
                   t=torch.zeros((), dtype=torch.float64, device=device))

    @torch.no_grad()
    def step_(self, grads: Sequence[Tensor], lr: Tensor) -> None:
        """One step of every member: ``grads`` per parameter [M, ...], ``lr`` [M] (float64) this step's lrs."""
        grads = list(grads)
        lr = lr.to(self.params[0].device)
        if self.decoupled is not None:
            torch._foreach_mul_(self.params, [_per_member(1 - lr * self.decoupled, p) for p in self.params])
        elif self.decay is not None:
            grads = torch._foreach_add(grads, torch._foreach_mul(self.params, self.decay))
        self.t.add_(1)
        torch._foreach_zero_(self.scratch)
        self.inner.step_(self.scratch, grads, self.state, self.one, self.t)   # scratch = -update at lr 1
        torch._foreach_add_(self.params, torch._foreach_mul(self.scratch, [_per_member(lr, p) for p in self.params]))


# ------------------------------------------------------------------------------------------------ evaluation
class _MemberView(nn.Module):
    """Member ``index`` as a model for ``task.evaluate``: member 0's view runs the packed forward on every batch the
    task hands it (eval mode, the batch shared by all members) and records all members' logits; the others replay
    their own, batch by batch, so each evaluation sees its member's logits for exactly its batches."""

    def __init__(self, forward: Forward, recorded: list[Tensor], index: int, chunk: int | None = None) -> None:
        super().__init__()
        self.packed, self.recorded, self.index, self.calls, self.chunk = forward, recorded, index, 0, chunk

    def forward(self, x: Tensor) -> Tensor:
        if self.index == 0:
            parts = x.split(self.chunk) if self.chunk else (x,)
            self.recorded.append(torch.cat([self.packed(part, True, False) for part in parts], dim=1))
        if self.calls >= len(self.recorded) or self.recorded[self.calls].shape[1] != x.shape[0]:
            raise RuntimeError("task.evaluate batched member views differently; packed evaluation needs a "
                               "deterministic batch order (shuffle=False)")
        self.calls += 1
        return self.recorded[self.calls - 1][self.index]


def eval_chunk(members: int, device: torch.device | str) -> int | None:
    """The samples of one packed evaluation forward on ``device``: on the CPU :data:`EVAL_ROWS` rows of members x
    samples (the task's evaluation batch of 1000 would make every activation ``members`` times as wide as one
    model's and leave the cache), None (the whole batch) on a GPU."""
    return max(1, EVAL_ROWS // members) if torch.device(device).type == "cpu" else None


def evaluate_members(forward: Forward, members: int, dataset: Dataset, device: torch.device | str,
                     task: Task) -> list[Evaluation]:
    """Every member's ``task.evaluate`` on ``dataset``, from packed forwards of :func:`eval_chunk` samples."""
    recorded: list[Tensor] = []
    chunk = eval_chunk(members, device)
    views = [_MemberView(forward, recorded, i, chunk) for i in range(members)]
    evaluations = [task.evaluate(view, dataset, device) for view in views]
    if any(view.calls != len(recorded) for view in views):
        raise RuntimeError("task.evaluate asked member views for different numbers of batches")
    return evaluations


# Evaluations before training, by (member's tensors, dataset, task, device) digest: kept for the process's life
# (a Tune trial actor is reused for pack after pack). Members of one subject model start equal wherever their
# strategy and seed leave the model as it is (direct-*: every member of a pack and of the other optimizers' packs;
# initfc: one per seed), so their epoch-0 evaluations are one evaluation.
INITIAL_EVALUATIONS: dict[str, Evaluation] = {}
INITIAL_EVALUATIONS_MAX = 256


def _digest(*tensors: Tensor) -> str:
    """A digest of the tensors' shapes, dtypes and bytes (equal digests: equal tensors)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dataset_digest(dataset: Dataset) -> str | None:
    """The digest of a tensor dataset's tensors; None for another kind of dataset (its evaluations are not kept)."""
    return _digest(*dataset.tensors) if isinstance(dataset, TensorDataset) else None


def initial_evaluations(build: Builder, model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                        dataset: Dataset, device: torch.device | str, task: Task) -> list[Evaluation]:
    """Every member's ``task.evaluate`` on ``dataset`` before training: what :func:`evaluate_members` gives, with
    members of equal tensors evaluated once and evaluations this process made earlier (same ``model`` structure,
    tensors, data, task, device) reused (:data:`INITIAL_EVALUATIONS`; only for tensor datasets); the others from a
    forward of only those members (``build``)."""
    data = _dataset_digest(dataset)
    members = next(iter(params.values())).shape[0]
    tensors = [*params.values(), *buffers.values()]
    structure = hashlib.blake2b(repr(model).encode(), digest_size=8).hexdigest()
    context = f"{structure}|{data}|{type(task).__module__}.{type(task).__qualname__}:{task.mode}|{torch.device(device)}"
    keys = [f"{_digest(*(t[i] for t in tensors))}|{context}" for i in range(members)]
    found = {k: INITIAL_EVALUATIONS[k] for k in keys if k in INITIAL_EVALUATIONS} if data is not None else {}
    todo = list(dict.fromkeys(k for k in keys if k not in found))
    if todo:
        index = torch.tensor([keys.index(k) for k in todo], device=next(iter(params.values())).device)
        with torch.no_grad():
            forward = build({n: p.detach().index_select(0, index) for n, p in params.items()},
                            {n: b.index_select(0, index) for n, b in buffers.items()})
            found.update(zip(todo, evaluate_members(forward, len(todo), dataset, device, task)))
    if data is not None:
        for k in todo:
            if len(INITIAL_EVALUATIONS) >= INITIAL_EVALUATIONS_MAX:
                INITIAL_EVALUATIONS.pop(next(iter(INITIAL_EVALUATIONS)))
            INITIAL_EVALUATIONS[k] = found[k]
    return [copy.deepcopy(found[k]) for k in keys]


# ------------------------------------------------------------------------------------------------ training
def _stacked_batch(members: Sequence[_Member], streams: list, augments: list, device: torch.device | str,
                   ) -> tuple[Tensor, Tensor] | None:
    """The next step's ``[M, B, ...]`` inputs and ``[M, B]`` labels (each member's batch, then its augmentation,
    from its generator, as ``train_epoch`` draws them); None when every member's epoch has ended."""
    drawn = [next(stream, None) for stream in streams]
    if all(d is None for d in drawn):
        return None
    if any(d is None for d in drawn):
        raise RuntimeError("the members' epochs have different numbers of batches")
    xs, ys = [], []
    for (x, y), augment, member in zip(drawn, augments, members):
        x, y = x.to(device), y.to(device)
        xs.append(x if augment is None else augment(x, member.generator))
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _member_losses(fit: Callable[..., Tensor], logits: Tensor, y: Tensor, label_smoothing: float) -> Tensor:
    """Every member's fitting loss [M]: the task's loss on its own logits (classification's is a function of them),
    one call per member, as ``finetune`` calls it. Not ``torch.vmap``: vmapping cross-entropy runs its Python
    decomposition, whose first call imports sympy (1.6 s in every trial process, measured) and costs ~0.6 ms a step."""
    return torch.stack([fit(_logits_of, z, t, label_smoothing) for z, t in zip(logits, y)])


def _logits_of(logits: Tensor) -> Tensor:
    return logits


def _train_epoch(forward: Forward, optimizer: PackedOptimizer, members: Sequence[_Member], augments: list,
                 fit: Callable[..., Tensor], config: AttackConfig, device: torch.device | str,
                 lrs: Callable[[int], Tensor], step: int) -> int:
    """One epoch of every member (``train_epoch``'s, batched); ``lrs(step)`` the members' lrs at a step (global
    step count, from ``step``). Returns the step count after the epoch."""
    streams = [batches(m.data, config.batch_size, m.generator) for m in members]
    while (batch := _stacked_batch(members, streams, augments, device)) is not None:
        losses = _member_losses(fit, forward(batch[0], False, True), batch[1], config.label_smoothing)
        optimizer.step_(torch.autograd.grad(losses.sum(), optimizer.params), lrs(step))
        step += 1
    return step


def finetune_pack(model: nn.Module, train: Dataset, test: Dataset, configs: Sequence[AttackConfig],
                  device: torch.device | str = "cpu", val: Dataset | None = None, *, task: Task,
                  on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
                  original_test: Dataset | None = None, keep_model: bool = False,
                  formulation: str = "auto") -> list[FinetuneResult]:
    """``[finetune(model, train, test, c, original_test, device, ..., val=val, task=task, keep_model=keep_model)
    for c in configs]``, trained as one pack (see the module docstring): configs with one :func:`pack_key`.

    ``on_epoch(member, epoch, metrics)`` gets what ``finetune``'s ``on_epoch`` gets, per member (its index in
    ``configs``). ``formulation``: ``auto``, ``grouped`` or ``vmap``. ValueError, naming the config and the field,
    when the configs cannot be one pack."""
    start = time.perf_counter()
    configs = list(configs)
    if (problem := _pack_problem(configs, task, model)) is not None:
        raise ValueError(problem)
    shared = configs[0]
    members = [_member(model, train, c, device) for c in configs]
    _check_members(members, configs)
    params, buffers = map(_stacked, stack_module_state([m.net for m in members]))
    trainable = [n for n, p in members[0].net.named_parameters() if p.requires_grad]
    base = copy.deepcopy(members[0].net).to("meta")
    kept = [m.net if keep_model else None for m in members]
    for member in members:
        member.net = None
    freeze_bn = BN_MODES.get(shared.bn_mode)
    probe = next(batches(test, PROBE_SIZE, shuffle=False))[0].to(device)
    forward, build = _forward(formulation, base, params, buffers, freeze_bn, probe, memory_format_of(model))
    optimizer = PackedOptimizer.build(shared.optimizer, [params[n] for n in trainable],
                                      [c.weight_decay for c in configs])
    size = len(members[0].data)
    steps = shared.epochs * -(-size // shared.batch_size)
    factors = [SCHEDULES.get(c.schedule)(steps) for c in configs]   # LambdaLR's multipliers, per member
    base_lr = torch.tensor([c.lr for c in configs], dtype=torch.float64)
    augments = [make_augment(c.augment) for c in configs]
    fit = task.fitting("attack")
    results = [FinetuneResult(train_size=size) for _ in configs]
    step = 0
    for epoch in range(shared.epochs + 1):
        if epoch:
            step = _train_epoch(forward, optimizer, members, augments, fit, shared, device,
                                lambda k: base_lr * torch.tensor([f(k) for f in factors], dtype=torch.float64), step)
        evaluate = (partial(evaluate_members, forward, len(configs)) if epoch else
                    partial(initial_evaluations, build, base, params, buffers))
        tests = evaluate(test, device, task)
        vals = evaluate(val, device, task) if val is not None else [None] * len(configs)
        for i, (result, ev, val_ev) in enumerate(zip(results, tests, vals)):
            result.restricted.append(ev.score)
            result.restricted_loss.append(ev.loss)
            if val_ev is not None:
                result.val.append(val_ev.score)
            if on_epoch:
                on_epoch(i, epoch, epoch_metrics(task, epoch, shared.epochs, ev, val_ev))
    if original_test is not None:
        for result, ev in zip(results, evaluate_members(forward, len(configs), original_test, device, task)):
            result.original = ev.score
    seconds = (time.perf_counter() - start) / len(configs)
    for i, (result, net) in enumerate(zip(results, kept)):
        result.seconds = seconds
        result.model = None if net is None else _unstacked(net, params, buffers, i)
    return results


@torch.no_grad()
def _unstacked(net: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], index: int) -> nn.Module:
    """``net`` (a member's own copy) holding member ``index``'s trained parameters and buffers."""
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        tensor.copy_((params if name in params else buffers)[name][index])
    return net


__all__ = ["DECOUPLED_DECAY", "FORMULATIONS", "INITIAL_EVALUATIONS", "PER_MEMBER", "Footprint", "PackKey",
           "PackedOptimizer", "evaluate_members", "finetune_pack", "footprint", "grouped_forward", "grouped_layers",
           "initial_evaluations", "pack_key", "vmap_forward", "why_model_not_packable", "why_not_packable"]
