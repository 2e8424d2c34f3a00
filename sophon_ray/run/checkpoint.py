"""Checkpoints: ``model.safetensors`` (weights, never pickled) + ``model.json`` (the card: architecture,
classes, input size, normalisation, the original and restricted domain specs, spec hash, metrics).

Loading rebuilds the model from the card and checks every tensor name and shape against it, so a
mismatched card is refused with the exact differences. Writes are atomic (a temp dir renamed into place),
and a checkpoint holding NaN/inf is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sophon_ray.core.state import CheckpointError
from sophon_ray.modes import build_model
from sophon_ray.spec import DomainSpec, ModelSpec, SweepSpec, to_dict

FORMAT = "sophon-ray/1"
WEIGHTS, CARD = "model.safetensors", "model.json"


def make_card(model: ModelSpec, original: DomainSpec, restricted: tuple[DomainSpec, ...] | list[DomainSpec],
              spec_hash: str, role: str, metrics: dict[str, float] | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON card for a model trained on ``original`` (and protected against ``restricted``)."""
    return {
        "format": FORMAT,
        "role": role,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "channels": original.channels,
        "image_size": original.image_size,
        "normalisation": {"mean": list(original.mean), "std": list(original.std)},
        "original": to_dict(original),
        "restricted": [to_dict(d) for d in restricted],
        "spec_hash": spec_hash,
        "metrics": dict(metrics or {}),
        **(extra or {}),
    }


def save_checkpoint(model: torch.nn.Module, card: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model`` and ``card`` to ``directory`` atomically; raise CheckpointError on NaN/inf weights."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save {directory}: non-finite values in {', '.join(bad[:5])}")
    card = {**card, "tensors": {k: list(v.shape) for k, v in state.items()}}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_card(directory: str | Path) -> dict[str, Any]:
    """The card of a checkpoint directory; CheckpointError when it is missing or not a sophon-ray card."""
    directory = Path(directory)
    path = directory / CARD
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise CheckpointError(f"{directory}: not a sophon-ray checkpoint (expected {CARD} + {WEIGHTS}, found "
                              f"{found or 'nothing'}). Pickled files (.pt/.pth/.pkl) are never loaded: export "
                              "weights with sophon_ray.save_checkpoint")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: card is not valid JSON ({err})") from err
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"{path}: card format is {card.get('format') if isinstance(card, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return card


def check_fits(card: dict[str, Any], model: ModelSpec, original: DomainSpec, source: str) -> None:
    """Raise CheckpointError when the card's architecture, classes or input differ from the spec's."""
    want = (model.arch, model.num_classes, original.channels, original.image_size)
    got = (card["arch"], card["num_classes"], card["channels"], card["image_size"])
    if want != got:
        raise CheckpointError(f"{source}: the card says (arch, classes, channels, size) = {got} but the spec asks "
                              f"for {want}; use a spec whose model and original domain match the card, or "
                              "another checkpoint")


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu",
                    channels_last: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from the card, load the safetensors weights, and check names and shapes.

    ``channels_last`` is how to run it (see ``ModelSpec.channels_last``); files always hold contiguous tensors.

    Raises CheckpointError when the card and the weights disagree or the weights file is corrupt.
    """
    directory = Path(directory)
    card = read_card(directory)
    try:
        spec = ModelSpec(arch=card["arch"], num_classes=int(card["num_classes"]), channels_last=channels_last)
        model = build_model(spec, channels=int(card["channels"]), image_size=int(card["image_size"]))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{directory / CARD}: cannot build the model it describes ({err})") from err
    try:
        state = load_file(str(directory / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{directory / WEIGHTS}: not a readable safetensors file ({err}); re-export it") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k}: weights {got[k]} vs card {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if problems:
        raise CheckpointError(f"{directory}: weights do not match the card ({card['arch']}, "
                              f"{card['num_classes']} classes, {card['channels']}x{card['image_size']}px): "
                              + "; ".join(problems[:8]))
    model.load_state_dict(state)
    return model.to(device), card


def initial_model(spec: SweepSpec) -> tuple[Any, bool]:
    """The model pretraining starts from, and whether it still needs pretraining.

    ``pretrain.weights``: None -> a seeded random init (train it); ``torchvision`` -> the published
    ImageNet weights in the body (train it on the original domain); a sophon-ray checkpoint directory ->
    that model as the normal model (no training; its card must match the spec's model and input).
    """
    weights = spec.pretrain.weights
    if weights and weights != "torchvision":
        model, card = load_checkpoint(weights, channels_last=spec.model.channels_last)
        check_fits(card, spec.model, spec.original, f"pretrain.weights {weights}")
        return model, False
    torch.manual_seed(spec.seed)
    return build_model(spec.model, spec.original.channels, spec.original.image_size, weights=weights), True
