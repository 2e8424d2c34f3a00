"""How far one attack trial's curve moves on another float32 path, with and without packing.

A small convnet is pretrained on shapes (16 px), then fine-tuned on shapes_m for ``--epochs`` epochs with each
recipe (optimizer, lr) as one ``finetune`` trial at 1 thread with channels-last weights (the reference), and the
same trial (same seed, data order and config) on three other float paths: 2 torch threads, contiguous weights, and
as member 0 of a ``finetune_pack`` of 4 (the others: another seed, half and double the lr). Per recipe and path:
the largest absolute difference of the ``restricted_loss`` curve from the reference's and the first epoch where it
exceeds 1e-4 (the packing tests' bound; null: never). Training amplifies float32 rounding: where another thread
count moves a trial as far as packing does, packing's departure is rounding, not a different computation.

Usage: ``.venv/bin/python bench/float_paths.py`` (about 25 s on 2 quiet cores); ``--smoke`` for a few seconds.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence

import torch

from sophon_ray.core.attack import finetune
from sophon_ray.core.data import load_domain
from sophon_ray.core.packed import finetune_pack
from sophon_ray.core.training import pretrain
from sophon_ray.modes.classification.models import convnet
from sophon_ray.modes.classification.task import CLASSIFICATION
from sophon_ray.recipes import AttackConfig
from sophon_ray.spec import DomainSpec, PretrainSpec

RECIPES = [("sgd", 1e-3), ("momentum", 1e-2), ("adam", 1e-3), ("adam", 1e-2)]
TOLERANCE = 1e-4


def departure(reference: Sequence[float], other: Sequence[float]) -> dict:
    """The largest absolute difference and the first epoch beyond :data:`TOLERANCE` (None: never)."""
    gaps = [abs(a - b) for a, b in zip(reference, other)]
    return {"max_abs": round(max(gaps), 6), "first_epoch_over": next((i for i, g in enumerate(gaps) if g > TOLERANCE),
                                                                      None)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="2 epochs, small data: checks the script only")
    args = parser.parse_args(argv)
    sizes = (200, 100, 100) if args.smoke else (1000, 400, 400)
    epochs = 2 if args.smoke else args.epochs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = convnet(10, 3, 16)
    pre_train, pre_val = load_domain(DomainSpec("shapes", 16, train_size=sizes[0], test_size=200, seed=1))
    pretrain(model, pre_train, pre_val, PretrainSpec(epochs=3, lr=3e-3, batch_size=64), task=CLASSIFICATION)
    train, test = load_domain(DomainSpec("shapes_m", 16, train_size=sizes[1], test_size=sizes[2], seed=3))
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rows = {}
    for optimizer, lr in RECIPES:
        configs = [AttackConfig(optimizer=optimizer, lr=lr * f, epochs=epochs, batch_size=32, seed=s)
                   for s, f in [(0, 1.0), (1, 1.0), (0, 0.5), (1, 2.0)]]
        reference = finetune(nhwc, train, test, configs[0], task=CLASSIFICATION).restricted_loss
        torch.set_num_threads(2)
        two_threads = finetune(nhwc, train, test, configs[0], task=CLASSIFICATION).restricted_loss
        torch.set_num_threads(1)
        contiguous = finetune(model, train, test, configs[0], task=CLASSIFICATION).restricted_loss
        packed = finetune_pack(nhwc, train, test, configs, task=CLASSIFICATION)[0].restricted_loss
        rows[f"{optimizer} {lr:g}"] = {"2 threads": departure(reference, two_threads),
                                      "contiguous weights": departure(reference, contiguous),
                                      "packed (member 0 of 4)": departure(reference, packed)}
    payload = {"name": "float_paths", "smoke": args.smoke, "epochs": epochs, "torch": torch.__version__,
               "tolerance": TOLERANCE, "recipes": rows}
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
