"""What every benchmark script shares: interleaved repeated timing, robust summaries, the machine
description and the results section (a markdown table section + the same numbers as JSON).

Every figure a script reports is a *ratio measured side by side in one run*: the things compared run
in alternating order within each round, every round yields one paired ratio, and the section reports
the median with the spread (min-max) over rounds. Absolute times are context only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from sophon_ray.modes.classification.task import CLASSIFICATION

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
K = TypeVar("K")
T = TypeVar("T")


# ------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated samples."""

    median: float
    low: float
    high: float
    p90: float
    n: int

    def text(self, digits: int = 2, scale: float = 1.0) -> str:
        """``median [low-high]``, every value multiplied by ``scale``."""
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.median * scale:.{digits}f} (n=1)"
        return f"{self.median * scale:.{digits}f} [{self.low * scale:.{digits}f}-{self.high * scale:.{digits}f}]"


def spread(samples: list[float]) -> Spread:
    """Median, min, max and the nearest-rank 90th percentile of ``samples`` (NaN when empty)."""
    if not samples:
        nan = float("nan")
        return Spread(nan, nan, nan, nan, 0)
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))]
    return Spread(statistics.median(ordered), ordered[0], ordered[-1], p90, len(ordered))


def interleave(contenders: dict[K, Callable[[], T]], rounds: int, warmup: int = 1,
               on_round: Callable[[int, dict[K, T]], None] | None = None) -> dict[K, list[T]]:
    """Call every contender once per round, rotating the order each round; return the results by name.

    Each contender measures itself (so it can exclude its own set-up) and returns seconds or a richer
    record. The first ``warmup`` rounds are run but not recorded (allocator, caches, lazy imports, cuDNN
    autotuning). Rotating the order means no contender always runs right after the same other one.
    """
    names = list(contenders)
    samples: dict[K, list[T]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        row = {name: contenders[name]() for name in order}
        if r >= warmup:
            for name, result in row.items():
                samples[name].append(result)
            if on_round:
                on_round(r - warmup, row)
    return samples


def now() -> float:
    """The benchmark clock (time.perf_counter)."""
    return time.perf_counter()


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios of two interleaved sample lists."""
    return [a / b for a, b in zip(numerator, denominator) if b > 0]


class Stopwatch:
    """``with Stopwatch(sync) as sw: ...`` then ``sw.seconds``; ``sync`` (e.g. cuda synchronize) runs
    before both clock reads so queued device work is inside the interval."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self._start


# ------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    """The first 'model name' in /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    """MemTotal from /proc/meminfo in GiB (NaN elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(package: str) -> str:
    """An installed distribution's version, read from its metadata (no import)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """Where the numbers came from: cores, CPU model, RAM, load, package versions, date (no torch import)."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "ram_gib": round(_ram_gib(), 1), "load_avg": load,
            "python": platform.python_version(), "torch": _version("torch"), "ray": _version("ray"),
            "mlflow": _version("mlflow"), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ------------------------------------------------------------------------------------------ results
@dataclass
class Table:
    """A markdown table: a caption line above it, then a header and rows of preformatted cells."""

    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        """The caption in italics, then the table."""
        lines = [f"*{self.caption}*", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


HEADLINE_COLUMNS = ["figure", "goal", "measured: median [min-max]", "met", "limited by"]


@dataclass
class Section:
    """One benchmark's results: a headline table (goal, measured, limit), detail tables, notes, raw data."""

    name: str
    title: str
    setup: str
    headline: Table = field(default_factory=lambda: Table("goal vs measured", HEADLINE_COLUMNS))
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def goal(self, figure: str, goal: str, measured: str, met: bool | None, limited_by: str) -> None:
        """Add a headline row; ``met`` None means the goal does not apply to this run (e.g. smoke sizes)."""
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        self.headline.rows.append([figure, goal, measured, verdict, limited_by])

    def markdown(self) -> str:
        """``## title``, the set-up paragraph, the headline, the detail tables, the notes as a list."""
        parts = [f"## {self.title}", "", self.setup, "", self.headline.markdown()]
        parts += [f"\n{t.markdown()}" for t in self.tables]
        if self.notes:
            parts += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(parts) + "\n"

    def write(self, out: Path) -> tuple[Path, Path]:
        """Write ``out`` (markdown) and ``out`` with a .json suffix; return both paths."""
        out.parent.mkdir(parents=True, exist_ok=True)
        md, js = out.with_suffix(".md"), out.with_suffix(".json")
        md.write_text(self.markdown())
        payload = {"name": self.name, "title": self.title, "command": " ".join(sys.argv), "machine": machine(),
                   "setup": self.setup, "headline": asdict(self.headline), "tables": [asdict(t) for t in self.tables],
                   "notes": self.notes, "data": self.data}
        js.write_text(json.dumps(payload, indent=2, default=str))
        return md, js


def base_parser(name: str, description: str, threads: int = 1, threads_help: str = "") -> argparse.ArgumentParser:
    """The flags every benchmark takes: --smoke, --out, --threads, --device."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few repeats: finishes in < 60 s on "
                        "2 CPU cores; checks the script, its numbers mean nothing")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.md",
                        help=f"results path: writes .md and .json (default bench/results/{name}.md)")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help or "torch.set_num_threads in "
                        "the measuring process (default 1, what a sophon-ray worker with cpus_per_trial=1 uses)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda[:i])")
    return parser


def check_device(device: str) -> None:
    """Exit with a clear message when ``device`` is CUDA and no CUDA device is visible."""
    import torch  # noqa: PLC0415

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: no CUDA device visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); run on a GPU machine or use --device cpu", file=sys.stderr)
        sys.exit(2)


def device_sync(device: str) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU)."""
    import torch  # noqa: PLC0415

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def quiet_environment() -> None:
    """No telemetry, a non-interactive matplotlib: set before Ray or MLflow import."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def say(message: str) -> None:
    """Progress on stderr (stdout stays free for the caller)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return f"{seconds * 1e3:.2f}"


def start_ray(args: Any, tmp: Path) -> float:
    """A private local Ray instance (its own temp dir, 127.0.0.1, no dashboard); returns start seconds."""
    import ray  # noqa: PLC0415

    start = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, num_gpus=1 if args.device.startswith("cuda") else 0, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level=logging.WARNING, _temp_dir=str(tmp))
    return time.perf_counter() - start


@contextlib.contextmanager
def ray_session(args: Any, prefix: str) -> Iterator[tuple[Path, float]]:
    """A scratch directory and a private local Ray instance (``start_ray``) for one benchmark script:
    yields (directory, ray.init seconds); shuts Ray down and removes the directory on the way out."""
    import ray  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield tmp, start_ray(args, tmp / "ray")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def pretrained_normal(spec: Any, splits: Any, directory: Path) -> Path:
    """Pretrain the spec's normal model in this process and store it as the pipeline does (card with the
    original validation accuracy) in ``directory``."""
    from sophon_ray.run.checkpoint import make_card, save_checkpoint  # noqa: PLC0415
    from sophon_ray.run.checkpoint import initial_model  # noqa: PLC0415
    from sophon_ray.core.training import evaluate, pretrain  # noqa: PLC0415

    model, _ = initial_model(spec)
    pretrain(model, splits.original_train, splits.original_val, spec.pretrain, spec.seed, task=CLASSIFICATION)
    metrics = {"original_val_acc": evaluate(model, splits.original_val, task=CLASSIFICATION).score}
    save_checkpoint(model, make_card(spec.model, spec.original, spec.restricted, "bench", "normal", metrics), directory)
    return directory
