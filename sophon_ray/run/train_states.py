"""Protection and pretraining state checkpoints across Ray Train runs: the newest whole state of each job in any run
under the storage path (:func:`find_states`, what ``--resume`` continues a job from when its group of jobs, and so
its run's name, changed) and the deletion of the runs that hold a state of jobs that start over
(:func:`forget_states`). Local paths and pyarrow URIs (s3://, gs://) alike (:func:`storage`)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sophon_ray.run.train_worker import MANIFEST, RESUME

log = logging.getLogger(__name__)


def storage(storage_path: str) -> tuple[Any, str]:
    """The pyarrow filesystem of ``storage_path`` (local or a pyarrow URI such as s3://) and its root there."""
    import pyarrow.fs  # noqa: PLC0415

    if "://" in storage_path:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        return fs, root.rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).resolve())


def forget_run(storage_path: str, name: str) -> bool:
    """Delete the folder of Ray Train run ``name`` under ``storage_path`` (local or a pyarrow URI such as s3://);
    whether there was one."""
    import pyarrow.fs  # noqa: PLC0415

    fs, root = storage(storage_path)
    path = f"{root}/{name}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return False
    fs.delete_dir(path)
    return True


@dataclass(frozen=True)
class FoundState:
    """A state checkpoint of one job in some Ray Train run: its folder (a path on the storage's filesystem, the
    folder that holds ``resume/``), the job's key and the state's iteration (a pretraining's: its epoch)."""

    path: str
    key: str
    iteration: int

    @property
    def run(self) -> str:
        """The name of the Ray Train run it is in (``<storage>/<run>/<checkpoint>``)."""
        return self.path.rstrip("/").rsplit("/", 2)[-2]


def find_states(storage_path: str, keys: list[str], workers: int, skip_run: str = "") -> dict[str, FoundState]:
    """The newest whole state checkpoint of each job in ``keys`` among every Ray Train run (``train-*``) under
    ``storage_path`` but ``skip_run``, whatever group of jobs that run had: job key -> :class:`FoundState`. Newest is
    the highest iteration its resume manifest records (not the newest file: a restarted job rewrites older
    iterations). A checkpoint without a readable manifest, or whose state files are not whole for exactly ``workers``
    ranks (torn by a crash mid-upload, or written by another number of workers), is skipped, and the next newest is
    taken."""
    fs, root = storage(storage_path)
    found: dict[str, FoundState] = {}
    for state in sorted(_state_checkpoints(fs, root, set(keys)), key=lambda f: (-f.iteration, f.path)):
        if state.key in found or state.run == skip_run:
            continue
        if whole_state(fs, f"{state.path}/{RESUME}", workers):
            found[state.key] = state
        else:
            log.warning("state checkpoint %s (iteration %d) is not whole for %d worker(s): skipped", state.path,
                        state.iteration, workers)
    return found


def forget_states(storage_path: str, keys: list[str]) -> list[str]:
    """Delete every Ray Train run (``train-*``) under ``storage_path`` that holds a state checkpoint of one of
    ``keys`` (a run without ``--resume`` starts these jobs over: no later ``--resume`` may continue one from a state
    older than this start, made perhaps by other code). A run holds only the jobs of its group, so a run of jobs
    outside ``keys`` stays. Returns the names of the runs deleted."""
    fs, root = storage(storage_path)
    runs = sorted({state.run for state in _state_checkpoints(fs, root, set(keys))})
    for name in runs:
        forget_run(storage_path, name)
        log.info("Ray Train run %s: deleted, it held a state of a job that starts over (a run without --resume)",
                 name)
    return runs


def _state_checkpoints(fs: Any, root: str, keys: set[str]) -> list[FoundState]:
    """Every checkpoint of a ``train-*`` run under ``root`` whose resume manifest names a job in ``keys`` and the
    iteration of its state; checkpoints without a readable manifest (torn, or a finished job's) are left out."""
    out = []
    for run in _folders(fs, root, "train-"):
        for checkpoint in _folders(fs, run, "checkpoint_"):
            try:
                with fs.open_input_stream(f"{checkpoint}/{RESUME}/{MANIFEST}") as f:
                    manifest = json.loads(f.read())
            except (OSError, ValueError):  # none, or torn: a crash during its upload
                continue
            key, iteration = manifest.get("job"), manifest.get("iteration")
            if key in keys and isinstance(iteration, int):
                out.append(FoundState(checkpoint, key, iteration))
    return out


def _folders(fs: Any, parent: str, prefix: str) -> list[str]:
    """The folders in ``parent`` whose name starts with ``prefix`` (none when ``parent`` is missing)."""
    import pyarrow.fs  # noqa: PLC0415

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix))


def whole_state(fs: Any, folder: str, workers: int) -> bool:
    """Whether ``folder`` (a checkpoint's ``resume/``) holds a whole protection/pretraining state for exactly
    ``workers`` ranks: the shared part and each rank's local part, every JSON file readable and every safetensors
    file as long as its header says (a crash mid-upload leaves a short file or none)."""
    import pyarrow.fs  # noqa: PLC0415

    from sophon_ray.core.protection import LOCAL, SHARED  # noqa: PLC0415

    rank_file = re.compile(re.escape(LOCAL).replace(re.escape("{rank}"), r"(\d+)") + r"\.(json|safetensors)")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder))
    except OSError:
        return False
    files = {i.base_name: i for i in infos if i.type == pyarrow.fs.FileType.File}
    ranks = {int(m.group(1)) for name in files if (m := rank_file.fullmatch(name))}
    parts = [SHARED] + [LOCAL.format(rank=r) for r in range(workers)]
    if ranks != set(range(workers)):
        return False
    return all(f"{p}.json" in files and f"{p}.safetensors" in files and _readable_json(fs, files[f"{p}.json"].path)
               and _whole_safetensors(fs, files[f"{p}.safetensors"].path, files[f"{p}.safetensors"].size)
               for p in parts)


def _readable_json(fs: Any, path: str) -> bool:
    try:
        with fs.open_input_stream(path) as f:
            json.loads(f.read())
    except (OSError, ValueError):
        return False
    return True


def _whole_safetensors(fs: Any, path: str, size: int) -> bool:
    """Whether the safetensors file at ``path`` is ``size`` bytes long, as its header says (8 bytes of header length,
    the JSON header, then the tensors' bytes up to the largest end offset)."""
    try:
        with fs.open_input_stream(path) as f:
            length = int.from_bytes(f.read(8), "little")
            if len(header_bytes := f.read(length)) != length:
                return False
        header = json.loads(header_bytes)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return size == 8 + length + end
