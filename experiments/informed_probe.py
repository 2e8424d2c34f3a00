"""A first probe of the defence-aware attacks (issue 21) on a finished sweep's own checkpoints, before they enter
the sweeps' evaluation grids: one recipe (SGD-momentum, lr 1e-2, cosine, 20 epochs, 10% of the attacker's pool,
direct-all) plain and with each family, on the protected, normal and scratch models, 2 attack seeds, restricted
test accuracy (final epoch). Not the reporting protocol (one protection seed, one recipe, the test split read):
it says where to look, RESULTS.md's protocol says what holds.

    .venv/bin/sophon-ray run sweeps/quickstart.yaml          # makes runs/quickstart/checkpoints
    .venv/bin/python experiments/informed_probe.py sweeps/quickstart.yaml
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

FAMILIES = [("plain", {}), ("shrink 0.4", {"shrink": 0.4}), ("rescale 4", {"rescale": 4.0}),
            ("temperature 4", {"temperature": 4.0}), ("shrink 0.5 + perturb 0.01", {"shrink": 0.5, "perturb": 0.01}),
            ("adapt entropy 2", {"adapt": "entropy", "adapt_epochs": 2}),
            ("adapt pseudo-label 2", {"adapt": "pseudo-label", "adapt_epochs": 2}),
            ("warm original 1", {"warm_start": "original"})]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the sweep whose checkpoints to probe (run it first)")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from sophon_ray import finetune, load_checkpoint, load_spec, scratch_model, task_for
    from sophon_ray.core.data import make_splits
    from sophon_ray.recipes import AttackConfig

    torch.set_num_threads(1)
    spec = load_spec(args.spec)
    task, splits = task_for(spec), make_splits(spec)
    store = Path(spec.out) / "checkpoints"
    normal, _ = load_checkpoint(next(store.glob("pretrain-normal-*")))
    protected, _ = load_checkpoint(next(store.glob("protect-*")))
    base = AttackConfig(strategy="direct-all", optimizer="momentum", lr=1e-2, schedule="cosine", epochs=20,
                        data_fraction=0.1, batch_size=32)
    print("| family | protected | normal | scratch | recovered |\n|---|---|---|---|---|")
    plain_scratch = None
    for name, extra in FAMILIES:
        scores: dict[str, list[float]] = {"protected": [], "normal": [], "scratch": []}
        for seed in range(args.seeds):
            config = replace(base, seed=seed, **extra)
            for who, model in (("protected", protected), ("normal", normal), ("scratch", scratch_model(normal, seed))):
                scores[who].append(finetune(model, splits.restricted_attacker[0], splits.restricted_test[0], config,
                                            task=task, warm=splits.original_train).final)
        mean = {who: sum(v) / len(v) for who, v in scores.items()}
        plain_scratch = mean["scratch"] if plain_scratch is None else plain_scratch
        # share of the plain scratch -> this family's normal gap the family recovers on the protected model
        recovered = (mean["protected"] - plain_scratch) / max(1e-9, mean["normal"] - plain_scratch)
        print(f"| {name} | {mean['protected']:.1f} | {mean['normal']:.1f} | {mean['scratch']:.1f} | "
              f"{recovered:.0%} |", flush=True)


if __name__ == "__main__":
    main()
