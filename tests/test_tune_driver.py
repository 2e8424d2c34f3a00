"""The Tune driver's pure parts: sharing trial inputs as numpy, and batched epoch reports (no Ray here)."""

import pickle

import numpy as np
import torch
from torch.utils.data import TensorDataset

from sophon_ray import names
from sophon_ray.recipes import AttackConfig
from sophon_ray.run.plan import Subject, Trial
from sophon_ray.run.trials_worker import AttackData, EpochReporter, share, unshare


def test_share_turns_every_tensor_into_numpy_and_unshare_restores_equal_tensors():
    data = {"train": [TensorDataset(torch.randn(5, 3), torch.arange(5))], "state": {"w": torch.ones(2, 2)},
            "card": {"arch": "convnet", "num_classes": 10}}
    shared = share(data)
    arrays = [shared["train"][0].arrays[0], shared["train"][0].arrays[1], shared["state"]["w"]]
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert shared["card"] == data["card"]
    back = unshare(pickle.loads(pickle.dumps(shared, protocol=5)))
    x, y = back["train"][0].tensors
    assert torch.equal(x, data["train"][0].tensors[0]) and torch.equal(y, data["train"][0].tensors[1])
    assert torch.equal(back["state"]["w"], data["state"]["w"])


def test_share_reaches_into_the_trials_data_dataclass():
    ds = TensorDataset(torch.randn(4, 2), torch.arange(4))
    shared = share(AttackData([ds], [ds], [ds], [ds], ds))
    assert isinstance(shared.original_test.arrays[0], np.ndarray)
    assert isinstance(shared.restricted_attacker[0].arrays[1], np.ndarray)
    back = unshare(shared)
    assert torch.equal(back.restricted_test[0].tensors[0], ds.tensors[0])


def test_unshare_views_read_only_arrays_without_copying():
    array = np.arange(6, dtype=np.float32)
    array.setflags(write=False)  # as Ray's object store hands numpy buffers to a worker
    tensor = unshare(array)
    assert tensor.data_ptr() == array.ctypes.data


def test_reporter_buffers_epochs_and_sends_them_with_the_final_metrics():
    sent, mailed = [], []
    reporter = EpochReporter(sent.append, final_epoch=3, every_s=3600, send=lambda rows, files: mailed.append(rows))
    for epoch in range(4):
        reporter(epoch, {"restricted_acc": 10.0 * epoch, "restricted_loss": 1.0 / (epoch + 1)})
    assert sent == [] and mailed == []  # nothing reported before the end when reports are rate-limited
    reporter.flush(epoch=3, restricted_acc=30.0, done=True)
    assert len(sent) == 1 and len(mailed) == 1
    assert [row["epoch"] for row in mailed[0]] == [0, 1, 2, 3]   # the curve goes to the trial mail ...
    assert sent[0]["done"] and sent[0]["epoch"] == 3
    # ... and Tune gets scalars only (its results stay small; nothing for its loggers to stringify)
    assert all(isinstance(v, (int, float, str, bool)) for v in sent[0].values())


def test_reporter_reports_every_epoch_when_the_interval_is_zero_but_never_the_last_one_early():
    sent, mailed = [], []
    reporter = EpochReporter(sent.append, final_epoch=2, every_s=0.0, send=lambda rows, files: mailed.append(rows))
    for epoch in range(3):
        reporter(epoch, {"restricted_acc": 1.0, "restricted_loss": 2.0})
    assert [[row["epoch"] for row in rows] for rows in mailed] == [[0], [1]] and len(sent) == 2
    reporter.flush({"a.png": b"png"}, epoch=2, done=True)
    assert [row["epoch"] for row in mailed[-1]] == [2] and "a.png" not in sent[-1]


def test_each_grid_fine_tunes_and_scores_on_its_own_data():
    train, val, pool, test = (TensorDataset(torch.full((2, 1), float(i)), torch.zeros(2)) for i in range(4))
    data = AttackData([train], [val], [pool], [test], test)

    def trial(grid: str) -> Trial:
        return Trial(Subject("normal"), grid, 0, "d", "disjoint", AttackConfig())

    assert data.for_trial(trial(names.DEVELOPMENT)) == (train, val)      # the protector's share, validation
    assert data.for_trial(trial(names.EVALUATION)) == (pool, test)       # the attacker's pool, test
