"""Packed attack trials (core/packed.py): every member of a pack gets what ``finetune`` alone gives its config.

The subject is the smallest registered classifier (convnet, channels-last as ``build_model`` makes it), briefly
pretrained on the offline ``shapes`` set at 8 px; the attacks fine-tune it on another tiny shapes split. Per-epoch
curves (restricted score and loss, val score, original score) must agree within 1e-4 absolute in float32; the
trained tensors (parameters, BatchNorm statistics) within 5e-4 (adaptive optimizers divide by the root of a tiny
second moment, which amplifies float rounding of near-zero gradients) and the step counters exactly. The lrs stay
out of the chaotic regime where rounding alone moves the curves past 1e-4 (there ``finetune`` run on 1 and on 2
threads differs as much from itself: e.g. adam at lr 2e-3, batch 8, temperature 2 here).
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sophon_ray.core import packed as packed_module
from sophon_ray.core.attack import FinetuneResult, finetune
from sophon_ray.core.data import load_domain
from sophon_ray.core.packed import (
    FORMULATIONS, PER_MEMBER, PackedOptimizer, finetune_pack, folded_batch_norms, grouped_forward, grouped_layers,
    memory_format_of, pack_key, why_model_not_packable, why_not_packable)
from sophon_ray.core.training import pretrain
from sophon_ray.modes.classification.models import Net, convnet, convnet_nobn
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.recipes import OPTIMIZERS, SETTINGS, STRATEGIES, AttackConfig
from sophon_ray.spec import DomainSpec, PretrainSpec

CURVE_TOL = 1e-4
STATE_TOL = 5e-4
SIZE, CLASSES = 8, 10
# an lr per optimizer where 3 epochs move the curves well past the tolerance without diverging
LR = {"sgd": 0.05, "momentum": 0.02, "nesterov": 0.02, "adam": 2e-3, "adamw": 2e-3, "rmsprop": 1e-3,
      "adagrad": 0.02, "adadelta": 1.0}
PACKABLE = [s for s in STRATEGIES.names() if why_not_packable(AttackConfig(strategy=s)) is None]


@pytest.fixture(scope="module")
def data() -> SimpleNamespace:
    train, test = load_domain(DomainSpec("shapes", SIZE, train_size=64, test_size=40, seed=3))
    val, original = load_domain(DomainSpec("shapes", SIZE, train_size=30, test_size=30, seed=4))
    return SimpleNamespace(train=train, test=test, val=val, original=original)


def _subject(build) -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(CLASSES, 3, SIZE).to(memory_format=torch.channels_last)
    train, val = load_domain(DomainSpec("shapes", SIZE, train_size=200, test_size=40, seed=1))
    pretrain(model, train, val, PretrainSpec(epochs=2, lr=3e-3, batch_size=32), task=CLASSIFICATION)
    return model


@pytest.fixture(scope="module")
def subject() -> nn.Module:
    return _subject(convnet)


def alone(model: nn.Module, data: SimpleNamespace, config: AttackConfig) -> tuple[FinetuneResult, list[dict]]:
    logged: list[dict] = []
    result = finetune(model, data.train, data.test, config, original_test=data.original, val=data.val,
                      task=CLASSIFICATION, keep_model=True, on_epoch=lambda epoch, m: logged.append(m))
    return result, logged


def packed(model: nn.Module, data: SimpleNamespace, configs: list[AttackConfig], formulation: str = "auto",
           ) -> tuple[list[FinetuneResult], list[list[dict]]]:
    logged: list[list[dict]] = [[] for _ in configs]
    results = finetune_pack(model, data.train, data.test, configs, val=data.val, task=CLASSIFICATION,
                            original_test=data.original, keep_model=True, formulation=formulation,
                            on_epoch=lambda member, epoch, m: logged[member].append(m))
    return results, logged


def assert_same(model: nn.Module, data: SimpleNamespace, configs: list[AttackConfig], formulation: str = "auto",
                ) -> list[FinetuneResult]:
    """Pack ``configs`` and run each alone: the same curves, metrics handed to on_epoch and trained tensors."""
    results, logged = packed(model, data, configs, formulation)
    for i, (config, got, got_logged) in enumerate(zip(configs, results, logged)):
        want, want_logged = alone(model, data, config)
        for field in ("restricted", "restricted_loss", "val"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), abs=CURVE_TOL), (i, field, config)
        assert len(got.restricted) == config.epochs + 1 and got.train_size == want.train_size
        assert got.original == pytest.approx(want.original, abs=CURVE_TOL)
        assert [m.keys() for m in got_logged] == [m.keys() for m in want_logged]
        assert all(g == pytest.approx(w, abs=CURVE_TOL) for g, w in zip(got_logged, want_logged))
        mine, theirs = got.model.state_dict(), want.model.state_dict()
        assert mine.keys() == theirs.keys()
        for name, tensor in theirs.items():
            if tensor.is_floating_point():
                assert (mine[name] - tensor).abs().max().item() <= STATE_TOL, (i, name, config)
            else:
                assert torch.equal(mine[name], tensor), (i, name)
    return results


def _members(optimizer: str) -> list[AttackConfig]:
    """Three members: different seeds (data orders), lrs, weight decays and schedules."""
    lr = LR[optimizer]
    base = AttackConfig(optimizer=optimizer, epochs=3, batch_size=16)
    return [dataclasses.replace(base, lr=lr, seed=0),
            dataclasses.replace(base, lr=2 * lr, weight_decay=0.05, schedule="cosine", seed=1),
            dataclasses.replace(base, lr=lr / 2, weight_decay=1e-3, schedule="warmup-cosine", seed=2)]


# ------------------------------------------------------------------------------------------------ same answers
@pytest.mark.parametrize("formulation", ["grouped", "vmap"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_every_optimizer_trains_every_member_as_finetune_does(subject, data, optimizer, formulation):
    assert_same(subject, data, _members(optimizer), formulation)


@pytest.mark.parametrize("formulation", ["grouped", "vmap"])
def test_evaluation_in_chunks_smaller_than_the_batch_gives_every_member_its_own_scores(subject, data, formulation,
                                                                                       monkeypatch):
    """On the CPU a pack evaluates ``EVAL_ROWS // members`` samples per forward (the test set's 40 here split
    into 13 pieces of 3 and one of 1): the curves still equal each member's ``finetune``."""
    monkeypatch.setattr(packed_module, "EVAL_ROWS", 10)
    assert packed_module.eval_chunk(3, "cpu") == 3 and packed_module.eval_chunk(3, "cuda") is None
    calls = []
    real = packed_module._MemberView.forward

    def counting(self, x):
        calls.append(self.index)
        return real(self, x)

    monkeypatch.setattr(packed_module._MemberView, "forward", counting)
    assert_same(subject, data, _members("momentum"), formulation)
    assert calls, "the member views were not used"


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_packed_optimizer_steps_every_member_as_its_torch_optimizer(optimizer):
    """Per-member lr (changing every step) and weight decay (0 included: adamw's 0.01) on stacked tensors, against
    one torch.optim optimizer per member, on gradients spanning nine orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    shapes, lrs, decays = [(4, 3, 3, 3), (4,), (10, 4)], [0.01, 0.03, 0.002], [0.0, 0.05, 1e-3]
    start = [torch.randn(len(lrs), *shape, generator=gen) for shape in shapes]
    stacked = [t.clone() for t in start]
    mine = PackedOptimizer.build(optimizer, stacked, decays)
    theirs = [[t[i].clone().requires_grad_() for t in start] for i in range(len(lrs))]
    torch_optims = [OPTIMIZERS.get(optimizer)(p, lr, wd) for p, lr, wd in zip(theirs, lrs, decays)]
    for step in range(6):
        factor = 1.0 / (1 + step)
        grads = [torch.randn(t.shape, generator=gen) * 10.0 ** -torch.randint(0, 9, t.shape, generator=gen)
                 for t in start]
        mine.step_(grads, torch.tensor(lrs, dtype=torch.float64) * factor)
        for i, (params, opt) in enumerate(zip(theirs, torch_optims)):
            for group in opt.param_groups:
                group["lr"] = lrs[i] * factor
            for p, g in zip(params, grads):
                p.grad = g[i].clone()
            opt.step()
    for i, params in enumerate(theirs):
        for p, t in zip(params, stacked):
            assert (t[i] - p.detach()).abs().max().item() <= 1e-6, (optimizer, i)


@pytest.mark.parametrize("bn_mode", ["train", "frozen"])
@pytest.mark.parametrize("strategy", PACKABLE)
def test_every_packable_strategy_in_both_batchnorm_modes(subject, data, strategy, bn_mode):
    base = AttackConfig(strategy=strategy, bn_mode=bn_mode, epochs=2, batch_size=16, optimizer="momentum")
    results = assert_same(subject, data, [dataclasses.replace(base, lr=0.02, seed=5),
                                          dataclasses.replace(base, lr=0.05, seed=6)])
    assert results[0].restricted != results[1].restricted   # the members are not copies of one another


def test_schedules_augmentations_reparameterisation_and_smoothing_mixed_in_one_pack(subject, data):
    base = AttackConfig(lr=0.02, epochs=3, batch_size=8, data_fraction=0.5, label_smoothing=0.1, weight_decay=5e-4)
    members = [dataclasses.replace(base, schedule="one-cycle", augment="all", seed=1),
               dataclasses.replace(base, schedule="cosine", augment="flip", shrink=0.8, perturb=0.01, seed=2),
               dataclasses.replace(base, augment="shift", temperature=2.0, seed=3),
               dataclasses.replace(base, schedule="warmup-cosine", augment="colour", rescale=2.0, lr=0.05, seed=4)]
    results = assert_same(subject, data, members)
    assert len({r.train_size for r in results}) == 1 and results[0].train_size < len(data.train)


def test_conv_biases_without_batchnorm_pack_grouped(data):
    model = _subject(convnet_nobn)
    assert not isinstance(grouped_layers(model), str)
    assert_same(model, data, _members("nesterov")[:2], "grouped")


def _biased_conv_then_batchnorm() -> nn.Module:
    torch.manual_seed(1)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Net(body, nn.Sequential(nn.Linear(4, CLASSES)))


@pytest.mark.parametrize("which", ["convnet", "biased conv"])
def test_evaluation_folds_every_batchnorm_into_its_convolution_and_keeps_each_members_logits(subject, data, which):
    """A packed evaluation runs each Conv2d -> BatchNorm2d as one folded convolution; every member's logits stay
    its own eval-mode model's (members with different weights and BatchNorm statistics, with and without a conv
    bias)."""
    model = subject if which == "convnet" else _biased_conv_then_batchnorm()
    members = [copy.deepcopy(model).eval() for _ in range(3)]
    generator = torch.Generator().manual_seed(5)
    for member in members:
        for layer in member.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.add_(torch.randn(layer.running_mean.shape, generator=generator))
                layer.running_var.mul_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
                layer.weight.data.add_(torch.randn(layer.weight.shape, generator=generator) * 0.3)
    params, buffers = torch.func.stack_module_state(members)
    layers = grouped_layers(model)
    _, kept = folded_batch_norms(layers, params, buffers)
    norms = sum(isinstance(layer, nn.BatchNorm2d) for _, layer in layers)
    assert norms > 0 and len(kept) == len(layers) - norms
    assert not any(isinstance(layer, nn.BatchNorm2d) for _, layer in kept)
    x = torch.stack([data.test[i][0] for i in range(16)])
    forward = grouped_forward(layers, params, buffers, False, memory_format_of(model))
    with torch.no_grad():
        packed_logits = forward(x, True, False)
        alone = torch.stack([member(x.contiguous(memory_format=memory_format_of(model))) for member in members])
    assert (packed_logits - alone).abs().max().item() < 1e-4


def test_training_gradients_keep_every_activations_memory_format(subject, data, monkeypatch):
    """Every 4-D activation of a packed training step (channels-last, as the subject's) gets its gradient in its own
    memory format, the one after the last ReLU included (global pooling and flattening hand back a contiguous
    one: mixed formats run the CPU's elementwise backwards 10-30x slower), and the gradients are the same."""
    seen: list[tuple[str, bool]] = []
    real = packed_module._grouped_layer

    def hooked(h, prefix, layer, *rest):
        out = real(h, prefix, layer, *rest)
        if out.dim() == 4 and out.shape[-1] > 1:
            def check(grad, name=prefix + type(layer).__name__, fmt=out.is_contiguous()):
                seen.append((name, grad.is_contiguous() == fmt))
            out.register_hook(check)
        return out

    monkeypatch.setattr(packed_module, "_grouped_layer", hooked)
    members = [copy.deepcopy(subject) for _ in range(3)]
    x = torch.stack([data.test[i][0] for i in range(8)])
    grads = {}
    for exits in (packed_module.FORMAT_EXITS, ()):
        monkeypatch.setattr(packed_module, "FORMAT_EXITS", exits)
        params, buffers = (dict(t) for t in torch.func.stack_module_state(members))
        forward = grouped_forward(grouped_layers(subject), params, buffers, False, memory_format_of(subject))
        forward(x, True, True).square().sum().backward()
        grads[exits] = [p.grad for p in params.values()]
        if exits:
            assert memory_format_of(subject) == torch.channels_last
            assert len(seen) >= 6 and all(same for _, same in seen), seen
    assert not all(same for _, same in seen)   # without the guard the last ReLU's gradient arrives contiguous
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads.values()))


def test_the_comparison_sees_weight_decay_and_schedules(subject, data):
    """What a broken weight decay or schedule would change moves the curves well past the tolerance."""
    base = AttackConfig(optimizer="momentum", lr=0.05, epochs=3, batch_size=16)
    variants = [base, dataclasses.replace(base, weight_decay=0.05), dataclasses.replace(base, schedule="cosine")]
    loss = [r.restricted_loss for r in finetune_pack(subject, data.train, data.test, variants, task=CLASSIFICATION)]
    assert max(abs(a - b) for a, b in zip(loss[0], loss[1])) > 100 * CURVE_TOL
    assert max(abs(a - b) for a, b in zip(loss[0], loss[2])) > 100 * CURVE_TOL


def test_members_that_start_equal_are_evaluated_once_before_training_and_once_per_process(subject, data,
                                                                                        monkeypatch):
    """Epoch 0: members of equal tensors (direct-*: every member; initfc: one per seed) are evaluated once, and a
    later pack of the same starting tensors, data and task reuses those evaluations; every curve stays finetune's."""
    calls: list[int] = []
    real = packed_module.evaluate_members
    monkeypatch.setattr(packed_module, "evaluate_members",
                        lambda f, members, *a: calls.append(members) or real(f, members, *a))
    monkeypatch.setattr(packed_module, "INITIAL_EVALUATIONS", {})
    base = AttackConfig(optimizer="sgd", lr=0.05, epochs=1, batch_size=16)
    direct = [dataclasses.replace(base, seed=0), dataclasses.replace(base, lr=0.02, seed=1),
              dataclasses.replace(base, seed=2)]
    assert_same(subject, data, direct)
    assert calls[:2] == [1, 1]                # epoch 0: one member's forward on test, one on val (3 equal members)
    calls.clear()
    assert_same(subject, data, [dataclasses.replace(c, optimizer="momentum") for c in direct])
    assert calls[:2] == [3, 3]                # epoch 0 reused from the first pack: the first calls are epoch 1's
    calls.clear()
    initfc = [dataclasses.replace(c, strategy="initfc-all") for c in direct] + [
        dataclasses.replace(base, strategy="initfc-all", lr=0.02, seed=0)]
    assert_same(subject, data, initfc)        # 4 members, seeds 0, 1, 2, 0: three heads
    assert calls[:4] == [3, 3, 4, 4]          # epoch 0: three heads; epoch 1: four members
    assert len(packed_module.INITIAL_EVALUATIONS) == 2 * (1 + 3)   # (test, val) x (direct's tensors, three heads)


# ------------------------------------------------------------------------------------------------ formulations
class Doubled(Net):
    """A body -> classifier pair whose forward is not classifier(body(x)): the grouped layers would miss the 2."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_auto_takes_grouped_only_where_it_computes_the_model(subject, data, monkeypatch):
    grouped = []
    real = packed_module.grouped_forward
    monkeypatch.setattr(packed_module, "grouped_forward", lambda *a: grouped.append(a) or real(*a))

    def run(model, config=AttackConfig(epochs=1), formulation="auto"):
        return finetune_pack(model, data.train, data.test, [config], task=CLASSIFICATION, formulation=formulation)

    run(subject)
    assert len(grouped) == 1
    wrapped = AttackConfig(strategy="lora", epochs=1)
    assert len(run(subject, wrapped)[0].restricted) == 2 and len(grouped) == 1   # LoRA layers: vmap
    with pytest.raises(ValueError, match="formulation: grouped cannot run .*LoRA"):
        run(subject, wrapped, "grouped")
    doubled = copy.deepcopy(subject)
    doubled.__class__ = Doubled
    assert not isinstance(grouped_layers(doubled), str)
    assert_same(doubled, data, [AttackConfig(epochs=1, lr=0.05)])   # the probe sends auto to vmap
    with pytest.raises(ValueError, match="formulation: grouped computes other logits than the model"):
        run(doubled, formulation="grouped")
    with pytest.raises(ValueError, match="formulation: unknown 'wide'; allowed: " + ", ".join(FORMULATIONS)):
        run(subject, formulation="wide")


# ------------------------------------------------------------------------------------------------ what packs
ALTERNATIVE = {"strategy": "direct-fc", "optimizer": "adam", "lr": 0.5, "weight_decay": 0.1, "batch_size": 7,
               "data_fraction": 0.5, "schedule": "cosine", "epochs": 3, "label_smoothing": 0.1, "augment": "flip",
               "bn_mode": "frozen", "blocks": 2, "lora_rank": 2, "lora_alpha": 4.0, "shrink": 0.5, "perturb": 0.1,
               "rescale": 2.0, "temperature": 2.0, "adapt_epochs": 2, "adapt_threshold": 0.5, "warm_epochs": 2,
               "seed": 9}
USES = {"blocks": "last-k", "lora_rank": "lora", "lora_alpha": "lora"}   # strategy settings: their strategy
REFUSED = {"adapt": "entropy", "warm_start": "original"}


def test_pack_key_shares_every_setting_but_the_per_member_ones():
    assert set(ALTERNATIVE) | set(REFUSED) == set(SETTINGS)
    for name, value in ALTERNATIVE.items():
        config = AttackConfig(strategy=USES.get(name, "direct-all"))
        other = dataclasses.replace(config, **{name: value})
        assert pack_key(other) is not None
        assert (pack_key(other) == pack_key(config)) == (name in PER_MEMBER), name
    # a setting its strategy does not use is at its default: it does not split packs
    assert pack_key(AttackConfig(blocks=2)) == pack_key(AttackConfig())


@pytest.mark.parametrize("change, field", [({"adapt": "entropy"}, "adapt"), ({"warm_start": "benign"}, "warm_start"),
                                           ({"optimizer": "lbfgs"}, "optimizer"), ({"strategy": "decoder"}, "strategy"),
                                           ({"strategy": "direct-al"}, "strategy")])
def test_why_not_packable_names_the_field_and_the_fix(change, field):
    config = AttackConfig(**change)
    reason = why_not_packable(config)
    assert reason is not None and reason.startswith(f"{field}: ") and pack_key(config) is None
    assert "finetune" in reason or "allowed" in reason or "register" in reason
    assert why_not_packable(AttackConfig(strategy="lora", schedule="one-cycle", shrink=0.5)) is None


def test_finetune_pack_refuses_what_cannot_be_one_pack(subject, data):
    def refused(configs, match, model=subject, task=CLASSIFICATION):
        with pytest.raises(ValueError, match=match):
            finetune_pack(model, data.train, data.test, configs, task=task)

    cfg = AttackConfig(epochs=1)
    refused([], "configs: empty")
    refused([cfg, dataclasses.replace(cfg, batch_size=16)],
            r"configs\[1\]\.batch_size = 16 differs from configs\[0\]\.batch_size = 32; .*group configs by pack_key")
    refused([cfg, dataclasses.replace(cfg, adapt="entropy")], r"configs\[1\] cannot pack: adapt: entropy")
    refused([cfg], "task: packing is classification-only, got generation",
            task=SimpleNamespace(mode="generation"))
    dropout = convnet(CLASSES, 3, SIZE)
    dropout.classifier.insert(1, nn.Dropout(0.5))
    assert why_model_not_packable(subject) is None
    refused([cfg], "classifier.1: Dropout.*global RNG", model=dropout)


@pytest.mark.integration   # a fresh interpreter imports torch: ~5 s
def test_a_pack_trains_without_importing_sympy():
    """The members' losses are one task loss call per member, not ``torch.vmap`` of it: vmapping cross-entropy runs
    its Python decomposition, whose first call imports sympy (1.6 s in every trial process, measured)."""
    import subprocess
    import sys

    script = ("import sys, dataclasses, torch\n"
              "from sophon_ray.core.data import load_domain\n"
              "from sophon_ray.core.packed import finetune_pack\n"
              "from sophon_ray.modes.classification.models import convnet\n"
              "from sophon_ray.modes.classification.task import CLASSIFICATION\n"
              "from sophon_ray.recipes import AttackConfig\n"
              "from sophon_ray.spec import DomainSpec\n"
              "train, test = load_domain(DomainSpec('shapes', 8, train_size=40, test_size=20, seed=3))\n"
              "config = AttackConfig(optimizer='adam', epochs=1, batch_size=8, lr=1e-3)\n"
              "configs = [config, dataclasses.replace(config, lr=1e-2, seed=1)]\n"
              "finetune_pack(convnet(10, 3, 8), train, test, configs, task=CLASSIFICATION)\n"
              "print('sympy' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", "a packed step imported sympy (a vmapped loss?)"
