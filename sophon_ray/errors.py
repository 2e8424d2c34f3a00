"""One base class for every error a user can fix (bad spec, missing data or checkpoint, unreachable tracking
store, runs not found): the CLIs map it to exit code 2 in one place (:func:`cli_exit`) and print its message,
never a traceback. Imports nothing heavy, so ``analysis/`` uses it too."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3  # the run ended, but results wait in the tracking journal (see `sophon-ray sync`)


class SophonError(Exception):
    """A problem the user can fix; the message names what is wrong and the fix."""


def cli_exit(command: Callable[[], int]) -> int:
    """Run a CLI command; a :class:`SophonError` becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        return command()
    except SophonError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
