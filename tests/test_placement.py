"""The reaper of leaked worker-group placement groups (a stopped defender candidate's Ray Train job can leave one):
the rule on hand-made tables, then a real leak (a group whose creating actor was killed) on a real local Ray."""

import time

import pytest

from sophon_ray.run.placement import GroupReaper, idle_groups, worker_bundles

JOB = "01000000"
CPU1 = worker_bundles(1, 1, False)


def table(*groups):
    return {pg: {"state": state, "bundles": dict(enumerate(bundles))} for pg, state, bundles in groups}


def resources(used: dict[str, float], *pgs):
    total = {f"bundle_group_{pg}": 1000.0 for pg in pgs}
    return {k: v - used.get(k.removeprefix("bundle_group_"), 0.0) for k, v in total.items()}, total


def test_an_idle_created_group_of_the_worker_shape_and_this_job_is_idle():
    pgs = ["aa" + JOB, "bb" + JOB, "cc" + JOB, "dd" + "02000000", "ee" + JOB]
    t = table((pgs[0], "CREATED", [{"CPU": 1.0}]),            # leaked
              (pgs[1], "CREATED", [{"CPU": 1.0}]),            # a worker runs in it
              (pgs[2], "CREATED", [{"CPU": 0.01}]),           # a Tune trial's group (another shape)
              (pgs[3], "CREATED", [{"CPU": 1.0}]),            # another job's
              (pgs[4], "PENDING", [{"CPU": 1.0}]))            # not placed yet
    available, total = resources({pgs[1]: 0.001}, *pgs)
    assert idle_groups(t, available, total, JOB, CPU1) == {pgs[0]}


def test_the_shape_counts_workers_and_gpus():
    t = table(("aa" + JOB, "CREATED", [{"CPU": 1.0}, {"CPU": 1.0}]), ("bb" + JOB, "CREATED", [{"CPU": 1.0, "GPU": 1.0}]))
    available, total = resources({}, "aa" + JOB, "bb" + JOB)
    assert idle_groups(t, available, total, JOB, worker_bundles(2, 1, False)) == {"aa" + JOB}
    assert idle_groups(t, available, total, JOB, worker_bundles(1, 1, True)) == {"bb" + JOB}
    assert idle_groups(t, available, total, JOB, CPU1) == set()


@pytest.mark.integration
def test_a_leaked_group_is_removed_and_groups_in_use_are_kept():
    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(num_cpus=3, include_dashboard=False)
    try:
        @ray.remote(num_cpus=0)
        class Creator:  # as a Train controller: creates its worker group's placement group
            def make(self, bundle):
                pg = placement_group([bundle])
                ray.get(pg.ready())
                return pg

        @ray.remote(num_cpus=1)
        class Worker:
            def ping(self):
                return 1

        leaker, keeper = Creator.remote(), Creator.remote()
        leaked = ray.get(leaker.make.remote({"CPU": 1}))
        ray.kill(leaker)                      # the controller dies; its group stays (the driver's job owns it)
        used = ray.get(keeper.make.remote({"CPU": 1}))
        worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
        ray.get(worker.ping.remote())
        other = ray.get(keeper.make.remote({"CPU": 0.5}))  # idle, but not a worker group's shape
        said = []
        with GroupReaper(CPU1, interval=0.3, say=said.append) as reaper:
            deadline = time.monotonic() + 20
            while not reaper.removed and time.monotonic() < deadline:
                time.sleep(0.2)
        states = {pg: info["state"] for pg, info in placement_group_table().items()}
        assert reaper.removed == [leaked.id.hex()] and len(said) == 1 and leaked.id.hex() in said[0]
        assert states[leaked.id.hex()] == "REMOVED"
        assert states[used.id.hex()] == "CREATED" and states[other.id.hex()] == "CREATED"
        assert ray.get(worker.ping.remote()) == 1
    finally:
        ray.shutdown()
