"""Peak memory of the driver and of Ray worker processes, sampled with psutil while a benchmark runs.

Imported by ``tune_throughput.py`` (Tune trial actors: ``ImplicitFunc`` in the process title) and
``train_scaling.py`` (``RayTrainWorker``); their sections carry the memory tables. RSS counts every
resident page the process maps, including shared ones (torch's libraries, Ray's object store pages it
touched); USS counts only the pages private to the process, so USS is what one more trial process
really costs. Sampling can miss a peak shorter than the interval.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import psutil

MIB = 2**20


@dataclass
class PeakMemory:
    """Peak RSS/USS (bytes) of the driver and of every matching worker process (by pid)."""

    driver_rss: int = 0
    worker_rss: dict[int, int] = field(default_factory=dict)
    worker_uss: dict[int, int] = field(default_factory=dict)
    samples: int = 0

    def as_dict(self) -> dict[str, object]:
        """The peaks in MiB, workers keyed by pid (as strings, for JSON)."""
        return {"driver_rss_mib": self.driver_rss / MIB, "samples": self.samples,
                "worker_rss_mib": {str(k): v / MIB for k, v in self.worker_rss.items()},
                "worker_uss_mib": {str(k): v / MIB for k, v in self.worker_uss.items()}}


class RssSampler:
    """A background thread that records peak memory every ``interval`` seconds until stopped.

    ``with RssSampler("ImplicitFunc") as sampler: ...`` then ``sampler.peak``. Worker processes are this
    process's descendants (a local Ray instance started by ``ray.init`` runs its raylet, and so its workers,
    under the driver; other Ray instances on the machine are ignored) whose command line (Ray's process
    title) contains ``pattern``.
    """

    def __init__(self, pattern: str, interval: float = 0.5) -> None:
        self.pattern = pattern
        self.interval = interval
        self.peak = PeakMemory()
        self._driver = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        """The sampling loop (until ``__exit__``)."""
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        """One sample: the driver's RSS, then RSS and USS of every matching descendant."""
        self.peak.samples += 1
        self.peak.driver_rss = max(self.peak.driver_rss, self._driver.memory_info().rss)
        for proc in self._driver.children(recursive=True):
            try:
                if self.pattern not in " ".join(proc.cmdline()):
                    continue
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pid = proc.pid
            self.peak.worker_rss[pid] = max(self.peak.worker_rss.get(pid, 0), info.rss)
            self.peak.worker_uss[pid] = max(self.peak.worker_uss.get(pid, 0), info.uss)


def driver_peak_rss() -> int:
    """This process's lifetime peak RSS in bytes (the kernel's ru_maxrss; exact, not sampled)."""
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
