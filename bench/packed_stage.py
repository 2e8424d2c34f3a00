"""A sweep's attack stage packed vs unpacked: ``sophon-ray run SPEC`` at ``attack.pack`` 1 and ``auto``, paired.

One untimed first run (``attack.pack: 1``) trains the sweep's models; then every round runs the whole sweep once
per contender, in rotating order, each in a fresh output directory and a fresh SQLite MLflow store (so every grid
trial runs again) that shares the first run's ``checkpoints/`` (so no model is trained again: the attack stage is
the only stage with work). Per run: the pipeline's own stage timers (its ``done in`` line), the trials it ran,
and the peak RSS / USS of the Tune trial processes (``ImplicitFunc``) and of the driver, sampled with psutil.

Usage (full, ~12 min on 2 quiet cores for the quickstart: a 3.5-minute first run, then 2 rounds of 2 runs of about
1.5 min): ``.venv/bin/python bench/packed_stage.py``; smoke (tiny protection and grid): ``--smoke``; another sweep:
``--spec sweeps/X.yaml --set KEY=VALUE ...``; ``--checkpoints OUT/checkpoints`` reuses an earlier run's models in
the first run (then it trains nothing either, and is a warm-up). ``--time-first`` counts the first run's attack stage
(which starts after its models are trained) as the first contender's first round, for sweeps too long to run three
times: the efficacy sweep is ``--spec sweeps/efficacy.yaml --rounds 1 --time-first`` (about 85 min here: training,
then the unpacked and the packed attack stage once each).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import memory

NAME = "packed_stage"
STAGE_GOAL_S = 25.0    # issue 24: the quickstart's attack stage with packs
RATIO_GOAL = 0.5       # issue 24: the packed attack stage <= 0.5x (here: of the unpacked stage, see the notes)
DONE = re.compile(r"done in (?P<total>[\d.]+) s \((?P<stages>[^)]*)\); (?P<trials>\d+) trials, (?P<run>\d+) run now")
STAGE = re.compile(r"(?P<name>[\w+]+) (?P<seconds>[\d.]+) s")
PACKED = re.compile(r"packed: (?P<members>\d+) trials in (?P<packs>\d+) Tune trials, (?P<alone>\d+) alone")
SMOKE_SETS = ["protect.0.iterations=4", "protect.0.inner_steps=2", "protect.0.ntr_steps=1", "protect.0.probe_every=4",
              "protect.0.probe_epochs=1", "pretrain.epochs=1", "original.train_size=500", "original.test_size=200",
              "restricted.0.train_size=300", "restricted.0.test_size=200", "attack.evaluation.strategy=[direct-all]",
              "attack.evaluation.optimizer=[adam]", "attack.evaluation.lr=[0.001,0.01]",
              "attack.evaluation.seed=[0,1]", "attack.evaluation.epochs=[1]"]


def parse_args(argv: list[str] | None = None) -> Any:
    """The common flags plus the sweep, its overrides, the contenders and the rounds."""
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(harness.REPO / "sweeps" / "quickstart.yaml"), help="the sweep")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="a spec override (repeatable)")
    parser.add_argument("--packs", default="1,auto", help="the attack.pack values compared (default 1,auto)")
    parser.add_argument("--rounds", type=int, help="measured rounds (default 2, smoke 1)")
    parser.add_argument("--checkpoints", help="an earlier run's checkpoints/ folder of the same sweep: the first run "
                        "reuses its models instead of training them (models of other settings are trained)")
    parser.add_argument("--time-first", action="store_true", help="count the first run (at the first --packs value) "
                        "as that contender's first round; the other contenders then run --rounds times, after it")
    args = parser.parse_args(argv)
    args.packs = args.packs.split(",")
    args.spec = str(Path(args.spec).resolve())   # the runs' working directory is a temporary one
    args.sets = (SMOKE_SETS if args.smoke else []) + args.sets
    return args


@dataclass
class Run:
    """One ``sophon-ray run``: its exit status, the pipeline's timers, the packing line, peak memory."""

    pack: str
    rc: int
    wall: float
    stages: dict[str, float] = field(default_factory=dict)
    total: float = float("nan")
    trials_run: int = 0
    tune_trials: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def attack(self) -> float:
        return self.stages.get("attack", float("nan"))


def environment(work: Path) -> dict[str, str]:
    """A run's environment: its own Ray temp dir, no telemetry, no caller's MLflow or Ray address."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(work / "ray"), RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    (work / "ray").mkdir(parents=True, exist_ok=True)
    return env


def run_sweep(args: Any, work: Path, label: str, pack: str) -> Run:
    """``sophon-ray run`` of the sweep at ``attack.pack`` = ``pack`` in ``work/label`` (output dir, SQLite store),
    its ``checkpoints`` the first run's; the log kept beside it."""
    out = work / label
    out.mkdir()
    base = work / "first" / "checkpoints"
    if label == "first" and args.checkpoints:
        base = Path(args.checkpoints).resolve()
    if base.is_dir():
        (out / "checkpoints").symlink_to(base)
    sets = [*args.sets, f"attack.pack={pack}", f"output_dir={out}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "sophon_ray.cli", "run", args.spec, *[a for s in sets for a in ("--set", s)]]
    with memory.RssSampler("ImplicitFunc") as trials, memory.RssSampler("sophon_ray.cli") as driver:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=environment(work), capture_output=True, text=True)
        wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (work / f"{label}.log").write_text(log)
    run = Run(pack, proc.returncode, wall, memory={"trial": trials.peak.as_dict()["worker_rss_mib"],
                                                   "trial_uss": trials.peak.as_dict()["worker_uss_mib"],
                                                   "driver": driver.peak.as_dict()["worker_rss_mib"]})
    if proc.returncode != 0:
        raise SystemExit(f"{label}: sophon-ray run exited {proc.returncode}; the log's end:\n{log[-3000:]}")
    if found := DONE.search(log):
        run.stages = {m["name"]: float(m["seconds"]) for m in STAGE.finditer(found["stages"])}
        run.total, run.trials_run = float(found["total"]), int(found["run"])
    packed = PACKED.search(log)
    run.tune_trials = int(packed["packs"]) + int(packed["alone"]) if packed else run.trials_run
    return run


# ------------------------------------------------------------------------------------------ reporting
NOTES = [
    "Every run after the first reuses the first run's models (its `checkpoints/`, keyed by the pretrain and "
    "protection settings, which `attack.pack` is not part of) and has a fresh MLflow store, so it runs the whole "
    "grid again and trains nothing: `pretrain+protect` is the models' loading. The attack stage is the pipeline's "
    "own timer: Ray start, loading models and data, planning packs, every Tune trial and every MLflow write "
    "(through the outbox) until the grid is done.",
    "The issue's goal is the packed stage <= 0.5x a sequential loop; this section compares the packed stage with "
    "the unpacked one (the pipeline's own stage, every cost in, at the sweep's trials), the Tune throughput section compares "
    "packed Tune trials with the sequential loop directly (24 trials, where Tune's fixed costs weigh more).",
    "When no model is trained the attack stage also starts Ray (a few seconds): in a first run Ray starts in the "
    "training stage instead.",
    "peak memory: psutil every 0.5 s over this script's descendant processes whose command line contains "
    "`ImplicitFunc` (Tune's trial actors: one per concurrent Tune trial, reused across trials) or `sophon_ray.cli` "
    "(the driver); RSS counts shared pages (torch, the object store's mapped data), USS only the process's own. "
    "A pack's process holds its members' stacked weights, optimizer states and wide activations; a lone trial's "
    "one model's.",
]


def memory_text(rs: list[Run], key: str) -> str:
    values = [v for r in rs for v in r.memory.get(key, {}).values()]
    return harness.spread(values).text(0) if values else "-"


def section(args: Any, first: Run, runs: dict[str, list[Run]]) -> harness.Section:
    """The headline (packed stage seconds and ratio), the per-contender table, notes, raw runs."""
    spec = Path(args.spec).name
    rounds = len(next(iter(runs.values())))
    sec = harness.Section(NAME, f"Packed attack trials: the attack stage of `{spec}`, packed vs unpacked",
                          f"`sophon-ray run {spec}` {' '.join('--set ' + s for s in args.sets) or '(as shipped)'} "
                          f"at `attack.pack` {' vs '.join(args.packs)}; each round runs every contender once in "
                          f"rotating order after "
                          f"{'a first run, counted as the first round of ' + repr(args.packs[0]) + ', ' if args.time_first else 'an untimed first run '}that "
                          f"{'reused the models of an earlier run' if args.checkpoints else 'trained the models'} "
                          f"({first.total:.0f} s: {', '.join(f'{k} {v:.0f} s' for k, v in first.stages.items())}); "
                          f"{rounds} round(s); 2 CPU cores, the sweep's own resources (cpus_per_trial 1, so 2 Tune "
                          "trials at once, 1 thread each)." + (" **SMOKE sizes: the numbers check the script only.**"
                                                              if args.smoke else ""))
    base = runs[args.packs[0]]
    for pack in args.packs[1:]:
        rs = runs[pack]
        stage = harness.spread([r.attack for r in rs])
        ratio = harness.spread(harness.paired_ratios([r.attack for r in rs], [r.attack for r in base]))
        if "quickstart" in spec:
            sec.goal(f"attack stage at attack.pack {pack} ({rs[0].trials_run} trials in {rs[0].tune_trials} Tune "
                     "trials)", f"<= {STAGE_GOAL_S:.0f} s", f"{stage.text(1)} s",
                     None if args.smoke else stage.median <= STAGE_GOAL_S,
                     "the packed step's speed at this size (bench/packed.py), then the stage's fixed costs: Ray "
                     "start, loading models and data, Tune's lead-in and tail, the MLflow writes")
        sec.goal(f"attack stage, attack.pack {pack} / attack.pack {args.packs[0]} (paired per round)",
                 f"<= {RATIO_GOAL}", ratio.text(3), None if args.smoke else ratio.median <= RATIO_GOAL,
                 "as above (the sequential loop: see the Tune throughput section)")
    table = harness.Table("per contender (median [min-max] over rounds)",
                          ["attack.pack", "trials run", "Tune trials", "attack stage s", "whole run s",
                           "process wall s", "trial process peak RSS MiB", "trial process peak USS MiB",
                           "trial processes", "driver peak RSS MiB"])
    for pack, rs in runs.items():
        table.rows.append([pack, str(rs[0].trials_run), str(rs[0].tune_trials),
                           harness.spread([r.attack for r in rs]).text(1),
                           harness.spread([r.total for r in rs]).text(1), harness.spread([r.wall for r in rs]).text(1),
                           memory_text(rs, "trial"), memory_text(rs, "trial_uss"),
                           str(max(len(r.memory["trial"]) for r in rs)), memory_text(rs, "driver")])
    sec.tables.append(table)
    sec.notes += NOTES
    if args.time_first:
        sec.notes.append(f"`--time-first`: the first `attack.pack` {args.packs[0]} figure is the first run's attack "
                         "stage, which began after that run had trained the models (a fresh store, the whole grid, "
                         "Ray already started); its `whole run s` includes the training.")
    sec.data = {"first": first.__dict__, "runs": {k: [r.__dict__ for r in v] for k, v in runs.items()}}
    return sec


def main() -> None:
    """The first run, then the rounds; write the section."""
    args = parse_args()
    harness.quiet_environment()
    work = Path(tempfile.mkdtemp(prefix="sb-packstage-", dir="/tmp"))
    harness.say(f"working directory {work}; first run (trains the models)")
    first = run_sweep(args, work, "first", args.packs[0])
    timed = args.packs[1:] if args.time_first else args.packs
    contenders = {pack: (lambda p=pack: run_sweep(args, work, f"r{time.monotonic_ns()}-pack-{p}", p))
                  for pack in timed}
    runs = harness.interleave(contenders, rounds=args.rounds or (1 if args.smoke else 2), warmup=0,
                              on_round=lambda r, row: harness.say(
                                  f"round {r}: " + ", ".join(f"pack {k}: attack {v.attack:.1f} s" for k, v in row.items())))
    if args.time_first:
        runs = {args.packs[0]: [first], **runs}
    md, js = section(args, first, runs).write(Path(args.out))
    harness.say(f"wrote {md} and {js} (runs kept in {work}; remove it when read)")


if __name__ == "__main__":
    main()
