"""Protection state checkpoints without Ray: a protection stopped at iteration k and resumed from its saved state
ends bit-identical to one that never stopped (the checkpoint holds all the state), and the parts round-trip."""

import math
import random
from dataclasses import replace

import pytest
import torch
from torch.utils.data import Subset

from sophon_ray.core.state import CheckpointError, load_tree, save_tree
from sophon_ray.core.data import infinite_batches
from sophon_ray.core.protection import ProtectState, load_state, protect, save_state
from sophon_ray.spec import EnvironmentSpec, ProtectSpec, spec_hash
from sophon_ray.run.train_worker import state_digest
from sophon_ray.core.training import evaluate
from sophon_ray.run.validate import parse_spec
from tests.tiny import tiny_data, tiny_net
from sophon_ray.modes.classification.task import CLASSIFICATION

SPEC = ProtectSpec(loss="ice", iterations=12, inner_steps=3, base_lr=1e-3, alpha=1, beta=1, ntr_steps=2,
                   batch_size=20, eval_every=2, probe_every=5, probe_epochs=1, checkpoint_every=4,
                   environments=EnvironmentSpec(optimizers=("sgd", "adam"), lr=(1e-3, 1e-2), head_reinit=0.5,
                                                head_only=0.3))


def _protect(tmp_path, spec, normal_acc, resume=None):
    """Protect tiny data; every state checkpoint saved (as a worker would) to ``tmp_path/<iteration>``. Returns the
    result, the metric rows emitted and, per checkpoint, how many rows had been emitted then."""
    model = tiny_net(bn=True, seed=3)
    original, restricted = tiny_data(90, seed=1), tiny_data(70, seed=2)
    acc = evaluate(model, original, task=CLASSIFICATION).score if normal_acc is None else normal_acc
    rows, emitted = [], {}

    def checkpoint(state):
        save_state(state, tmp_path / str(state.iteration))
        emitted[state.iteration] = len(rows)

    result = protect(model, original, original, [restricted, Subset(restricted, range(50))], [restricted], spec,
                     acc, on_metrics=lambda step, row: rows.append((step, row)), on_checkpoint=checkpoint,
                     resume=resume, task=CLASSIFICATION)
    return result, rows, emitted


# rolls-back: accuracy collapses after iteration 5, so from then on every check rolls back to the state of 5 (a
# rollback snapshot other than the start and than the current weights when the state of 8 is saved)
SCENARIOS = {"passes": (SPEC, None),
             "rolls-back": (replace(SPEC, base_lr=0.01, alpha=5, ntr_steps=0, eval_every=3, max_drop=0.0), 40.0)}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("stop_at", [4, 8])
def test_resumed_protection_ends_bit_identical_to_an_uninterrupted_one(tmp_path, scenario, stop_at):
    spec, normal_acc = SCENARIOS[scenario]
    straight, straight_rows, emitted = _protect(tmp_path / "straight", spec, normal_acc)
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == ["4", "8"]
    # another process: other global RNG state, the state read back from its files only
    torch.manual_seed(12345)
    random.seed(12345)
    state = load_state(tmp_path / "straight" / str(stop_at))
    assert state.iteration == stop_at
    resumed, resumed_rows, _ = _protect(tmp_path / "resumed", spec, normal_acc, resume=state)
    assert resumed.resumed_from == stop_at and straight.resumed_from == 0
    assert state_digest(resumed.model) == state_digest(straight.model)
    assert resumed.candidates == straight.candidates and resumed.selected_iteration == straight.selected_iteration
    assert resumed.rollbacks == straight.rollbacks and resumed.iterations_run == straight.iterations_run
    assert [r["to"] for r in straight.rollbacks] == ([] if normal_acc is None else [5, 5, 5, 5])
    assert _same(resumed.history, straight.history)
    # the metrics emitted after the checkpoint are exactly the uninterrupted run's
    assert _same(resumed_rows, straight_rows[emitted[stop_at]:])
    # a resumed run checkpoints on, from where it is
    assert sorted(p.name for p in tmp_path.glob("resumed/*")) == ([] if stop_at == 8 else ["8"])


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    return repr(a).replace("nan", "N") == repr(b).replace("nan", "N")


def test_checkpoint_every_zero_never_checkpoints(tmp_path):
    calls = []
    model = tiny_net(bn=True)
    data = tiny_data(60, seed=1)
    protect(model, data, data, [data], [data], replace(SPEC, iterations=5, checkpoint_every=0), 0.0,
            on_checkpoint=calls.append, task=CLASSIFICATION)
    assert calls == []


def test_state_files_shared_part_from_rank_0_local_part_per_rank(tmp_path):
    state = ProtectState(7, {"model": {"w": torch.ones(2)}}, {"rng": random.Random(1).getstate()})
    save_state(state, tmp_path, rank=0)
    save_state(ProtectState(7, state.shared, {"rng": random.Random(2).getstate()}), tmp_path, rank=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "protect-rank0.json", "protect-rank0.safetensors", "protect-rank1.json", "protect-rank1.safetensors",
        "protect-state.json", "protect-state.safetensors"]  # safetensors + JSON: nothing pickled
    one = load_state(tmp_path, rank=1)
    assert one.iteration == 7 and torch.equal(one.shared["model"]["w"], torch.ones(2))
    assert one.local["rng"] == random.Random(2).getstate()
    with pytest.raises(CheckpointError, match="protect-rank2"):
        load_state(tmp_path, rank=2)


def test_tree_round_trip_keeps_int_keys_tuples_and_tensors(tmp_path):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    tree = {"opt": opt.state_dict(), "rng": random.Random(5).getstate(), "gen": torch.Generator().get_state(),
            "rows": [{"a": 1.5, "b": math.inf}], "none": None, "flag": True}
    save_tree(tree, tmp_path, "t")
    back = load_tree(tmp_path, "t")
    assert back["rng"] == tree["rng"] and isinstance(back["rng"], tuple)
    assert list(back["opt"]["state"]) == [0] and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], tree["opt"]["state"][0]["exp_avg"])
    assert torch.equal(back["gen"], tree["gen"]) and back["rows"] == tree["rows"] and back["none"] is None
    restored = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    restored.load_state_dict(back["opt"])
    with pytest.raises(CheckpointError, match="cannot store a object"):
        save_tree({"x": object()}, tmp_path, "bad")


def test_batch_streams_sharing_a_generator_continue_exactly_from_their_states():
    """Tensor sets and a DataLoader-backed set (its sampler also draws when a pass ends), interleaved on one
    generator as the protection's streams are, across several pass boundaries."""
    sets = [tiny_data(23), Subset(tiny_data(23, seed=1), range(17)), tiny_data(40, seed=2)]
    order = [random.Random(0).randrange(3) for _ in range(40)]
    gen = torch.Generator().manual_seed(0)
    streams = [infinite_batches(d, 5, gen) for d in sets]
    assert streams[0].state() == {"pass_state": None, "taken": 0}
    for i in order[:13]:
        next(streams[i])
    saved, gen_state = [s.state() for s in streams], gen.get_state()
    expected = [next(streams[i])[1] for i in order[13:]]
    gen2 = torch.Generator().manual_seed(99)
    others = [infinite_batches(d, 5, gen2) for d in sets]
    gen2.set_state(gen_state)  # before or after load_state: it leaves the generator's state as it was
    for other, state in zip(others, saved):
        other.load_state(state)
    got = [next(others[i])[1] for i in order[13:]]
    assert [torch.equal(a, b) for a, b in zip(expected, got)] == [True] * len(expected)


def test_checkpoint_every_changes_no_key_and_must_not_be_negative():
    assert spec_hash(SPEC) == spec_hash(replace(SPEC, checkpoint_every=1))
    assert spec_hash(SPEC) != spec_hash(replace(SPEC, iterations=13))
    data = {"name": "x", "model": {"arch": "convnet", "num_classes": 10},
            "original": {"dataset": "shapes", "image_size": 16},
            "restricted": [{"dataset": "shapes_m", "image_size": 16}],
            "protect": [{"checkpoint_every": -1}]}
    with pytest.raises(Exception, match=r"protect\.0\.checkpoint_every: must be >= 0 .*0 turns them off"):
        parse_spec(data)
    assert parse_spec({**data, "protect": [{}]}).protect[0].checkpoint_every == 50
