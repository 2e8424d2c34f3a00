"""Placement groups that a killed Ray Train job leaves behind, found and removed.

A defender candidate is a Tune trial that runs a Ray Train job. When ASHA stops the candidate, Tune ends the trial
while its Train job runs; the Train controller dies with the trial, and Ray Train's own clean-up (a detached actor
that watches the controller) is meant to remove the job's placement group. It did not once, in CI: the group kept
its CPU with no worker in it, and the next Train jobs waited for a worker forever. A placement group outlives the
actor that created it (its lifetime is the driver's job), so nothing else removes it.

:class:`GroupReaper` runs in the driver beside a round's Tune experiment. A leaked group is recognised by what
only a leaked group is, for long: created by this driver's job (a placement group's id ends with its job's id),
in the CREATED state, of exactly a candidate's worker-group shape (Tune's trial groups have another), and idle (no
task or actor placed in it: Ray reserves 0.001 of the group's ``bundle_group_<id>`` resource for each). A live
Train job's group is idle only between its creation and its workers' start, well under a second; the reaper
removes a group found idle on two scans ``interval`` seconds apart, and once more when the round's experiment has
ended (then no Train job of the round is alive).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Bundle = Mapping[str, float]


def worker_bundles(num_workers: int, cpus: float, use_gpu: bool) -> list[dict[str, float]]:
    """The bundles of a Ray Train worker group as ``ScalingConfig(num_workers, use_gpu, resources_per_worker)``
    reserves them (one bundle a worker)."""
    return [{"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})} for _ in range(num_workers)]


def _shape(bundles: Iterable[Bundle]) -> list[tuple[tuple[str, float], ...]]:
    """Bundles compared as a multiset of their non-zero resources."""
    return sorted(tuple(sorted((k, float(v)) for k, v in b.items() if v)) for b in bundles)


def idle_groups(table: Mapping[str, Mapping[str, Any]], available: Mapping[str, float],
                total: Mapping[str, float], job_id: str, bundles: Sequence[Bundle]) -> set[str]:
    """The ids of ``job_id``'s created placement groups shaped as ``bundles`` that nothing is placed in.

    ``table``: :func:`ray.util.placement_group_table`; ``available``/``total``: the cluster's available and total
    resources (each group has a ``bundle_group_<id>`` resource; every task or actor in it takes a share)."""
    want = _shape(bundles)
    out = set()
    for pg_id, info in table.items():
        if info.get("state") != "CREATED" or not pg_id.endswith(job_id):
            continue
        key = f"bundle_group_{pg_id}"
        if _shape(info["bundles"].values()) == want and key in total and available.get(key, 0.0) >= total[key]:
            out.add(pg_id)
    return out


def scan(bundles: Sequence[Bundle]) -> set[str]:
    """:func:`idle_groups` on the running cluster, for the calling driver's job."""
    import ray  # noqa: PLC0415
    from ray.util.placement_group import placement_group_table  # noqa: PLC0415

    return idle_groups(placement_group_table(), ray.available_resources(), ray.cluster_resources(),
                       ray.get_runtime_context().get_job_id(), bundles)


def remove(pg_ids: set[str]) -> list[str]:
    """Remove these placement groups; return the ids removed (one already gone is skipped)."""
    from ray._raylet import PlacementGroupID  # noqa: PLC0415
    from ray.util.placement_group import PlacementGroup, remove_placement_group  # noqa: PLC0415

    removed = []
    for pg_id in sorted(pg_ids):
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception as err:  # noqa: BLE001 - removed meanwhile (its Train job ended): nothing to do
            log.debug("placement group %s not removed: %s", pg_id, err)
            continue
        removed.append(pg_id)
    return removed


class GroupReaper:
    """Removes leaked worker-group placement groups while a block runs (``with GroupReaper(bundles): ...``) and
    once when it ends. ``say`` tells the user of each removal."""

    def __init__(self, bundles: Sequence[Bundle], interval: float = 15.0,
                 say: Callable[[str], None] = log.warning) -> None:
        self.bundles, self.interval, self.say = list(bundles), interval, say
        self.removed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sophon-ray-group-reaper", daemon=True)

    def __enter__(self) -> GroupReaper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._reap(scan(self.bundles))

    def _loop(self) -> None:
        seen: set[str] = set()
        while not self._stop.wait(self.interval):
            try:
                now = scan(self.bundles)
            except Exception as err:  # noqa: BLE001 - a scan that fails (GCS busy) is tried again next time
                log.debug("placement group scan failed: %s", err)
                continue
            self._reap(seen & now)
            seen = now

    def _reap(self, pg_ids: set[str]) -> None:
        for pg_id in remove(pg_ids):
            self.removed.append(pg_id)
            self.say(f"removed placement group {pg_id}: left behind by a stopped candidate's Ray Train job "
                     f"(no worker in it), it held resources the next Train jobs need")
