"""One small registry for every named, pluggable piece (datasets, models, losses, strategies, optimizers).

Names are short and stable (``direct-all``, ``adam``, ``ice``): they are YAML values, MLflow params and
heatmap axes, so a registry refuses duplicates and answers a miss with the closest names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def did_you_mean(value: str, allowed: list[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest allowed name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A name -> object table with did-you-mean misses.

    >>> losses = Registry[Callable]("suppression loss")
    >>> @losses.register("ice")
    ... def ice(logits, labels): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; raises ValueError on a duplicate name."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            first_line = (doc or getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._docs[name] = first_line[0] if first_line else ""
            return obj

        return add

    def get(self, name: str) -> T:
        """Return the object named ``name``; KeyError naming the allowed names and the closest one."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(self.miss_message(name)) from None

    def miss_message(self, name: str) -> str:
        return (
            f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
            f"allowed: {', '.join(self.names())}"
        )

    def names(self) -> list[str]:
        return list(self._items)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, for ``sophon-ray ls``."""
        return dict(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
