"""Protection on Ray Train: ``sophon_ray.run.train_driver.run_training`` with 1 vs 2 workers (CPU, gloo).

One small protect variant (the quickstart's environments, fewer iterations), the same spec except
``resources``; the normal model is pretrained once in this process and handed over as ``normal_dir``, so
every run is exactly one protect job. Configurations, interleaved round by round (rotating order):

- ``1 worker x 1 thread`` (protect_workers 1, cpus_per_trial 1: what the quickstart runs; one core idles);
- ``2 workers x 1 thread`` (protect_workers 2: data parallel, gradients and BatchNorm statistics all-reduced);
- ``1 worker x 2 threads`` (cpus_per_trial 2: the other way to use both cores; not in smoke mode).

Measured per run: wall of ``run_training`` (driver), the protect job's reported ``seconds`` (in-loop: protect
plus two test evaluations, rank 0), iterations/s, ``ranks_identical``, and the TorchTrainer fixed cost =
wall - in-loop seconds (worker group start, process group, data regenerated in every worker, checkpoint
hand-over). Peak RSS of every Ray Train worker process is sampled with psutil.

Usage (full, ~4 min on 2 quiet cores): ``.venv/bin/python bench/train_scaling.py``; smoke: ``--smoke``.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import harness
import memory

NAME = "train_scaling"
MIB = 2**20


@dataclass(frozen=True)
class Layout:
    """How a protect job is spread: Ray Train workers and threads (CPUs) per worker."""

    workers: int
    threads: int

    @property
    def label(self) -> str:
        """E.g. ``2 workers x 1 thread``."""
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x {self.threads} thread{'s' if self.threads > 1 else ''}"


def parse_args() -> Any:
    """The common flags plus Ray CPUs, rounds, protect iterations and the layouts."""
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0],
                                 threads_help="torch threads for the in-driver pretraining (default 1); the "
                                              "workers' threads are the layout's")
    parser.add_argument("--num-cpus", type=int, default=2, help="ray.init(num_cpus=...) (default 2)")
    parser.add_argument("--rounds", type=int, help="measured rounds (default 2, smoke 1)")
    parser.add_argument("--iterations", type=int, help="protect iterations (default 40, smoke 2)")
    parser.add_argument("--layouts", nargs="+", help="WORKERSxTHREADS, e.g. 1x1 2x1 1x2 (default: those three; "
                        "smoke: 1x1 2x1; cuda: 1x1)")
    return parser.parse_args()


def layouts(args: Any) -> list[Layout]:
    """The layouts to compare: ``--layouts``, else 1x1, 2x1 (and 1x2 outside smoke mode); 1x1 on one GPU."""
    if args.layouts:
        return [Layout(*(int(v) for v in item.lower().split("x"))) for item in args.layouts]
    if args.device.startswith("cuda"):
        return [Layout(1, 1)]  # one GPU: each Ray Train worker asks for a whole GPU
    return [Layout(1, 1), Layout(2, 1)] + ([] if args.smoke else [Layout(1, 2)])


def sweep_spec(args: Any) -> Any:
    """A quickstart-like spec with a short protect variant (only the final probe runs)."""
    from sophon_ray.run.validate import parse_spec  # noqa: PLC0415

    smoke = args.smoke
    protect = {"name": "bench", "loss": "ice", "iterations": args.iterations or (2 if smoke else 40),
               "inner_steps": 2 if smoke else 30, "base_lr": 1e-3, "alpha": 3, "beta": 1,
               "ntr_steps": 1 if smoke else 3, "batch_size": 20 if smoke else 100, "eval_every": 10,
               "probe_every": 10**6, "probe_epochs": 1,
               "environments": {"optimizers": ["sgd", "momentum", "adam"], "lr": [1e-3, 3e-2], "head_reinit": 0.5,
                                "head_only": 0.25}}
    return parse_spec({
        "name": "bench-train", "model": {"arch": "convnet", "num_classes": 10},
        "original": {"dataset": "shapes", "image_size": 16, "channels": 3, "train_size": 400 if smoke else 5000,
                     "test_size": 100 if smoke else 1000},
        "restricted": [{"dataset": "shapes_m", "image_size": 16, "channels": 3, "train_size": 300 if smoke else 2000,
                        "test_size": 100 if smoke else 1000}],
        "pretrain": {"epochs": 1}, "protect": [protect], "attack": {"subjects": ["protected"]},
        "resources": {"use_gpu": args.device.startswith("cuda")},
    }, "bench")


@dataclass
class Run:
    """One run_training call: driver wall, the protect job's metrics, peak worker memory."""

    wall: float
    seconds: float
    iterations: int
    ranks_identical: bool
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed(self) -> float:
        """TorchTrainer fixed cost: driver wall - in-loop seconds."""
        return self.wall - self.seconds

    @property
    def per_second(self) -> float:
        """Protect iterations per in-loop second."""
        return self.iterations / self.seconds


def run_layout(spec: Any, layout: Layout, normal_dir: Path, tmp: Path) -> Run:
    """One protect job through run_training with ``layout``'s workers and threads."""
    from sophon_ray.run.keys import protect_key  # noqa: PLC0415
    from sophon_ray.run.train_driver import protect_job, run_training  # noqa: PLC0415

    spec = replace(spec, resources=replace(spec.resources, protect_workers=layout.workers,
                                           cpus_per_trial=float(layout.threads)))
    store = tmp / f"store-{uuid.uuid4().hex[:8]}"
    store.mkdir()
    with memory.RssSampler("RayTrainWorker") as sampler:
        start = time.perf_counter()
        results = run_training(spec, [protect_job(spec, 0, 0, protect_key(spec, 0, 0))], store, str(tmp / "storage"),
                               normal_dir)
        wall = time.perf_counter() - start
    shutil.rmtree(store, ignore_errors=True)
    (metrics,) = results
    return Run(wall, metrics["seconds"], int(metrics["iterations_run"]), bool(metrics["ranks_identical"]),
               sampler.peak.as_dict())


NOTES = [
    "in-loop s = the protect job's reported `seconds` (rank 0: protect + evaluating the protected and the normal "
    "model on the original test set); fixed cost = driver wall of run_training - in-loop s.",
    "with N workers every iteration simulates N environments on N batches (one per rank, gradients averaged), so "
    "environments/s = N x iterations/s is the throughput; iterations/s alone would count a 2-worker iteration "
    "as one.",
    "2 workers x 1 thread = 2 processes on 2 cores; 1 worker x 2 threads = 1 process using both cores through "
    "intra-op threads.",
    "ranks identical = sha256 of every rank's final state dict agree (`ranks_identical` in the job's metrics).",
    "worker peak RSS/USS: psutil every 0.5 s over the driver's descendant processes titled `RayTrainWorker`.",
]
LAYOUT_COLUMNS = ["layout", "wall s", "in-loop s", "iterations/s", "environments/s (x workers)", "env/s vs 1x1",
                  "TorchTrainer fixed cost s", "ranks identical", "worker peak RSS MiB", "worker peak USS MiB"]


def setup_text(args: Any, spec: Any, rounds: int, ray_init_s: float) -> str:
    """The section's set-up paragraph: the protect variant, resources, interleaving."""
    v = spec.protect[0]
    return (f"protect variant: convnet 16 px, {v.iterations} iterations, K={v.inner_steps} inner steps, "
            f"{v.ntr_steps} NTR steps, batch {v.batch_size} per worker, quickstart environments, eval every "
            f"{v.eval_every}, only the final probe (1 epoch); `ray.init(num_cpus={args.num_cpus})`; device "
            f"`{args.device}`; each worker sets torch.set_num_threads(cpus_per_trial). Layouts interleaved in "
            f"rotating order, {rounds} round(s); ray.init took {ray_init_s:.1f} s (once)."
            + (" **SMOKE sizes: the numbers check the script only.**" if args.smoke else ""))


def report_layout(sec: harness.Section, layout: Layout, rs: list[Run], base: list[Run] | None) -> list[str]:
    """Add the layout's headline row (when there is a 1x1 baseline to compare with); return its table row."""
    envs = [layout.workers * r.per_second for r in rs]
    ratio = harness.spread(harness.paired_ratios(envs, [r.per_second for r in base])) if base else None
    if ratio and layout != Layout(1, 1):
        per_iter = harness.spread(harness.paired_ratios([r.per_second for r in rs], [r.per_second for r in base]))
        limit = ("every rank repeats the eval and the final probe on the full validation data; one all-reduce of "
                 f"all gradients per FTS and per NTR step (iterations/s ratio: {per_iter.text(3)})"
                 if layout.workers > 1 else "small convnet batches scale poorly with intra-op threads")
        sec.goal(f"{layout.label}: environments/s vs 1 worker x 1 thread", "-> 2 (ideal scaling on 2 cores; "
                 "context, no goal set)", ratio.text(3), None, limit)
    return [layout.label, harness.spread([r.wall for r in rs]).text(1), harness.spread([r.seconds for r in rs]).text(1),
            harness.spread([r.per_second for r in rs]).text(2), harness.spread(envs).text(2),
            ratio.text(3) if ratio else "-", harness.spread([r.fixed for r in rs]).text(1),
            "yes" if all(r.ranks_identical for r in rs) else "**no**",
            harness.spread([m for r in rs for m in r.memory["worker_rss_mib"].values()]).text(0),
            harness.spread([m for r in rs for m in r.memory["worker_uss_mib"].values()]).text(0)]


def section(args: Any, spec: Any, runs: dict[Layout, list[Run]], ray_init_s: float) -> harness.Section:
    """The results section: scaling headline, fixed cost, the per-layout table, notes, raw runs."""
    rounds = len(next(iter(runs.values())))
    sec = harness.Section(NAME, "Protection on Ray Train: 1 vs 2 workers", setup_text(args, spec, rounds, ray_init_s))
    table = harness.Table("per layout (median [min-max] over rounds)", LAYOUT_COLUMNS)
    table.rows += [report_layout(sec, layout, rs, runs.get(Layout(1, 1))) for layout, rs in runs.items()]
    fixed = harness.spread([r.fixed for rs in runs.values() for r in rs])
    sec.goal("TorchTrainer fixed cost per run_training call (all layouts)", "paid once per sweep (context)",
             fixed.text(1), None, "worker group start (a process per worker), torch.distributed set-up, make_splits "
             "in every worker, checkpoint report and copy to the store")
    sec.tables.append(table)
    sec.notes += NOTES
    sec.data = {"runs": {layout.label: [{**r.__dict__, "fixed": r.fixed, "per_second": r.per_second} for r in rs]
                         for layout, rs in runs.items()}, "ray_init_s": ray_init_s}
    return sec


def main() -> None:
    """Pretrain once, start Ray, run every layout round by round; write the section."""
    args = parse_args()
    harness.check_device(args.device)
    harness.quiet_environment()
    import torch  # noqa: PLC0415

    from sophon_ray.core.data import make_splits  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    with harness.ray_session(args, "sb-train-") as (tmp, ray_init_s):
        spec = sweep_spec(args)
        harness.say("pretraining the normal model in the driver")
        normal_dir = harness.pretrained_normal(spec, make_splits(spec), tmp / "normal")
        contenders = {layout: (lambda layout=layout: run_layout(spec, layout, normal_dir, tmp))
                      for layout in layouts(args)}
        runs = harness.interleave(contenders, rounds=args.rounds or (1 if args.smoke else 2), warmup=0,
                                  on_round=lambda r, row: harness.say(f"round {r}: " + ", ".join(
                                      f"{k.label} wall {v.wall:.1f} s, in-loop {v.seconds:.1f} s"
                                      for k, v in row.items())))
        md, js = section(args, spec, runs, ray_init_s).write(Path(args.out))
        harness.say(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
