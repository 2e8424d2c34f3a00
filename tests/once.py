"""An expensive fixture built once per test process (a real sweep takes minutes)."""

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def once(tmp_path_factory, name: str, make: Callable[[Path], T]) -> T:
    """``make(folder)``'s value, computed the first time in this process and read back after: pytest-xdist can tear
    a module's fixtures down between two batches of its tests (a worker that briefly has no next test finalises
    every fixture), and rebuilding a sweep would double the module's cost. The folder is the process's own
    (``tmp_path_factory``'s base is per xdist worker)."""
    folder = tmp_path_factory.getbasetemp() / name
    done = folder / "fixture.pickle"
    if done.is_file():
        return pickle.loads(done.read_bytes())
    folder.mkdir(exist_ok=True)
    value = make(folder)
    done.write_bytes(pickle.dumps(value))
    return value
