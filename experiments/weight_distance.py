"""How far protection moved each model: the distance of every protected model's weights from the normal model it
started from, and between protected models of one seed (a protection and its suppression-off control draw the same
batches, so their distance is what the suppression changed). Reads a sweep's checkpoints, not MLflow:
``python experiments/weight_distance.py SPEC [--out FOLDER]`` prints (and writes ``weights.md``) one table.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from analysis.summary import markdown_table
from sophon_ray.errors import SophonError, cli_exit


def weight_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(L2 distance between the floating-point tensors of two state dicts of one architecture, that distance
    relative to the L2 norm of ``a``); integer buffers (BatchNorm's counters) are left out."""
    if a.keys() != b.keys():
        raise ValueError(f"the two models differ in their tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    names = [k for k, v in a.items() if v.is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in names) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in names) ** 0.5
    return diff, diff / norm if norm else float("nan")


def distance_table(states: Mapping[str, Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """One row per pair: every ``protected/<variant>/s<seed>`` against ``normal``, then every two protected models of
    one seed against each other; columns ``model``, ``against``, ``l2``, ``relative`` (to ``against``'s norm)."""
    normal = states["normal"]
    protected = sorted(k for k in states if k != "normal")
    rows = [(k, "normal", *weight_distance(normal, states[k])) for k in protected]
    by_seed: dict[str, list[str]] = {}
    for k in protected:
        by_seed.setdefault(k.rsplit("/", 1)[-1], []).append(k)
    for models in by_seed.values():
        rows += [(b, a, *weight_distance(states[a], states[b])) for a, b in itertools.combinations(models, 2)]
    return pd.DataFrame(rows, columns=["model", "against", "l2", "relative"])


def sweep_states(spec_path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of a sweep's normal and protected models, read from its checkpoint store (the folders the
    sweep itself uses); a model not trained yet is an error that names it."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from sophon_ray.run.checkpoint import WEIGHTS  # noqa: PLC0415
    from sophon_ray.run.train_driver import model_jobs  # noqa: PLC0415
    from sophon_ray.run.validate import load_spec  # noqa: PLC0415

    spec = load_spec(spec_path)
    folders = {name: folder for name, (folder, _) in model_jobs(spec, spec.out / "checkpoints").items()}
    missing = [name for name, folder in folders.items() if not (folder / WEIGHTS).is_file()]
    if missing:
        raise SophonError(f"{spec_path}: no checkpoint for {', '.join(missing)} under {spec.out / 'checkpoints'}; "
                            f"run `sophon-ray run {spec_path}` (or its pretrain/protect stage) first")
    return {name: load_file(str(folder / WEIGHTS)) for name, folder in folders.items()}


def render(table: pd.DataFrame) -> str:
    return markdown_table(["model", "against", "L2 distance", "relative to its norm"],
                          [(r.model, r.against, f"{r.l2:.4g}", f"{r.relative:.3g}") for r in table.itertuples()],
                          text_columns=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the sweep spec whose checkpoints to compare")
    parser.add_argument("--out", default=None, help="folder to write weights.md into (default: print only)")
    args = parser.parse_args(argv)

    def command() -> int:
        text = render(distance_table(sweep_states(args.spec)))
        print(text)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "weights.md").write_text(text + "\n")
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
