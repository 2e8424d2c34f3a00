"""Crash-safe state files: a tree of dicts, lists, tuples, scalars and tensors as safetensors + JSON (never
pickled), for the protection's state checkpoints and the pretraining/protection job states."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sophon_ray.errors import SophonError


class CheckpointError(SophonError, ValueError):
    """A checkpoint that cannot be written or loaded; the message says what and how to fix it."""


@dataclass
class ProtectState:
    """Everything a resumable job needs to continue after ``iteration`` as if it had never stopped: a protection
    (:func:`sophon_ray.core.protection.protect`, ``iteration`` its iteration) or pretraining
    (:func:`sophon_ray.core.training.pretrain`, ``iteration`` its epoch).

    ``shared`` is the same on every data-parallel rank (a protection's: the weights, both Adam states (FTS and NTR),
    the rollback snapshot, the probed candidates, the rollback events, the evaluation history and the seconds spent
    so far; pretraining's: the weights, the optimizer, the curve, the seconds). ``local`` is the rank's own (its
    generators, the global torch RNG (and the CUDA one on a GPU), a protection's batch-stream positions). The tensors
    are the live ones: save them (:func:`sophon_ray.core.protection.save_state`) before the loop goes on.
    """

    iteration: int
    shared: dict[str, Any]
    local: dict[str, Any]


def save_tree(tree: Any, directory: str | Path, name: str) -> None:
    """Write a tree of dicts, lists, tuples, scalars and tensors as ``<name>.safetensors`` (every tensor, on the
    CPU) + ``<name>.json`` (the structure, tensors by reference): state that must survive a crash, never pickled.
    Dicts with non-string keys (optimizer states) and tuples (RNG states) come back as they were."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
            return {"__tensor__": key}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            return {"__items__": [[encode(k), encode(v)] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"cannot store a {type(value).__name__} in a state checkpoint ({name})")

    structure = encode(tree)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_tree(directory: str | Path, name: str) -> Any:
    """Read what :func:`save_tree` wrote (tensors on the CPU); CheckpointError when it is missing or corrupt."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / f"{name}.safetensors"), device="cpu")
        structure = json.loads((directory / f"{name}.json").read_text())
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory}: state '{name}' is missing or unreadable ({err}); delete the folder "
                              "to start over") from err

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            return {decode(k): decode(v) for k, v in value["__items__"]}
        return value

    return decode(structure)
