"""``sophon-ray``: run | protect | attack | sync | report | ui | validate | ls.

Heavy modules are imported inside the commands so that ``--help`` answers at once. Every error a user can
fix is a :class:`~sophon_ray.errors.SophonError`, printed without a traceback and mapped to exit code 2 in
:func:`main` (one place)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from sophon_ray.errors import EXIT_BAD_INPUT, EXIT_INCOMPLETE, cli_exit


def _validate(args: argparse.Namespace) -> int:
    from sophon_ray.spec import SpecError  # noqa: PLC0415
    from sophon_ray.run.validate import advisories, load_spec  # noqa: PLC0415

    status = 0
    for path in args.spec:
        try:
            spec = load_spec(path, args.set)
        except SpecError as err:
            print(err, file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        seeds = sum(len(v.seeds) for v in spec.protect)
        print(f"{path}: ok ({spec.name}: {len(spec.protect)} protect variant(s), {seeds} protection(s), restricted "
              f"{', '.join(d.dataset for d in spec.restricted)})")
        for warning in advisories(spec):
            print(f"{path}: warning: {warning}")
    return status


def _ls(args: argparse.Namespace) -> int:
    from sophon_ray.run.catalog import catalog  # noqa: PLC0415

    for section, entries in catalog().items():
        print(f"{section}:")
        for name, doc in entries.items():
            print(f"  {name:16s} {doc}")
    return 0


def _load(args: argparse.Namespace):  # noqa: ANN202 - SweepSpec, imported lazily
    from sophon_ray.run.validate import load_spec  # noqa: PLC0415

    return load_spec(args.spec, args.set)


def _run(args: argparse.Namespace, **overrides: object) -> int:
    """``run``, ``protect`` and ``attack``: the sweep, then its closing lines. Stopped by SIGTERM or Ctrl-C: what
    finished and the command that continues it, exit 143 or 130."""
    from sophon_ray.console.signals import Interrupted, signal_name  # noqa: PLC0415
    from sophon_ray.run.context import RunOptions  # noqa: PLC0415
    from sophon_ray.run.pipeline import run  # noqa: PLC0415
    from sophon_ray.run.texts import closing_text, stopped_text  # noqa: PLC0415

    spec = _load(args)
    options = RunOptions(address=args.address, resume=args.resume, dry_run=args.dry_run, max_trials=args.max_trials,
                         verbose=args.verbose, **overrides)
    start = time.perf_counter()
    try:
        outcome = run(spec, options)
    except Interrupted as stop:
        print(stopped_text(stop.outcome, signal_name(stop.signum), time.perf_counter() - start, _resume_command(args)),
              flush=True)
        return stop.exit_code
    if not options.dry_run:
        print(closing_text(outcome, time.perf_counter() - start, _spec_words(args)), flush=True)
    return EXIT_INCOMPLETE if outcome.incomplete else 0


def _spec_words(args: argparse.Namespace) -> str:
    """The spec path and its --set overrides, quoted for a shell: how printed commands name the sweep."""
    return shlex.quote(args.spec) + "".join(f" --set {shlex.quote(item)}" for item in args.set)


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this sweep: the same subcommand, spec, --set overrides, checkpoint and cluster
    address, with --resume."""
    words = [f"sophon-ray {args.command} {_spec_words(args)}"]
    if getattr(args, "checkpoint", None):
        words.append(f"--checkpoint {shlex.quote(args.checkpoint)}")
    if args.address:
        words.append(f"--address {shlex.quote(args.address)}")
    return " ".join([*words, "--resume"])


def _sync(args: argparse.Namespace) -> int:
    from sophon_ray.run.sync import sync  # noqa: PLC0415

    result = sync(_load(args))
    if not result.trials:
        print(f"nothing to deliver: no undelivered results in {result.journal}")
        return 0
    print(f"delivered {result.trials - result.pending} of {result.trials} trial(s) from {result.journal} to MLflow "
          f"({result.delivered_ops} operation(s))")
    if result.pending:
        print(f"INCOMPLETE: {result.pending} trial(s) still undelivered (the store stopped answering); run "
              f"sophon-ray sync {_spec_words(args)} again", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"finish the sweep (report, parent run) with: sophon-ray run {_spec_words(args)} --resume")
    return 0


def _protect(args: argparse.Namespace) -> int:
    return _run(args, attack=False, report=False)


def _attack(args: argparse.Namespace) -> int:
    return _run(args, audit=Path(args.checkpoint))


def _report(args: argparse.Namespace) -> int:
    from analysis.report import run_report  # noqa: PLC0415
    from sophon_ray.run.keys import sweep_id  # noqa: PLC0415
    from sophon_ray.run.tracking import resolve_uri  # noqa: PLC0415

    spec = _load(args)
    out = Path(args.out) if args.out else spec.out / "report"
    command = "sophon-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if args.results else None
    result = run_report(resolve_uri(spec.tracking.uri), spec.name, out, sweep_id=args.sweep_id or sweep_id(spec),
                        results=Path(args.results) if args.results else None, command=command)
    summary = out / "summary.md"
    if summary.is_file():
        print(summary.read_text())
    print(f"report written to {out} (one page: {result.html})"
          + (f"; results written to {args.results}" if args.results else ""))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from sophon_ray.run.tracking import resolve_uri  # noqa: PLC0415
    from sophon_ray.cli.ui import serve  # noqa: PLC0415

    spec = _load(args) if args.spec else None
    uri = resolve_uri(spec.tracking.uri if spec else None)
    return serve(uri, spec.name if spec else None, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sophon-ray", description="SOPHON protection and fine-tuning attack sweeps")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's, Tune's and MLflow's own output on the console (by default it "
                             "goes to <output_dir>/logs/ and the console shows one progress display per stage)")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"action": "append", "default": [], "metavar": "KEY=VALUE",
                 "help": "override a spec field, e.g. --set protect.0.alpha=5 (repeatable)"}
    def sweep_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec")
        p.add_argument("--set", **overrides)
        p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a private "
                       "local instance on 127.0.0.1)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished models and "
                       "trials are reused, a protection continues from its last state checkpoint, unfinished "
                       "trials rerun into their existing MLflow runs)")
        p.add_argument("--dry-run", action="store_true", help="print the expanded grid and trial count; start nothing")
        p.add_argument("--max-trials", type=int, default=None, help="refuse grids larger than this")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="as the global -v: everything Ray, Tune and MLflow print, on the console too")

    p = sub.add_parser("run", help="pretrain -> protect (Ray Train) -> attack grid (Ray Tune) -> report")
    sweep_args(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("protect", help="pretrain and protect only (Ray Train)")
    sweep_args(p)
    p.set_defaults(func=_protect)
    p = sub.add_parser("attack", help="audit a protected checkpoint you were given: the spec's grid against it, "
                       "the normal model and scratch")
    sweep_args(p)
    p.add_argument("--checkpoint", required=True, help="protected checkpoint directory (model.safetensors + model.json)")
    p.set_defaults(func=_attack)
    p = sub.add_parser("sync", help="deliver results kept in <output_dir>/tracking-journal.jsonl (written when the "
                       "MLflow store did not answer) to the store; safe to repeat")
    p.add_argument("spec")
    p.add_argument("--set", **overrides)
    p.set_defaults(func=_sync)
    p = sub.add_parser("report", help="heatmaps, curves and summary from the sweep's MLflow runs")
    p.add_argument("spec")
    p.add_argument("--set", **overrides)
    p.add_argument("--sweep-id", default=None, help="default: the spec's own sweep id")
    p.add_argument("--out", default=None, help="default: <output_dir>/report")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="also write the results document (e.g. RESULTS.md) from the sweep's MLflow runs")
    p.set_defaults(func=_report)
    p = sub.add_parser("ui", help="the MLflow UI on the sweep's tracking store (default: $MLFLOW_TRACKING_URI, else "
                       "./mlflow.db), with a link to its experiment; Ctrl-C stops it")
    p.add_argument("spec", nargs="?", default=None, help="the sweep whose store and experiment to show (default: the "
                   "default store, every experiment)")
    p.add_argument("--set", **overrides)
    p.add_argument("--port", type=int, default=5000, help="default 5000; 0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.set_defaults(func=_ui)
    p = sub.add_parser("validate", help="check spec files; print every problem; exit 2 when any")
    p.add_argument("spec", nargs="+")
    p.add_argument("--set", **overrides)
    p.set_defaults(func=_validate)
    p = sub.add_parser("ls", help="list every registry (datasets, models, losses, strategies, optimizers, ...)")
    p.set_defaults(func=_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return cli_exit(lambda: args.func(args))


