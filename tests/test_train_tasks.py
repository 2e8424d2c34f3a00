"""Parallel protections (``resources.protect_parallel`` > 1) run as Ray tasks: results in group order, and an error
in one run or Ctrl-C in the driver cancels the others (a real local Ray; stand-in fits, no Ray Train)."""

import _thread
import threading
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def fit_of(tmp_path):
    """A stand-in for ``_fit``: group ["bad"] fails at once, group ["slow"] writes a marker after 8 s."""
    def fit(spec, group, *rest):
        import time as t

        if group == ["bad"]:
            raise RuntimeError("bad group")
        if group == ["slow"]:
            t.sleep(8)
            (tmp_path / "slow-finished").write_text("yes")
        return [{"group": group[0], "spec": spec, "rest": list(rest)}]
    return fit


def test_groups_run_as_tasks_and_come_back_in_group_order(local_ray, tmp_path):
    from sophon_ray.run.train_driver import _fit_at_once

    out = _fit_at_once([["a"], ["b"], ["c"]], "spec", "store", fit=fit_of(tmp_path))
    assert [r["group"] for r in out] == ["a", "b", "c"] and out[0]["spec"] == "spec" and out[0]["rest"] == ["store"]


@pytest.mark.parametrize("how", ["error", "ctrl-c"])
def test_an_error_or_ctrl_c_cancels_the_other_protection_runs(local_ray, tmp_path, how):
    from sophon_ray.run.train_driver import _fit_at_once

    started = time.perf_counter()
    groups = [["slow"], ["bad"]] if how == "error" else [["slow"]]
    if how == "ctrl-c":
        threading.Timer(2.0, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else Exception):
        _fit_at_once(groups, "spec", fit=fit_of(tmp_path))
    assert time.perf_counter() - started < 8
    time.sleep(10)  # the slow run would have finished by now, had it not been cancelled
    assert not (tmp_path / "slow-finished").exists()
