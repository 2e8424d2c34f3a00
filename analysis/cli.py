"""The command line every analysis part shares: where the sweep is (``--tracking-uri``, ``--experiment``,
``--sweep-id``) and where its output goes (``--out``), and the ``main`` of one report part.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from analysis.runs import Sweep, find_sweep, load_num_classes
from sophon_ray.errors import cli_exit


def source_parser(description: str) -> argparse.ArgumentParser:
    """The CLI arguments every analysis script shares: where the sweep is and where output goes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow store, e.g. sqlite:///mlflow.db or http://127.0.0.1:5000 "
                             "(default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", required=True, help="MLflow experiment = the sweep spec's name")
    parser.add_argument("--sweep-id", default=None, help="12-hex sweep id (default: the newest sweep)")
    parser.add_argument("--out", required=True, help="folder to write into (created if missing)")
    return parser


def parse_source_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, exiting with status 2 and the fix when no tracking URI is given or set."""
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("no tracking URI: pass --tracking-uri (e.g. sqlite:///mlflow.db) or set MLFLOW_TRACKING_URI")
    return args


def part_main(description: str, argv: Sequence[str] | None,
              write: Callable[[Sweep, Path, int | None], list[Path]]) -> int:
    """The CLI of one report part: the shared arguments, the sweep, then ``write(sweep, out folder, class count or
    None)``; prints the paths it returns and returns the exit status (2 with the fix on a known error)."""
    args = parse_source_args(source_parser(description), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def command() -> int:
        sweep = find_sweep(args.tracking_uri, args.experiment, args.sweep_id)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in write(sweep, out, load_num_classes(sweep)):
            print(path)
        return 0

    return cli_exit(command)
