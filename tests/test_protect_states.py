"""The finder of a job's newest state checkpoint across Ray Train runs (``train_states.find_states``: what ``--resume``
continues a protection or a pretraining from whatever group of jobs it ran in), what a run without ``--resume``
deletes (``forget_states``), and the worker's read of a found state. Fake run folders written by the real writers
(``save_state``, ``write_resume``) as Ray Train lays them out; no Ray."""

import os
import random
import time
from pathlib import Path

import pytest
import torch

from sophon_ray.core.protection import ProtectState, save_state
from sophon_ray.run.train_states import _whole_safetensors, find_states, forget_states, storage, whole_state
from sophon_ray.run.train_worker import RESUME, read_found_state, write_resume


def state_checkpoint(root: Path, run: str, name: str, job: str | None, iteration: int, workers: int = 1,
                     done: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder of Ray Train run ``run`` as the workers report it: every rank's state part and rank 0's
    manifest (``job`` None: a finished job's checkpoint, no state)."""
    folder = root / run / f"checkpoint_{name}"
    if job is not None:
        for rank in range(workers):
            local = {"rng": random.Random(rank).getstate(), "gen": torch.Generator().manual_seed(rank).get_state()}
            save_state(ProtectState(iteration, {"model": {"w": torch.full((3,), float(iteration))}}, local),
                       folder / RESUME, rank)
    write_resume(folder, list(done), None, 80.0, job, [{"step": iteration, "loss": 1.0}] if job else None,
                 iteration if job else None)
    return folder


def test_newest_state_per_job_by_iteration_across_runs_whatever_the_file_times(tmp_path):
    """Jobs a and b were in one run (one group), then in runs of their own (another protect_parallel): each job's
    highest iteration wins, even where it is the oldest file; other jobs, finished jobs and other runs are not
    asked for."""
    newest_a = state_checkpoint(tmp_path, "train-ab", "1", "a", 30)
    time.sleep(0.01)
    state_checkpoint(tmp_path, "train-ab", "2", "b", 10)
    state_checkpoint(tmp_path, "train-a", "1", "a", 20)       # written later, older iteration
    newest_b = state_checkpoint(tmp_path, "train-b", "1", "b", 40)
    state_checkpoint(tmp_path, "train-b", "0", None, 0, done=("a",))  # a finished job's checkpoint: no state
    state_checkpoint(tmp_path, "train-c", "1", "c", 90)       # a job not asked for
    state_checkpoint(tmp_path, "defend-x", "1", "a", 99)      # not a train-* run
    os.utime(newest_a / RESUME / "manifest.json", (1, 1))     # mtimes say nothing
    found = find_states(str(tmp_path), ["a", "b", "d"], workers=1)
    assert {k: (Path(v.path), v.iteration) for k, v in found.items()} == {"a": (newest_a, 30), "b": (newest_b, 40)}
    assert (found["a"].run, found["b"].run) == ("train-ab", "train-b")
    # a run's own folder is left to Ray Train's restore: the next newest elsewhere
    again = find_states(str(tmp_path), ["a", "b"], workers=1, skip_run="train-ab")
    assert {k: (v.run, v.iteration) for k, v in again.items()} == {"a": ("train-a", 20), "b": ("train-b", 40)}


def test_torn_and_partial_checkpoints_are_skipped_for_the_next_newest_not_fatal(tmp_path):
    good = state_checkpoint(tmp_path, "train-1", "1", "a", 10)
    no_manifest = state_checkpoint(tmp_path, "train-1", "2", "a", 50)
    (no_manifest / RESUME / "manifest.json").unlink()                      # rank 0's files never uploaded
    torn_manifest = state_checkpoint(tmp_path, "train-2", "1", "a", 40)
    path = torn_manifest / RESUME / "manifest.json"
    path.write_text(path.read_text()[:20])                                  # cut mid-write
    short = state_checkpoint(tmp_path, "train-2", "2", "a", 30)
    tensors = short / RESUME / "protect-state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-4])                          # a short state file
    no_local = state_checkpoint(tmp_path, "train-3", "1", "a", 20)
    for f in (no_local / RESUME).glob("protect-rank0.*"):                   # the rank's part missing
        f.unlink()
    (tmp_path / "train-4").mkdir()                                          # a run with no checkpoint yet
    state_checkpoint(tmp_path, "train-4", "1", "b", 5)
    (tmp_path / "train-4" / "checkpoint_1" / RESUME / "protect-state.json").write_text("{")  # a torn JSON part
    found = find_states(str(tmp_path), ["a", "b"], workers=1)
    assert list(found) == ["a"] and Path(found["a"].path) == good and found["a"].iteration == 10


def test_a_state_of_another_number_of_workers_is_not_continued(tmp_path):
    """Each rank's part holds its own shard's stream positions: a state of 2 workers is no state for 1 or 3."""
    two = state_checkpoint(tmp_path, "train-1", "1", "a", 20, workers=2)
    one = state_checkpoint(tmp_path, "train-2", "1", "a", 10, workers=1)
    assert Path(find_states(str(tmp_path), ["a"], workers=2)["a"].path) == two
    assert Path(find_states(str(tmp_path), ["a"], workers=1)["a"].path) == one
    assert find_states(str(tmp_path), ["a"], workers=3) == {}
    fs, _ = storage(str(tmp_path))
    assert whole_state(fs, f"{two}/{RESUME}", 2) and not whole_state(fs, f"{two}/{RESUME}", 1)


def test_a_storage_uri_and_a_missing_storage(tmp_path):
    state = state_checkpoint(tmp_path, "train-1", "1", "a", 10)
    found = find_states(f"file://{tmp_path}", ["a"], workers=1)   # the pyarrow-URI branch (s3:// goes the same way)
    assert Path(found["a"].path) == state
    assert find_states(str(tmp_path / "nothing"), ["a"], workers=1) == {}


def test_whole_safetensors_checks_the_length_its_header_gives(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"x": torch.ones(5), "y": torch.zeros(2, 3)}, str(path))
    fs, _ = storage(str(tmp_path))
    size = path.stat().st_size
    assert _whole_safetensors(fs, str(path), size)
    path.write_bytes(path.read_bytes()[:-1])
    assert not _whole_safetensors(fs, str(path), size - 1)
    path.write_bytes(b"\x10\x00\x00")                               # not even its header's length
    assert not _whole_safetensors(fs, str(path), 3)


def test_a_run_without_resume_deletes_the_runs_holding_states_of_its_jobs_only(tmp_path):
    state_checkpoint(tmp_path, "train-ab", "1", "a", 30)
    state_checkpoint(tmp_path, "train-ab", "0", None, 0, done=("b",))
    state_checkpoint(tmp_path, "train-c", "1", "c", 10)
    state_checkpoint(tmp_path, "train-d", "0", None, 0, done=("a",))  # no state of a: a finished model only
    (tmp_path / "attack-1").mkdir()
    assert forget_states(str(tmp_path), ["a", "b"]) == ["train-ab"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack-1", "train-c", "train-d"]
    assert forget_states(str(tmp_path), ["a"]) == []


def test_the_worker_reads_a_found_state_and_gives_up_on_a_gone_or_wrong_one(tmp_path):
    pytest.importorskip("ray.train")
    folder = state_checkpoint(tmp_path, "train-1", "1", "a", 20, workers=2)
    fs, _ = storage(str(tmp_path))
    point = read_found_state(str(folder), fs, "a", rank=1)
    assert point is not None and point.job == "a" and point.state.iteration == 20
    assert point.state.local["rng"] == random.Random(1).getstate()         # rank 1's own part
    assert torch.equal(point.state.shared["model"]["w"], torch.full((3,), 20.0))
    assert point.history == [{"step": 20, "loss": 1.0}]
    assert read_found_state(str(folder), fs, "b", rank=0) is None           # not that job's
    assert read_found_state(str(tmp_path / "gone"), fs, "a", rank=0) is None
