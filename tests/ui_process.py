"""``sophon-ray ui`` as a subprocess, for the tests that talk to it (tests/test_ui.py, tests/test_browser.py)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.procenv import process_env

ROOT = Path(__file__).parents[1]


class UiProcess:
    """``python -m sophon_ray.cli ui ARGS`` as a subprocess; a thread collects its output lines."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = process_env(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen([sys.executable, "-m", "sophon_ray.cli", "ui", *args], cwd=cwd, env=env,
                                        text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def until(self, marker: str, timeout: float = 360) -> str:
        """Everything printed up to the line containing ``marker``; fails with what it printed otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None and not self.reader.is_alive() and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if marker in line:
                return "".join(self.seen)
        self.stop()
        pytest.fail(f"no {marker!r} from sophon-ray ui (exit {self.process.poll()}):\n{''.join(self.seen)}")

    def stop(self) -> None:
        """SIGTERM (``sophon-ray ui`` then stops its server), SIGKILL if it does not exit in three minutes."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=180)  # the MLflow server's shutdown is slow on loaded cores
            except subprocess.TimeoutExpired:
                self.process.kill()

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        """Wait for the exit; returns (exit status, everything it printed)."""
        status = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return status, "".join(self.seen)

    def start(self) -> str:
        """Wait until the UI answers; returns its base URL (``http://127.0.0.1:PORT``)."""
        printed = self.until("press Ctrl-C to stop")
        return re.search(r"MLflow UI: (http://\S+)", printed).group(1)
