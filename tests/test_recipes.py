"""The adaptive attacker's recipe pieces: LoRA, last-k blocks, augmentation, BN modes, label smoothing,
schedules, validation curves and strategy_problem."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sophon_ray.core import attack
from sophon_ray.run.catalog import catalog, registries
from sophon_ray.core.attack import finetune, prepare
from sophon_ray.recipes import AttackConfig
from sophon_ray.run.checks import strategy_problem
from sophon_ray.recipes.augment import AUGMENTS, make_augment
from sophon_ray.recipes.lora import LoRAConv2d, LoRALinear, add_lora
from sophon_ray.modes import build_model
from sophon_ray.modes.classification.models import MODELS
from sophon_ray.spec import ModelSpec
from sophon_ray.core.training import evaluate, train_epoch
from sophon_ray.recipes import BN_MODES, SCHEDULES
from tests.tiny import tiny_data, tiny_net
from sophon_ray.modes.classification.task import CLASSIFICATION


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net(arch: str = "convnet", channels_last: bool = False, classes: int = 3, size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch, classes, channels_last), channels=3, image_size=size)


def images(n: int = 4, size: int = 8, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=gen(seed))


def capture_prepared(monkeypatch) -> list:
    """finetune trains a private copy: keep a handle on it where it is prepared (the real prepare runs)."""
    seen = []

    def spy(model, config, generator):
        params = prepare(model, config, generator)
        seen.append((model, copy.deepcopy(model.state_dict())))
        return params

    monkeypatch.setattr(attack, "prepare", spy)
    return seen


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("arch, channels_last", [("convnet", False), ("convnet", True), ("resnet18", False),
                                                 ("resnet18", True)])
def test_lora_computes_the_original_function_at_init(arch, channels_last):
    model = net(arch, channels_last).eval()
    x = images()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = model(x)
        add_lora(model, rank=4, alpha=8.0, generator=gen())
        after = model(x)
    assert torch.allclose(before, after, atol=1e-6)
    wrapped = [m for m in model.modules() if isinstance(m, (LoRAConv2d, LoRALinear))]
    assert len(wrapped) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net(arch).modules()) - 1
    if channels_last:
        conv = next(m for m in wrapped if isinstance(m, LoRAConv2d))
        assert conv.lora_A.weight.is_contiguous(memory_format=torch.channels_last)


def test_lora_trains_only_adapters_and_the_head():
    model = net("convnet")
    params = prepare(model, AttackConfig(strategy="lora"), gen())
    head = {"classifier.2.weight", "classifier.2.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head < trainable and all("lora_" in n for n in trainable - head)
    assert len(trainable - head) == 2 * 4  # A and B of 3 convs + the hidden Linear
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trainable}
    F.cross_entropy(model(images()), torch.tensor([0, 1, 2, 0])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def _nonzero_b(layer, seed: int = 3) -> None:
    b = layer.lora_B if isinstance(layer, LoRALinear) else layer.lora_B.weight
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=gen(seed)))


def test_lora_linear_merged_weight_matches_the_wrapped_layer():
    layer = LoRALinear(nn.Linear(6, 5), rank=3, alpha=6.0, generator=gen())
    _nonzero_b(layer)
    x = torch.randn(7, 6, generator=gen(2))
    merged = F.linear(x, layer.merged_weight(), layer.base.bias)
    assert torch.allclose(layer(x), merged, atol=1e-5)
    assert not torch.allclose(layer(x), layer.base(x), atol=1e-3)


def test_lora_conv_merged_weight_matches_the_wrapped_layer():
    base = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2)
    layer = LoRAConv2d(base, rank=2, alpha=3.0, generator=gen())
    _nonzero_b(layer)
    x = images(2, 9)
    merged = F.conv2d(x, layer.merged_weight(), base.bias, base.stride, base.padding, base.dilation)
    assert torch.allclose(layer(x), merged, atol=1e-5)
    assert not torch.allclose(layer(x), base(x), atol=1e-3)


def test_lora_rank_and_alpha_are_respected():
    lin = LoRALinear(nn.Linear(6, 5), rank=3, alpha=12.0, generator=gen())
    conv = LoRAConv2d(nn.Conv2d(3, 5, 3, padding=1), rank=2, alpha=1.0, generator=gen())
    assert lin.lora_A.shape == (3, 6) and lin.lora_B.shape == (5, 3) and lin.scale == 4.0
    assert conv.lora_A.weight.shape == (2, 3, 3, 3) and conv.lora_B.weight.shape == (5, 2, 1, 1)
    assert conv.scale == 0.5
    _nonzero_b(lin), _nonzero_b(conv)
    x, xi = torch.randn(4, 6, generator=gen(1)), images(2, 6)
    assert torch.allclose(lin(x) - lin.base(x), 4.0 * (x @ lin.lora_A.T @ lin.lora_B.T), atol=1e-5)
    assert torch.allclose(conv(xi) - conv.base(xi), 0.5 * conv.lora_B(conv.lora_A(xi)), atol=1e-5)
    with pytest.raises(ValueError, match="lora_rank"):
        LoRALinear(nn.Linear(6, 5), rank=0, alpha=1.0, generator=gen())


def test_lora_adapters_are_seeded_by_the_generator():
    a, b, c = (LoRALinear(nn.Linear(6, 5), 2, 2.0, gen(s)) for s in (0, 0, 1))
    assert torch.equal(a.lora_A, b.lora_A) and not torch.equal(a.lora_A, c.lora_A)
    assert not a.lora_B.any()


def test_lora_finetuning_lowers_the_loss_and_moves_the_adapters(monkeypatch):
    seen = capture_prepared(monkeypatch)
    model, data = tiny_net(bn=True), tiny_data(60)
    cfg = AttackConfig(strategy="lora", optimizer="adam", lr=0.02, batch_size=16, epochs=4, lora_rank=2)
    result = finetune(model, data, data, cfg, task=CLASSIFICATION)
    assert result.restricted_loss[-1] < result.restricted_loss[0] - 0.1
    [(tuned, prepared)] = seen
    assert tuned.body[0].lora_B.weight.abs().sum() > 0 and tuned.classifier[0].lora_B.abs().sum() > 0
    assert torch.equal(tuned.body[0].base.weight, model.body[0].weight)  # base frozen
    assert all(isinstance(m, nn.Conv2d) for m in model.body[:1])  # the input model is not wrapped


def test_lora_resnet18_channels_last_trains_a_step():
    model = net("resnet18", channels_last=True)
    params = prepare(model, AttackConfig(strategy="lora", lora_rank=2), gen())
    opt = torch.optim.SGD(params, lr=0.1)
    x = images(2).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    assert model.body[0].lora_B.weight.abs().sum() > 0


# ------------------------------------------------------------------------------------------- blocks
def test_blocks_record_each_architecture_structure():
    assert net("convnet").blocks() == [["body.0.", "body.1."], ["body.4.", "body.5."], ["body.8.", "body.9."],
                                       ["classifier.0."]]
    assert net("convnet_nobn").blocks() == [["body.0."], ["body.3."], ["body.6."], ["classifier.0."]]
    assert net("resnet18").blocks() == [["body.0.", "body.1."], ["body.4."], ["body.5."], ["body.6."],
                                        ["body.7."]]
    assert tiny_net(bn=True).blocks() == [["body.0.", "body.1."], ["classifier.0."]]  # default_blocks


@pytest.mark.parametrize("arch", MODELS.names())
def test_blocks_cover_every_parameter_but_the_head_once(arch):
    with torch.device("meta"):
        model = MODELS.get(arch)(num_classes=3, channels=3, image_size=16)
    covered = model.block_param_names(len(model.blocks()))
    assert len(covered) == len(set(covered))
    assert set(covered) | set(model.head_param_names()) == {n for n, _ in model.named_parameters()}
    assert not set(covered) & set(model.head_param_names())


def test_last_k_trains_the_last_blocks_and_the_head_unchanged():
    model = net("convnet")
    before = copy.deepcopy(model.state_dict())
    prepare(model, AttackConfig(strategy="last-k", blocks=2), gen())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"body.8.weight", "body.9.weight", "body.9.bias", "classifier.0.weight",
                         "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reinit_last_k_reinitialises_exactly_those_blocks_and_the_head():
    model = net("convnet")
    with torch.no_grad():  # non-default BN state, so a reset is visible
        for bn in (model.body[5], model.body[9]):
            bn.running_mean.fill_(0.3), bn.running_var.fill_(2.0), bn.num_batches_tracked.fill_(7)
            bn.weight.fill_(1.5), bn.bias.fill_(0.2)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    prepare(model, AttackConfig(strategy="reinit-last-k", blocks=2), gen())
    assert torch.equal(rng, torch.get_rng_state())  # seeded from the generator, global RNG untouched
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"body.8.weight", "body.9.weight", "body.9.bias", "body.9.running_mean", "body.9.running_var",
                       "body.9.num_batches_tracked", "classifier.0.weight", "classifier.0.bias",
                       "classifier.2.weight", "classifier.2.bias"}
    assert not after["body.9.running_mean"].any() and torch.equal(after["body.9.running_var"], torch.ones(64))
    assert not model.head.bias.any() and model.head.weight.std() < 0.02
    again = net("convnet")
    again.load_state_dict(before)
    prepare(again, AttackConfig(strategy="reinit-last-k", blocks=2), gen())
    other = net("convnet")
    other.load_state_dict(before)
    prepare(other, AttackConfig(strategy="reinit-last-k", blocks=2), gen(1))
    assert torch.equal(again.body[8].weight, model.body[8].weight)
    assert not torch.equal(other.body[8].weight, model.body[8].weight)


def test_strategy_problem_names_the_field_and_the_fix():
    ok = AttackConfig(strategy="last-k", blocks=4)
    assert strategy_problem("convnet", ok) is None
    assert strategy_problem("convnet", replace(ok, blocks=5)) == "blocks: 5 > the 4 blocks convnet has (last-k); use 1..4"
    assert "use 1..5" in strategy_problem("resnet18", replace(ok, strategy="reinit-last-k", blocks=0))
    assert strategy_problem("resnet18", replace(ok, blocks=5)) is None
    assert strategy_problem("convnet", AttackConfig(strategy="direct-all", blocks=99)) is None  # field unused
    assert strategy_problem("convnet", AttackConfig(strategy="lora")) is None
    assert strategy_problem("convnet", AttackConfig(strategy="lora", lora_rank=0)).startswith("lora_rank: 0")
    assert strategy_problem("convnet", AttackConfig(strategy="lora", lora_alpha=0)).startswith("lora_alpha")
    assert "did you mean 'last-k'" in strategy_problem("convnet", AttackConfig(strategy="last-kk"))


# ------------------------------------------------------------------------------------------ augment
@pytest.mark.parametrize("name", AUGMENTS.names())
def test_augment_keeps_shape_and_is_deterministic_for_a_seeded_generator(name):
    x = images(16, 8)
    fn = AUGMENTS.get(name)
    a, b, c = fn(x, gen(0)), fn(x, gen(0)), fn(x, gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert (name == "none") == torch.equal(a, c)


def test_none_is_identity_and_runs_nothing():
    x = images()
    assert AUGMENTS.get("none")(x, gen()) is x and make_augment("none") is None
    assert make_augment("flip") is AUGMENTS.get("flip")


def test_flip_flips_some_images_horizontally_and_keeps_the_others():
    x = images(32, 6)
    out = AUGMENTS.get("flip")(x, gen())
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all() and flipped.any() and kept.any()


def test_shift_moves_content_by_at_most_two_pixels():
    x = torch.zeros(32, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = AUGMENTS.get("shift")(x.contiguous(memory_format=torch.channels_last), gen())
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(32))  # the dot stays inside (|shift| <= 2)
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 9, where % 9
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    assert set((rows - 4).tolist()) == set((cols - 4).tolist()) == {-2, -1, 0, 1, 2}  # every shift, both axes


def test_colour_is_a_per_image_per_channel_affine_change():
    x = images(8, 6)
    out = AUGMENTS.get("colour")(x, gen())
    centred = lambda t: t - t.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    ratio = centred(out) / centred(x)
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-3)
    assert ratio[:, :, 0, 0].std() > 0.01


# ----------------------------------------------------------------------------- BN modes, loss, val
@pytest.mark.parametrize("bn_mode", BN_MODES.names())
def test_frozen_bn_keeps_running_statistics_bit_identical(bn_mode, monkeypatch):
    seen = capture_prepared(monkeypatch)
    model, data = tiny_net(bn=True), tiny_data(60)
    finetune(model, data, data, AttackConfig(strategy="direct-all", lr=0.05, batch_size=16, epochs=2,
                                             bn_mode=bn_mode), task=CLASSIFICATION)
    [(tuned, prepared)] = seen
    stats = ("body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked")
    same = [torch.equal(tuned.state_dict()[k], prepared[k]) for k in stats]
    assert same == ([True] * 3 if bn_mode == "frozen" else [False] * 3)
    assert not torch.equal(tuned.body[1].weight, prepared["body.1.weight"])  # affine still trains


def test_train_epoch_uses_label_smoothing():
    model, data = tiny_net(), tiny_data(30)
    x, y = data.tensors
    with torch.no_grad():
        plain, smooth = F.cross_entropy(model(x), y), F.cross_entropy(model(x), y, label_smoothing=0.3)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_epoch(model, data, frozen, 30, gen(), label_smoothing=0.3, task=CLASSIFICATION)
    assert loss == pytest.approx(smooth.item(), rel=1e-5) and loss != pytest.approx(plain.item(), rel=1e-3)


def test_finetune_recipe_fields_change_the_run_and_stay_reproducible():
    model, data = tiny_net(bn=True), tiny_data(60)
    base = AttackConfig(strategy="initfc-all", lr=0.05, batch_size=16, epochs=2)
    run = lambda **kw: finetune(model, data, data, replace(base, **kw), task=CLASSIFICATION).restricted_loss  # noqa: E731
    reference = run()
    for kw in ({"augment": "all"}, {"label_smoothing": 0.2}, {"bn_mode": "frozen"}, {"schedule": "one-cycle"}):
        assert run(**kw) == run(**kw) and run(**kw) != reference, kw


def test_finetune_reports_validation_accuracy_every_epoch():
    model, data = tiny_net(bn=True), tiny_data(60)
    x, y = data.tensors
    other = TensorDataset(x, (y + 1) % 3)  # wrong labels: the better the model, the lower its accuracy here
    cfg = AttackConfig(lr=0.05, batch_size=16, epochs=2)
    metrics = []
    same = finetune(model, data, data, cfg, val=data, task=CLASSIFICATION)
    result = finetune(model, data, data, cfg, val=other, on_epoch=lambda e, m: metrics.append((e, m)), task=CLASSIFICATION)
    assert same.val == same.restricted and len(result.val) == 3
    assert result.val[0] == evaluate(model, other, task=CLASSIFICATION).score
    assert result.val[-1] < result.restricted[-1] - 20
    assert [m["val_acc"] for _, m in metrics] == result.val and [e for e, _ in metrics] == [0, 1, 2]
    plain = []
    assert finetune(model, data, data, cfg, on_epoch=lambda e, m: plain.append(m), task=CLASSIFICATION).val == []
    assert all("val_acc" not in m for m in plain)


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 10, 33, 100])
def test_one_cycle_matches_torch_one_cycle_lr(total):
    lr = 0.1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, cycle_momentum=False)
    expected = []
    for _ in range(total):
        expected.append(ref.get_last_lr()[0])
        opt.step(), ref.step()
    factor = SCHEDULES.get("one-cycle")(total)
    assert [lr * factor(s) for s in range(total)] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert factor(total) == factor(total - 1)  # LambdaLR's extra call after the last step


def test_warmup_cosine_warms_up_linearly_then_decays_to_zero():
    f = SCHEDULES.get("warmup-cosine")(100)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == 1.0 and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    values = [f(s) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)
    assert SCHEDULES.get("warmup-cosine")(1)(0) == 1.0


def test_new_registries_are_listed_for_validation():
    listed = registries()
    assert listed["augmentations"].names() == ["none", "flip", "shift", "colour", "all"]
    assert listed["BN modes"].names() == ["train", "frozen"]
    assert {"warmup-cosine", "one-cycle"} <= set(listed["schedules"].names())
    assert {"lora", "last-k", "reinit-last-k"} <= set(listed["strategies"].names())
    assert listed["augmentations"] is AUGMENTS and listed["BN modes"] is BN_MODES
    shown = catalog()
    assert set(shown["augmentations"]) == set(AUGMENTS.names()) and "blocks" in shown["recipe settings"]
    assert "[every mode; its settings: blocks]" in shown["strategies"]["last-k"]
