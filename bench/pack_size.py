"""``attack.pack: auto`` on the CPU, checked: its pack size against every pack size, over image sizes and batches.

For each shape (``--shapes``: image size x batch size) this runs bench/packed.py's measurement (grouped packs of N
members vs the same N configs as sequential ``finetune`` calls, 1 thread, paired rounds) at every N of
``--members`` up to the larger of 16 and twice auto's pick, and reports per shape: the measured speed-up of each
N, the best N, auto's N (:func:`sophon_ray.run.packing.cpu_pack_size` of the shape's batch and the model's widest
activation) and its speed-up, and the speed-up of the former constant (8 members whatever the shape). The goal: a
pack of auto's size runs within 10 % of the best measured size's speed-up (auto's N of 1 means "do not pack": its
speed-up is 1 by definition).

Usage: ``.venv/bin/python bench/pack_size.py`` (about 25 minutes on 2 quiet cores); ``--smoke`` for a minute.
Writes ``bench/results/pack_size.md`` and ``.json`` (``--out``). Numbers measured while other work shares the cores
are indicative only (each shape records its load average before and after).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import packed  # noqa: E402

from sophon_ray.core.packed import footprint  # noqa: E402
from sophon_ray.modes import build_model  # noqa: E402
from sophon_ray.run.packing import (CPU_PACK_BYTES, CPU_PACK_CAP, CPU_PACK_FLOOR, CPU_PACK_LIMIT_BYTES,  # noqa: E402
                                    cpu_pack_size)
from sophon_ray.spec import ModelSpec  # noqa: E402

NAME = "pack_size"
FORMER_CONSTANT = 8
NEAR_BEST = 0.9
# held out: the rule's constants were chosen on FIT_SHAPES (bench/results/pack_size/fit-*.json, NOTES.md)
SHAPES = ["12x48", "12x128", "24x16", "24x48", "16x96", "32x128"]
FIT_SHAPES = ["8x32", "8x128", "16x16", "16x32", "16x64", "16x128", "32x16", "32x32", "32x64"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="IMAGE_SIZExBATCH_SIZE")
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--arch", default="convnet")
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / f"{NAME}.md"))
    parser.add_argument("--rows", help="measure nothing: the section of an earlier run's JSON (its measured "
                        "speed-ups) with auto's N of the current rule")
    parser.add_argument("--smoke", action="store_true", help="two small shapes, tiny sizes: checks the script only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.members, args.train_size, args.test_size, args.rounds = ["8x16", "16x64"], [2, 4], 64, 40, 1
    return args


def shape(text: str) -> tuple[int, int]:
    """``'16x32'`` -> (16, 32); SystemExit naming the flag for anything else."""
    try:
        image, batch = (int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not IMAGE_SIZExBATCH_SIZE (e.g. 16x32)") from None
    return image, batch


def measure(args: argparse.Namespace, image: int, batch: int) -> dict:
    """bench/packed.py at one shape: auto's pick, then the speed-up of every N measured."""
    widest = footprint(build_model(ModelSpec(args.arch, 10), 3, image), 3, image).widest
    auto = cpu_pack_size(batch, widest)
    members = sorted({n for n in args.members if n <= max(16, 2 * auto)} | ({auto} if auto > 1 else set()))
    harness.say(f"{image} px, batch {batch}: widest activation {widest} values, auto {auto}; N = {members}")
    run = packed.main(["--members", *map(str, members), "--formulations", "grouped", "--arch", args.arch,
                       "--image-size", str(image), "--batch-size", str(batch), "--train-size", str(args.train_size),
                       "--test-size", str(args.test_size), "--epochs", str(args.epochs), "--rounds", str(args.rounds)])
    speedups = {row["members"]: row["speedup_vs_sequential"]["grouped"] for row in run["results"]}
    return {"image_size": image, "batch_size": batch, "widest": widest, "auto": auto, "speedups": speedups,
            "load_before": run["load_before"], "load_after": run["load_after"]}


def speedup_at(row: dict, n: int) -> float | None:
    """The measured speed-up of a pack of ``n`` (1: not packing, 1 by definition; None: not measured)."""
    return 1.0 if n <= 1 else row["speedups"].get(n)


def section(args: argparse.Namespace, rows: list[dict]) -> harness.Section:
    measured = (f"bench/packed.py's measurement per shape ({args.arch}, grouped packs vs sequential `finetune` "
                f"calls, momentum, {args.train_size} training / {args.test_size} test images, {args.epochs} epochs, 1 "
                f"thread, {args.rounds} paired rounds after a warm-up)")
    if args.rows:
        measured = f"Re-read from `{args.rows}` ({json.loads(Path(args.rows).read_text())['setup'].split('; auto')[0]})"
    rule = (f"auto's N is `cpu_pack_size`: members x batch x widest activation x 4 B within "
            f"{CPU_PACK_BYTES // 2**20} MiB, at least {CPU_PACK_FLOOR} while within {CPU_PACK_LIMIT_BYTES // 2**20} "
            f"MiB, at most {CPU_PACK_CAP}; its constants were chosen on the shapes {', '.join(FIT_SHAPES)} "
            "(bench/NOTES.md)")
    sec = harness.Section(NAME, "Pack size: `attack.pack: auto` on the CPU against every pack size",
                          f"{measured}; {rule}." + (" **SMOKE sizes: the numbers check the script only.**"
                                                    if args.smoke else ""))
    columns = sorted({n for row in rows for n in row["speedups"]})
    table = harness.Table("speed-up of a pack over its members' sequential calls (median of paired rounds)",
                          ["image px", "batch", "widest values", *[f"N={n}" for n in columns], "best N",
                           "auto N", "auto", f"N={FORMER_CONSTANT} (former)", "load before/after"])
    near = []
    for row in rows:
        best = max(row["speedups"], key=row["speedups"].get)
        best_speedup = max(1.0, row["speedups"][best])
        auto = speedup_at(row, row["auto"])
        near.append(auto is not None and auto >= NEAR_BEST * best_speedup)
        former = speedup_at(row, FORMER_CONSTANT)
        table.rows.append([str(row["image_size"]), str(row["batch_size"]), str(row["widest"]),
                           *[f"{row['speedups'][n]:.2f}" if n in row["speedups"] else "-" for n in columns],
                           str(best) if row["speedups"][best] > 1 else f"1 ({best}: {row['speedups'][best]:.2f})",
                           str(row["auto"]), "-" if auto is None else f"{auto:.2f}",
                           "-" if former is None else f"{former:.2f}",
                           f"{row['load_before']} / {row['load_after']}"])
    sec.goal(f"shapes where auto's pack runs within {NEAR_BEST:.0%} of the best measured size's speed-up",
             "all", f"{sum(near)} of {len(rows)}", None if args.smoke else all(near),
             "noise of short single-thread runs; the cache budget is one number for every layer")
    sec.tables.append(table)
    sec.notes.append("N=1 is not measured: a pack of one is slower than `finetune` (bench/packed.py), so auto's 1 "
                     "means the trials run alone, at speed-up 1 by definition; `best N` counts only measured packs "
                     "faster than their members alone.")
    sec.data = {"rows": rows}
    return sec


def recorded(path: str) -> list[dict]:
    """The rows of an earlier run's JSON, auto's N recomputed with the current rule (speed-ups keyed by N)."""
    rows = json.loads(Path(path).read_text())["data"]["rows"]
    return [{**row, "speedups": {int(n): v for n, v in row["speedups"].items()},
             "auto": cpu_pack_size(row["batch_size"], row["widest"])} for row in rows]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = recorded(args.rows) if args.rows else [measure(args, *shape(s)) for s in args.shapes]
    md, _ = section(args, rows).write(Path(args.out))
    harness.say(f"wrote {md}")


if __name__ == "__main__":
    main()
