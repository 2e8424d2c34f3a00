"""Pretraining state checkpoints (issue 25): pretraining stopped after epoch k and continued from the state it saved
(read back from its files, in a process whose RNGs moved on) ends bit-identical to pretraining that never stopped,
with the same validation curve; the last epoch saves no state (the finished model follows at once)."""

import random

import pytest
import torch

from sophon_ray.core.protection import load_state, save_state
from sophon_ray.core.training import pretrain
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.run.train_worker import state_digest
from sophon_ray.spec import PretrainSpec
from tests.tiny import tiny_data, tiny_net

SPEC = PretrainSpec(epochs=4, optimizer="adam", lr=3e-3, batch_size=16)


class Stop(Exception):
    pass


def _pretrain(tmp_path, stop_after=None, resume=None):
    model = tiny_net(bn=True, seed=3)
    saved = []

    def checkpoint(state):
        save_state(state, tmp_path / str(state.iteration))
        saved.append(state.iteration)
        if state.iteration == stop_after:
            raise Stop

    if resume is not None:
        model.load_state_dict(tiny_net(bn=True, seed=99).state_dict())  # the resumed weights must come from the state
    result = pretrain(model, tiny_data(96, seed=1), tiny_data(40, seed=2), SPEC, seed=5, task=CLASSIFICATION,
                      on_checkpoint=checkpoint, resume=resume)
    return model, result, saved


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_pretraining_ends_bit_identical_to_an_uninterrupted_one(tmp_path, stop_after):
    straight, straight_result, saved = _pretrain(tmp_path / "straight")
    assert saved == [1, 2, 3] and straight_result.resumed_from == 0
    with pytest.raises(Stop):
        _pretrain(tmp_path / "stopped", stop_after=stop_after)
    torch.manual_seed(12345)   # another process: the RNGs moved on; the state comes from its files only
    random.seed(12345)
    state = load_state(tmp_path / "stopped" / str(stop_after))
    resumed, result, _ = _pretrain(tmp_path / "resumed", resume=state)
    assert result.resumed_from == stop_after
    assert state_digest(resumed) == state_digest(straight)
    assert result.val_score == straight_result.val_score
