"""The efficacy experiment: pretrain once, protect every variant with several seeds, attack every
subject over the grid with several attack seeds, and write RESULTS.md. One machine, a process pool
(the Ray drivers distribute the same pieces on a cluster)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from sophon_ray.attack import SCRATCH_STRATEGY, AttackConfig, finetune, grid_configs, scratch_model
from sophon_ray.checkpoint import load_checkpoint, make_card, save_checkpoint
from sophon_ray.data import Splits, make_splits
from sophon_ray.metrics import Cell, below_chance, overhead, summarise
from sophon_ray.protection import protect
from sophon_ray.spec import SweepSpec, spec_hash, to_dict
from sophon_ray.training import evaluate, initial_model, pretrain

log = logging.getLogger(__name__)
# Stress cells: attacks the protection is expected to lose to (a delay, not a wall); measured, no target.
STRESS = (
    ("long (4x epochs)", {"epochs_scale": 4, "data_fraction": None}),
    ("all attacker data", {"epochs_scale": 1, "data_fraction": 1.0}),
)
STRESS_CELLS = dict(strategy=("direct-all", "initfc-all"), optimizer=("momentum", "adam"), lr=(1e-2,))


# ----------------------------------------------------------------------------------- worker processes
_SPLITS: Splits | None = None
_CHANNELS_LAST = True


def _init_worker(spec: SweepSpec) -> None:
    global _SPLITS, _CHANNELS_LAST
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    _SPLITS = make_splits(spec)
    _CHANNELS_LAST = spec.model.channels_last


def _protect_job(spec: SweepSpec, variant_index: int, seed: int, normal_dir: str, normal_acc: float,
                 out_dir: str) -> dict[str, Any]:
    variant = replace(spec.protect[variant_index], seed=seed)
    model, _ = load_checkpoint(normal_dir, channels_last=_CHANNELS_LAST)
    s = _SPLITS
    result = protect(model, s.original_train, s.original_val, s.restricted_train, s.restricted_val, variant,
                     normal_acc)
    test_acc = evaluate(result.model, s.original_test).accuracy
    metrics = {"original_val_acc": result.original_acc, "original_test_acc": test_acc,
               "probe_acc": result.probe_acc, "selected_iteration": result.selected_iteration}
    card = make_card(spec.model, spec.original, spec.restricted, spec_hash(variant), role="protected",
                     metrics=metrics, extra={"variant": variant.label, "protect": to_dict(variant)})
    save_checkpoint(result.model, card, out_dir)
    return {"variant": variant.label, "seed": seed, "dir": out_dir, **metrics, "seconds": result.seconds,
            "rollbacks": len(result.rollbacks), "stopped": result.stopped, "candidates": result.candidates,
            "iterations_run": result.iterations_run}


def _attack_job(subject: str, checkpoint: str, config: AttackConfig, scratch_seed: int) -> dict[str, Any]:
    model, card = load_checkpoint(checkpoint, channels_last=_CHANNELS_LAST)
    if subject == "scratch":
        model = scratch_model(model, scratch_seed)
    s = _SPLITS
    result = finetune(model, s.restricted_full[0], s.restricted_test[0], config, original_test=s.original_test)
    return {**config.as_params(), "curve": result.restricted_acc, "final": result.final, "best": result.best,
            "original_acc": result.original_acc, "seconds": result.seconds}


# ---------------------------------------------------------------------------------------- the driver
def stress_configs(spec: SweepSpec) -> list[tuple[str, AttackConfig]]:
    g = spec.attack.grid
    out = []
    for name, change in STRESS:
        for st, o, lr in itertools.product(*STRESS_CELLS.values()):
            out.append((name, AttackConfig(strategy=st, optimizer=o, lr=lr, batch_size=g.batch_size[0],
                                           epochs=g.epochs[0] * change["epochs_scale"],
                                           data_fraction=change["data_fraction"] or g.data_fraction[0],
                                           seed=g.seed[0], weight_decay=spec.attack.weight_decay)))
    return out


def run_efficacy(spec: SweepSpec, protect_seeds: list[int], out: Path, workers: int = 2) -> dict[str, Any]:
    """Run the whole experiment; return (and write to ``out/efficacy.json``) every row."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    splits = make_splits(spec)
    normal, needs_training = initial_model(spec)
    seconds = 0.0
    if needs_training:
        seconds = pretrain(normal, splits.original_train, splits.original_val, spec.pretrain, spec.seed).seconds
    normal_val = evaluate(normal, splits.original_val).accuracy
    normal_test = evaluate(normal, splits.original_test).accuracy
    normal_dir = str(out / "normal")
    save_checkpoint(normal, make_card(spec.model, spec.original, spec.restricted, spec_hash(spec.pretrain),
                                      role="normal", metrics={"original_val_acc": normal_val,
                                                              "original_test_acc": normal_test}), normal_dir)
    log.info("pretrain | val %.1f | test %.1f | %.1f s", normal_val, normal_test, seconds)
    report: dict[str, Any] = {"normal": {"val": normal_val, "test": normal_test, "seconds": seconds},
                              "protected": [], "attacks": [], "stress": []}
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,)) as pool:
        jobs = [pool.submit(_protect_job, spec, i, seed, normal_dir, normal_val, str(out / f"{v.label}-s{seed}"))
                for i, v in enumerate(spec.protect) for seed in protect_seeds]
        for job in jobs:
            row = job.result()
            report["protected"].append(row)
            log.info("protect %s seed %d | val %.1f | test %.1f | iteration %d | %.0f s", row["variant"], row["seed"],
                     row["original_val_acc"], row["original_test_acc"], row["selected_iteration"], row["seconds"])
        subjects = [("normal", "", -1, normal_dir)] + [("protected", r["variant"], r["seed"], r["dir"])
                                                         for r in report["protected"]]
        for section, configs in (("attacks", [("grid", c) for c in grid_configs(spec.attack.grid, spec.attack.weight_decay)]),
                                 ("stress", stress_configs(spec))):
            futures = []
            seen_scratch = set()
            for name, cfg in configs:
                for subject, variant, seed, ckpt in subjects:
                    futures.append(({"subject": subject, "variant": variant, "protect_seed": seed, "section": name},
                                    pool.submit(_attack_job, subject, ckpt, cfg, cfg.seed)))
                key = replace(cfg, strategy=SCRATCH_STRATEGY)
                if key not in seen_scratch:
                    seen_scratch.add(key)
                    futures.append(({"subject": "scratch", "variant": "", "protect_seed": -1, "section": name},
                                    pool.submit(_attack_job, "scratch", normal_dir, key, cfg.seed)))
            for meta, fut in futures:
                report[section].append({**meta, **fut.result()})
            log.info("%s | %d fine-tuning runs done | %.0f s", section, len(futures), time.perf_counter() - start)
    report["seconds"] = time.perf_counter() - start
    (out / "efficacy.json").write_text(json.dumps(report, indent=1))
    return report


# ------------------------------------------------------------------------------------------ RESULTS.md
CELL = ["strategy", "optimizer", "lr"]
SCRATCH_KEY = ["optimizer", "lr", "batch_size", "data_fraction", "schedule", "epochs", "seed"]


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd  # noqa: PLC0415

    df = pd.DataFrame(rows)
    scratch = df[df.subject == "scratch"].set_index(SCRATCH_KEY)
    df = df[df.subject != "scratch"].copy()
    idx = pd.MultiIndex.from_frame(df[SCRATCH_KEY])
    df["scratch"] = scratch["final"].reindex(idx).to_numpy()
    df["scratch_curve"] = scratch["curve"].reindex(idx).to_numpy()
    return df


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def cell_table(rows: list[dict[str, Any]], num_classes: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Markdown lines of the per-cell tables and the per-variant summaries (cells = seed means)."""
    df = _frame(rows)
    normal = df[df.subject == "normal"].groupby(CELL).agg(normal=("final", "mean"), scratch=("scratch", "mean"))
    lines, summaries = [], {}
    lines += ["### Precondition: normal vs scratch (mean over attack seeds)", "",
              "| strategy | optimizer | lr | normal | scratch | normal - scratch | meaningful |",
              "|---|---|---|---|---|---|---|"]
    for (st, opt, lr), r in normal.iterrows():
        lines.append(f"| {st} | {opt} | {lr:g} | {_fmt(r.normal)} | {_fmt(r.scratch)} | {_fmt(r.normal - r.scratch)} "
                     f"| {'yes' if r.normal > r.scratch + 5 else 'no'} |")
    n_meaningful = int((normal.normal > normal.scratch + 5).sum())
    lines += ["", f"Meaningful cells (normal > scratch + 5): **{n_meaningful} of {len(normal)}**.", ""]
    prot = df[df.subject == "protected"].copy()
    prot["overhead"] = [overhead(c, sc) for c, sc in zip(prot.curve, prot.scratch_curve)]
    for variant, group in prot.groupby("variant"):
        agg = group.groupby(CELL).agg(protected=("final", "mean"), low=("final", "min"), high=("final", "max"),
                                      overheads=("overhead", list))
        agg = agg.join(normal)
        lines += [f"### Variant `{variant}`: restricted accuracy after fine-tuning", "",
                  "protected = mean over protection seeds x attack seeds (range); overhead = protected epochs to "
                  "reach 0.9 x scratch's final / scratch's epochs, median over runs ('>=' censored: never reached).", "",
                  "| strategy | optimizer | lr | protected (range) | normal | scratch | overhead | held | meaningful |",
                  "|---|---|---|---|---|---|---|---|---|"]
        cells = []
        for (st, opt, lr), r in agg.iterrows():
            cell = Cell(r.protected, r.normal, r.scratch)
            cells.append(cell)
            ovs = sorted(r.overheads, key=lambda o: (o.value, o.censored))
            med = ovs[len(ovs) // 2]
            flag = " (below chance)" if below_chance(r.protected, num_classes) else ""
            lines.append(f"| {st} | {opt} | {lr:g} | {_fmt(r.protected)} ({_fmt(r.low)}-{_fmt(r.high)}){flag} | "
                         f"{_fmt(r.normal)} | {_fmt(r.scratch)} | {med} | {'yes' if cell.held else '**no**'} | "
                         f"{'yes' if cell.meaningful else 'no'} |")
        summaries[variant] = summarise(cells, num_classes)
        per_seed = []
        for seed, sg in group.groupby("protect_seed"):
            sc = sg.groupby(CELL).agg(protected=("final", "mean")).join(normal)
            per_seed.append((seed, summarise([Cell(r.protected, r.normal, r.scratch) for _, r in sc.iterrows()],
                                             num_classes)))
        summaries[variant]["per_seed"] = per_seed
        lines.append("")
    return lines, summaries


def summary_lines(summaries: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| variant | seeds | cells held (protected <= scratch + 1) | normal's own share | meaningful cells held | "
             "median normal - protected (meaningful) | min normal - protected | worst case | below chance |",
             "|---|---|---|---|---|---|---|---|---|"]
    def row(name: str, s: dict[str, Any]) -> str:
        return (f"| {name} | | {s['share_held']:.0%} | {s['normal_share_held']:.0%} | "
                f"{s['meaningful_share_held']:.0%} of {s['meaningful']} | {s['meaningful_median_gap']:.1f} | "
                f"{s['min_gap']:.1f} | {s['worst_case']:.1f} | {s['below_chance']} |")
    for variant, s in summaries.items():
        lines.append(row(f"**{variant}** (seed means)", s).replace("| |", "| all |", 1))
        for seed, ps in s["per_seed"]:
            lines.append(row(f"{variant} seed {seed}", ps).replace("| |", f"| {seed} |", 1))
    return lines


def stress_lines(rows: list[dict[str, Any]]) -> list[str]:
    df = _frame(rows)
    lines = ["| attack | strategy | optimizer | lr | epochs | data | subject | restricted acc (mean, range) |",
             "|---|---|---|---|---|---|---|---|"]
    keys = ["section", "strategy", "optimizer", "lr", "epochs", "data_fraction"]
    for key, group in df.groupby(keys, sort=False):
        scratch = group.scratch.mean()
        for label, g in group.groupby(["subject", "variant"]):
            name = label[0] if label[0] == "normal" else f"protected `{label[1]}`"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {key[4]} | {key[5]:g} | {name} | "
                         f"{_fmt(g.final.mean())} ({_fmt(g.final.min())}-{_fmt(g.final.max())}) |")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {key[4]} | {key[5]:g} | scratch | {_fmt(scratch)} |")
    return lines


def write_results(report: dict[str, Any], spec: SweepSpec, command: str, path: Path) -> None:
    """Write RESULTS.md from an efficacy report."""
    classes = spec.model.num_classes
    cells, summaries = cell_table(report["attacks"], classes)
    g = spec.attack.grid
    normal = report["normal"]
    lines = [
        "# Results: SOPHON efficacy on the offline pair", "",
        f"Produced by `{command}` in {report['seconds'] / 60:.1f} min on 2 CPU cores "
        f"({time.strftime('%Y-%m-%d')}). Raw rows: `{spec.out}/efficacy.json`.", "",
        f"- Original domain `{spec.original.dataset}`, restricted domain `{spec.restricted[0].dataset}`, "
        f"{spec.original.image_size}x{spec.original.image_size}x{spec.original.channels}, model `{spec.model.arch}`.",
        f"- Attacker: {', '.join(g.strategy)} x {', '.join(g.optimizer)} x lr {', '.join(f'{x:g}' for x in g.lr)}; "
        f"batch {g.batch_size[0]}, {g.epochs[0]} epochs, data fraction {g.data_fraction[0]:g} of the restricted "
        f"training split, attack seeds {list(g.seed)}; "
        f"protection seeds {sorted({r['seed'] for r in report['protected']})}.",
        "- Scratch = random init of the same architecture trained on all parameters with the cell's optimizer, lr, "
        "batch size, data and epochs, whatever the cell's strategy (see README, Metrics).", "",
        "## Summary", "", *summary_lines(summaries), "",
        "## Original-domain accuracy (intactness)", "",
        "Checkpoint chosen on original-domain *validation* accuracy among probed states within `select_drop` "
        "of the normal model (README, Protection); test accuracy reported.", "",
        "| model | seed | val acc | test acc | drop vs normal (test) | selected iteration | rollbacks | protect time |",
        "|---|---|---|---|---|---|---|---|",
        f"| normal | {spec.seed} | {normal['val']:.1f} | {normal['test']:.1f} | - | - | - | {normal['seconds']:.0f} s |",
    ]
    for r in report["protected"]:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['original_val_acc']:.1f} | {r['original_test_acc']:.1f} | "
                     f"{normal['test'] - r['original_test_acc']:.1f} | {r['selected_iteration']} | {r['rollbacks']} | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", "## Per-cell results", "", *cells,
              "## Stress: attacks expected to break the protection (no target)", "", *stress_lines(report["stress"]), ""]
    path.write_text("\n".join(lines))
