"""Parallel protections (``resources.protect_parallel`` > 1) run as Ray tasks: results in group order, and an error
in one run or Ctrl-C in the driver cancels the others (a real local Ray; stand-in fits, no Ray Train)."""

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


# The driver of the cancel test: its own process, with a real SIGINT and SIGINT's default disposition (a test run
# started in the background inherits SIGINT ignored: `_thread.interrupt_main` then did nothing, which once failed CI)
DRIVER = """
import sys, time
from pathlib import Path
import ray
from sophon_ray.run.train_driver import _fit_at_once

out, how = Path(sys.argv[1]), sys.argv[2]

def fit(spec, group, *rest):
    import time as t
    if group == ["bad"]:
        raise RuntimeError("bad group")
    t.sleep(8)
    (out / "slow-finished").write_text("yes")
    return [{"group": group[0]}]

ray.init(num_cpus=2, include_dashboard=False)
(out / "ready").write_text("yes")
started = time.perf_counter()
try:
    _fit_at_once([["slow"], ["bad"]] if how == "error" else [["slow"]], "spec", fit=fit)
    print("returned")
except KeyboardInterrupt:
    print("interrupted", time.perf_counter() - started)
except RuntimeError as err:
    print("error", type(err).__name__, time.perf_counter() - started)
"""


@pytest.mark.parametrize("how", ["error", "ctrl-c"])
def test_an_error_or_ctrl_c_cancels_the_other_protection_runs(tmp_path, how):
    import signal
    import subprocess
    import sys

    from tests.procenv import process_env

    # SIGINT as a foreground process gets it: a shell that starts the test run in the background (`cmd &` without
    # job control) hands every child SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), how], env=process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if how == "ctrl-c":
        time.sleep(2.0)               # the slow run has started
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    said = out.strip().splitlines()[-1] if out.strip() else err[-2000:]
    assert said.split()[0] == ("interrupted" if how == "ctrl-c" else "error"), said
    assert float(said.split()[-1]) < 8, said      # it stopped before the slow run could finish
    time.sleep(10)  # the slow run would have finished by now, had it not been cancelled
    assert not (tmp_path / "slow-finished").exists()
