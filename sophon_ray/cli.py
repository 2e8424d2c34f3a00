"""``sophon-ray``: validate | ls | efficacy. Heavy modules are imported inside the commands so that
``--help`` answers at once."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _validate(args: argparse.Namespace) -> int:
    from sophon_ray.spec import SpecError, load_spec  # noqa: PLC0415

    status = 0
    for path in args.spec:
        try:
            spec = load_spec(path, args.set)
        except SpecError as err:
            print(err, file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"{path}: ok ({spec.name}: {len(spec.protect)} protect variant(s), restricted "
              f"{', '.join(d.dataset for d in spec.restricted)})")
    return status


def _ls(args: argparse.Namespace) -> int:
    from sophon_ray.registries import ALL  # noqa: PLC0415

    for kind, registry in ALL.items():
        print(f"{kind}:")
        for name, doc in registry.describe().items():
            print(f"  {name:14s} {doc}")
    return 0


def _efficacy(args: argparse.Namespace) -> int:
    from sophon_ray.efficacy import run_efficacy, write_results  # noqa: PLC0415
    from sophon_ray.spec import SpecError, load_spec  # noqa: PLC0415

    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    report = run_efficacy(spec, args.protect_seeds, spec.out, workers=args.workers)
    command = "sophon-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_results(report, spec, command, Path(args.results))
    print(f"wrote {args.results} ({report['seconds'] / 60:.1f} min)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sophon-ray", description="SOPHON protection and fine-tuning attack sweeps")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"action": "append", "default": [], "metavar": "KEY=VALUE",
                 "help": "override a spec field, e.g. --set protect.0.alpha=5 (repeatable)"}
    p = sub.add_parser("validate", help="check spec files; print every problem; exit 2 when any")
    p.add_argument("spec", nargs="+")
    p.add_argument("--set", **overrides)
    p.set_defaults(func=_validate)
    p = sub.add_parser("ls", help="list every registry (datasets, models, losses, strategies, optimizers, ...)")
    p.set_defaults(func=_ls)
    p = sub.add_parser("efficacy", help="pretrain, protect (several seeds), attack the grid, write RESULTS.md")
    p.add_argument("spec")
    p.add_argument("--set", **overrides)
    p.add_argument("--protect-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2, help="worker processes (one CPU thread each)")
    p.add_argument("--results", default="RESULTS.md")
    p.set_defaults(func=_efficacy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
