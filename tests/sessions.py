"""Stop only the Ray processes a test started, never another sweep's on the same machine (``ray stop --force``
kills every Ray instance of the user: a test must not take down a sweep that happens to run beside it)."""

import os
import signal
import time

import psutil


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def kill_processes(match) -> int:
    """SIGKILL every process ``match(process)`` accepts (not this one); wait for them; how many there were."""
    victims = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and match(p)]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=30)
    return len(victims)


def kill_session(session: int) -> int:
    """Every process of process session ``session``: a driver started with ``start_new_session=True`` and the
    local Ray instance it started (Ray's processes change their process group, not their session)."""
    return kill_processes(lambda p: session_of(p.pid) == session)


def kill_ray_cluster(temp_dir: str) -> int:
    """A cluster started with ``ray start --temp-dir=<temp_dir>``: its daemons name the folder on their command
    lines; its workers die with their raylet."""
    killed = kill_processes(lambda p: temp_dir in " ".join(p.info["cmdline"] or []))
    time.sleep(1)
    return killed
