import pytest
import torch

from sophon_ray.core import attack
from sophon_ray.core.attack import finetune, prepare, scratch_model
from sophon_ray.recipes import STRATEGIES, AttackConfig
from sophon_ray.core.training import make_optimizer
from sophon_ray.recipes import OPTIMIZERS, SCHEDULES
from tests.tiny import tiny_data, tiny_net
from sophon_ray.modes.classification.task import CLASSIFICATION

HEAD = {"classifier.2.weight", "classifier.2.bias"}
CLASSIFIER = HEAD | {"classifier.0.weight", "classifier.0.bias"}
ALL = {n for n, _ in tiny_net(bn=True).named_parameters()}
EXPECTED = {  # strategy -> (trainable, re-initialised)
    "direct-all": (ALL, set()),
    "direct-fc": (HEAD, set()),
    "initfc-all": (ALL, HEAD),
    "initfc-fc": (HEAD, HEAD),
    "rtal": (ALL, CLASSIFIER),
    "last-k": (CLASSIFIER, set()),  # blocks=1: tiny_net's last block is the classifier's hidden Linear
    "reinit-last-k": (CLASSIFIER, CLASSIFIER),
}
ELSEWHERE = {"lora", "decoder"}  # lora changes the module tree: tests/test_recipes.py; decoder: test_generation.py


def test_every_strategy_is_covered():
    assert set(STRATEGIES.names()) == set(EXPECTED) | ELSEWHERE


@pytest.mark.parametrize("strategy", sorted(EXPECTED))
def test_strategy_reinitialises_and_freezes_exactly_the_right_parameters(strategy):
    model = tiny_net(bn=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = prepare(model, AttackConfig(strategy=strategy), torch.Generator().manual_seed(0))
    trainable, reinit = EXPECTED[strategy]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trainable}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n in reinit if not n.endswith("bias") or before[n].any()}
    if "initfc" in strategy:
        assert model.head.bias.abs().sum() == 0 and model.head.weight.std() < 0.02


@pytest.mark.parametrize("strategy", ["direct-fc", "initfc-fc"])
def test_head_only_attack_trains_only_the_head_but_updates_batchnorm_statistics(strategy, monkeypatch):
    model = tiny_net(bn=True)
    data = tiny_data(60)
    cfg = AttackConfig(strategy=strategy, optimizer="adam", lr=1e-2, batch_size=16, epochs=2)
    seen = []  # finetune trains a private copy: catch it (and its state after re-init) where it is prepared

    def spy(net, config, generator):
        params = prepare(net, config, generator)
        seen.append((net, {n: t.detach().clone() for n, t in net.state_dict().items()}))
        return params

    monkeypatch.setattr(attack, "prepare", spy)
    result = finetune(model, data, data, cfg, task=CLASSIFICATION)
    assert len(result.restricted) == 3 and result.train_size == 60
    [(tuned, prepared)] = seen
    assert tuned is not model
    params, buffers, original = dict(tuned.named_parameters()), dict(tuned.named_buffers()), model.state_dict()
    body = set(params) - HEAD
    assert body and all(torch.equal(params[n], original[n]) for n in body)
    assert all(not torch.equal(params[n], prepared[n]) for n in HEAD)
    assert buffers["body.1.num_batches_tracked"].item() == 2 * 4  # 2 epochs of 4 train-mode batches
    assert not torch.equal(buffers["body.1.running_mean"], original["body.1.running_mean"])
    assert not torch.equal(buffers["body.1.running_var"], original["body.1.running_var"])


def test_finetune_does_not_modify_its_input_and_returns_curves():
    model = tiny_net(bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = tiny_data(60)
    result = finetune(model, data, data, AttackConfig(epochs=3, lr=0.05, batch_size=16, data_fraction=0.5),
                      original_test=data, task=CLASSIFICATION)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(result.restricted) == len(result.restricted_loss) == 4
    assert result.train_size == 30 and result.original is not None
    assert result.best >= result.final and result.restricted[-1] > result.restricted[0]


def test_finetune_is_reproducible_and_seed_sensitive():
    model, data = tiny_net(bn=True), tiny_data(60)
    run = lambda seed: finetune(model, data, data, AttackConfig(epochs=2, batch_size=8, seed=seed, lr=0.05,
                                                                 strategy="initfc-all"), task=CLASSIFICATION).restricted_loss
    assert run(0) == run(0) and run(0) != run(1)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_every_optimizer_name_builds_and_steps(name):
    model = tiny_net()
    opt = make_optimizer(name, model.parameters(), lr=0.1, weight_decay=1e-4)
    x, y = tiny_data(8).tensors
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = model.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.head.weight)


def test_optimizer_names_are_the_documented_set():
    assert set(OPTIMIZERS.names()) == {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adadelta"}
    with pytest.raises(KeyError, match="did you mean 'adam'"):
        make_optimizer("adan", tiny_net().parameters(), 0.1)


def test_schedules():
    assert SCHEDULES.get("constant")(10)(7) == 1.0
    cos = SCHEDULES.get("cosine")(10)
    assert cos(0) == 1.0 and cos(10) == pytest.approx(0.0) and cos(5) == pytest.approx(0.5)


def test_scratch_is_a_fresh_seeded_init_of_the_same_architecture():
    model = tiny_net(bn=True)
    a, b, c = scratch_model(model, 0), scratch_model(model, 0), scratch_model(model, 1)
    sa, sb, sc, sm = a.state_dict(), b.state_dict(), c.state_dict(), model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["body.0.weight"], sc["body.0.weight"])
    assert not torch.equal(sa["body.0.weight"], sm["body.0.weight"])
