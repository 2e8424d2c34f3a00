"""FTS inner step vs a plain training step, and a whole protection iteration vs its plain-step budget.

Same model, same batch size, same device, same thread count, measured in alternating order:

- plain step: ``F.cross_entropy(model(x), y).backward(); optimizer.step()`` (torch.optim SGD, or the
  torch.optim twin of ``--inner-optimizer``), with ``zero_grad`` - what a user's training loop costs.
- FTS inner step: ``sophon_ray.core.simulation.simulate(..., inner_steps=K)`` / K (support step + query
  gradient at the adapted weights), on the same pre-made batches.
- outer iteration: one ``sophon_ray.core.protection.protect`` call of N iterations (eval/probe intervals larger
  than N, so the only evaluation and probe are the ones protect always runs at the end); an iteration's time
  is the interval between protect's consecutive per-iteration ``on_metrics`` calls (each comes after the
  iteration's last ``.item()``, so device work is finished), over iterations 2..N-1: the set-up before the
  first and the evaluation + probe inside the last are excluded by construction. Against (K + ntr_steps)
  plain steps timed in the same round.

Usage (full, ~6 min on 2 quiet cores): ``.venv/bin/python bench/fts_step.py``
GPU: ``.venv/bin/python bench/fts_step.py --device cuda --models resnet18 --batch-size 150 --inner-steps 50
--bf16 both`` (see bench/gpu.sh). Smoke: ``--smoke``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import harness

from sophon_ray.modes.classification.task import CLASSIFICATION

NAME = "fts_step"
INNER_GOAL = 1.15
QUERY_FRACTION = 0.1
CLASSES = 10


@dataclass(frozen=True)
class Preset:
    """Sizes for one model: input, batch, K inner steps, NTR steps, rounds, protect length N and its rounds."""

    image_size: int
    batch_size: int
    inner_steps: int
    ntr_steps: int
    rounds: int
    outer_iterations: int   # N: iterations 2..N-1 are measured
    outer_rounds: int


# convnet: the quickstart's protection (16 px, K=30, 3 NTR steps). resnet18 on CPU: K=5 keeps a round
# under ~2 min at 1 thread (the per-step cost does not depend on K beyond the per-call set-up, which the
# ratio then slightly over-counts); the GPU script passes --inner-steps 50.
PRESETS: dict[str, dict[str, Preset]] = {
    "full": {"convnet": Preset(16, 100, 30, 3, rounds=7, outer_iterations=6, outer_rounds=5),
             "resnet18": Preset(32, 100, 5, 1, rounds=3, outer_iterations=4, outer_rounds=2)},
    "smoke": {"convnet": Preset(16, 100, 3, 1, rounds=2, outer_iterations=3, outer_rounds=1),
              "resnet18": Preset(8, 20, 2, 1, rounds=1, outer_iterations=3, outer_rounds=1)},
}


def parse_args() -> Any:
    """The common flags plus model selection, preset overrides, inner optimizer and bf16."""
    parser = harness.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["convnet", "resnet18"], help="architectures to measure")
    parser.add_argument("--batch-size", type=int, help="override every preset's batch size")
    parser.add_argument("--image-size", type=int, help="override every preset's input size")
    parser.add_argument("--inner-steps", type=int, help="override every preset's K")
    parser.add_argument("--ntr-steps", type=int, help="override every preset's NTR steps")
    parser.add_argument("--rounds", type=int, help="override every preset's number of measured rounds")
    parser.add_argument("--outer-rounds", type=int, help="override every preset's measured protect rounds")
    parser.add_argument("--outer-iterations", type=int, help="override every preset's protect iterations N (>= 3)")
    parser.add_argument("--inner-optimizer", default="sgd", choices=["sgd", "momentum", "adam"],
                        help="the simulated attacker's optimizer; the plain step uses its torch.optim twin")
    parser.add_argument("--bf16", default="off", choices=["off", "on", "both"],
                        help="torch.autocast(bfloat16) around both contenders; both = one row each")
    parser.add_argument("--layouts", nargs="+", default=["channels_last"], choices=["channels_last", "contiguous"],
                        help="model memory layouts to measure (ModelSpec.channels_last; default its default)")
    parser.add_argument("--cuda-graphs", default="on", choices=["on", "off", "both"],
                        help="simulate's CUDA-graph replay of the inner step (CUDA only); both = one row each")
    parser.add_argument("--no-outer", action="store_true", help="skip the whole-iteration (protect) measurement")
    return parser.parse_args()


def preset_for(model: str, args: Any) -> Preset:
    """The model's preset for this mode (a convnet-sized one for other architectures), with CLI overrides."""
    presets = PRESETS["smoke" if args.smoke else "full"]
    base = presets.get(model, presets["convnet"])
    overrides = {"image_size": args.image_size, "batch_size": args.batch_size, "inner_steps": args.inner_steps,
                 "ntr_steps": args.ntr_steps, "rounds": args.rounds, "outer_rounds": args.outer_rounds,
                 "outer_iterations": args.outer_iterations}
    preset = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if preset.outer_iterations < 3:
        raise SystemExit(f"--outer-iterations must be >= 3 (iterations 2..N-1 are measured), got {preset.outer_iterations}")
    return preset


# -------------------------------------------------------------------------------------------- pieces
def make_pool(preset: Preset, device: str, count: int, seed: int) -> list[tuple[Any, Any]]:
    """``count`` random batches already on ``device`` (data loading is not what is measured)."""
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    shape = (preset.batch_size, 3, preset.image_size, preset.image_size)
    return [(torch.randn(shape, generator=gen).to(device), torch.randint(0, CLASSES, (preset.batch_size,),
                                                                         generator=gen).to(device))
            for _ in range(count)]


def make_dataset(n: int, preset: Preset, device: str, seed: int) -> Any:
    """A random TensorDataset of ``n`` samples on ``device`` (every class present)."""
    import torch  # noqa: PLC0415
    from torch.utils.data import TensorDataset  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, preset.image_size, preset.image_size, generator=gen)
    y = torch.arange(n) % CLASSES
    return TensorDataset(x.to(device), y.to(device))


def plain_optimizer(model: Any, name: str) -> Any:
    """The torch.optim twin of the simulated attacker's optimizer (lr 1e-3)."""
    import torch  # noqa: PLC0415

    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9 if name == "momentum" else 0.0)


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device``'s type when ``bf16``, else a disabled (no-op) autocast."""
    import torch  # noqa: PLC0415

    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)


def time_plain(model: Any, optimizer: Any, pool: list, steps: int, device: str, bf16: bool) -> float:
    """Seconds for ``steps`` plain cross-entropy training steps on the pooled batches."""
    import torch.nn.functional as F  # noqa: PLC0415

    model.train()
    batches = itertools.cycle(pool)
    with harness.Stopwatch(harness.device_sync(device)) as sw:
        for _ in range(steps):
            x, y = next(batches)
            with autocast(device, bf16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return sw.seconds


def time_simulate(model: Any, pool: list, steps: int, optimizer: str, device: str, bf16: bool) -> float:
    """Seconds for one ``simulate`` call with ``steps`` inner steps on the pooled batches."""
    import torch  # noqa: PLC0415

    from sophon_ray.core.simulation import Environment, simulate  # noqa: PLC0415

    env = Environment(optimizer=optimizer, lr=1e-3, head_reinit=False, head_only=False)
    gen = torch.Generator().manual_seed(0)
    with harness.Stopwatch(harness.device_sync(device)) as sw, autocast(device, bf16):
        simulate(model, itertools.cycle(pool), env, CLASSIFICATION.suppression("ice"), steps, QUERY_FRACTION, gen, fit=CLASSIFICATION.fit_loss)
    return sw.seconds


def protect_spec(preset: Preset, iterations: int, optimizer: str) -> Any:
    """A protect variant whose only evaluation and probe are the ones at the end (same for every N)."""
    from sophon_ray.spec import EnvironmentSpec, ProtectSpec  # noqa: PLC0415

    return ProtectSpec(name="bench", iterations=iterations, inner_steps=preset.inner_steps,
                       ntr_steps=preset.ntr_steps, batch_size=preset.batch_size, query_fraction=QUERY_FRACTION,
                       base_lr=1e-4, eval_every=10**6, probe_every=10**6, probe_epochs=1,
                       environments=EnvironmentSpec(optimizers=(optimizer,), lr=(1e-3, 1e-3)))


@dataclass
class ProtectTiming:
    """One protect call: its wall and the wall-clock time of every iteration's on_metrics call."""

    wall: float
    emitted: list[float]
    error: str | None = None

    def per_iteration(self) -> float:
        """Mean seconds per iteration over iterations 2..N-1 (between their metric callbacks)."""
        return (self.emitted[-2] - self.emitted[0]) / (len(self.emitted) - 2)


def time_protect(model: Any, data: dict[str, Any], preset: Preset, optimizer: str, device: str,
                 bf16: bool) -> ProtectTiming:
    """A whole ``protect`` call (normal_acc 0: no rollback), with a timestamp per iteration.

    An exception raised after every iteration's metrics were emitted (i.e. in the final evaluation or
    probe, which are not measured) is recorded, not raised: the per-iteration times are complete.
    """
    from sophon_ray.core.protection import protect  # noqa: PLC0415

    n = preset.outer_iterations
    spec = protect_spec(preset, n, optimizer)
    sync = harness.device_sync(device)
    emitted: dict[int, float] = {}

    def on_metrics(iteration: int, row: dict[str, float]) -> None:
        """Timestamp the end of each iteration (its per-iteration row carries fts_loss)."""
        if "fts_loss" in row:
            sync()
            emitted.setdefault(iteration, harness.now())

    error = None
    with harness.Stopwatch(sync) as sw, autocast(device, bf16):
        try:
            result = protect(model, data["o_train"], data["o_val"], [data["r_train"]], [data["r_val"]], spec,
                             normal_acc=0.0, device=device, on_metrics=on_metrics, task=CLASSIFICATION)
            if result.rollbacks:
                raise RuntimeError(f"protect rolled back ({result.rollbacks}): the timing would not be comparable")
        except Exception as err:  # noqa: BLE001 - see the docstring; re-raised unless every iteration was timed
            if len(emitted) < n:
                raise
            error = f"{type(err).__name__}: {str(err)[:300]}"
    return ProtectTiming(sw.seconds, [emitted[i] for i in range(1, n + 1)], error)


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class Measured:
    """Everything measured for one model and precision (seconds, one entry per measured round)."""

    model: str
    precision: str
    layout: str
    graphs: bool
    preset: Preset
    params: int
    plain: list[float]         # seconds per plain step, per round
    inner: list[float]         # seconds per inner step, per round
    outer: list[float]         # seconds per outer iteration, per round
    outer_plain: list[float]   # seconds per plain step in the outer rounds
    fixed: list[float]         # protect's wall - N x per-iteration (set-up, final eval + probe), per round
    errors: list[str]          # exceptions protect raised after the measured iterations


def measure_inner(model: Any, pool: list, preset: Preset, args: Any, bf16: bool) -> tuple[list[float], list[float]]:
    """Interleaved rounds of K plain steps and one K-step simulate; per-step seconds of each."""
    plain_opt = plain_optimizer(model, args.inner_optimizer)
    k = preset.inner_steps
    samples = harness.interleave({
        "plain": lambda: time_plain(model, plain_opt, pool, k, args.device, bf16) / k,
        "inner": lambda: time_simulate(model, pool, k, args.inner_optimizer, args.device, bf16) / k,
    }, rounds=preset.rounds, on_round=lambda r, row: harness.say(
        f"  inner round {r}: plain {harness.ms(row['plain'])} ms, inner {harness.ms(row['inner'])} ms"))
    return samples["plain"], samples["inner"]


def measure_outer(model: Any, pool: list, preset: Preset, args: Any, bf16: bool
                  ) -> tuple[list[float], list[float], list[float], list[str]]:
    """Interleaved protect(N) and (K + ntr) plain steps: per-iteration seconds, per-plain-step seconds,
    protect's remaining per-call cost, and any error protect raised after the measured iterations."""
    n = preset.outer_iterations
    data = {"o_train": make_dataset(8 * preset.batch_size, preset, args.device, 1),
            "o_val": make_dataset(max(50, preset.batch_size), preset, args.device, 2),
            "r_train": make_dataset(4 * preset.batch_size, preset, args.device, 3),
            "r_val": make_dataset(max(50, preset.batch_size // 2), preset, args.device, 4)}
    plain_model = copy.deepcopy(model)
    plain_opt = plain_optimizer(plain_model, args.inner_optimizer)
    budget = preset.inner_steps + preset.ntr_steps
    samples = harness.interleave({
        "protect": lambda: time_protect(model, data, preset, args.inner_optimizer, args.device, bf16),
        "plain": lambda: time_plain(plain_model, plain_opt, pool, budget, args.device, bf16) / budget,
    }, rounds=preset.outer_rounds, on_round=lambda r, row: harness.say(
        f"  outer round {r}: protect({n}) {row['protect'].wall:.2f} s, "
        f"{harness.ms(row['protect'].per_iteration())} ms/iteration"))
    per_iter = [t.per_iteration() for t in samples["protect"]]
    fixed = [t.wall - n * it for t, it in zip(samples["protect"], per_iter)]
    errors = sorted({t.error for t in samples["protect"] if t.error})
    return per_iter, samples["plain"], fixed, errors


def measure(model_name: str, precision: str, layout: str, graphs: bool, args: Any) -> Measured:
    """Build the model (seed 0) on the device and run the inner-step and the outer-iteration rounds."""
    import torch  # noqa: PLC0415

    from sophon_ray.core import simulation  # noqa: PLC0415

    from sophon_ray.modes import build_model  # noqa: PLC0415
    from sophon_ray.spec import ModelSpec  # noqa: PLC0415

    preset = preset_for(model_name, args)
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    spec = ModelSpec(model_name, CLASSES, channels_last=layout == "channels_last")
    model = build_model(spec, channels=3, image_size=preset.image_size).to(args.device)
    pool = make_pool(preset, args.device, count=4, seed=0)
    simulation.CUDA_GRAPHS = graphs
    harness.say(f"{model_name} {precision} {layout}{'' if graphs else ' eager'}: {preset}")
    plain, inner = measure_inner(model, pool, preset, args, bf16)
    outer, outer_plain, fixed, errors = ([], [], [], []) if args.no_outer else measure_outer(
        model, pool, preset, args, bf16)
    return Measured(model_name, precision, layout, graphs, preset, sum(p.numel() for p in model.parameters()),
                    plain, inner,
                    outer, outer_plain, fixed, errors)


# ------------------------------------------------------------------------------------------ reporting
INNER_LIMIT = ("per inner step: a second, small forward/backward on the 10% query (per-op overhead that does not "
               "shrink with the batch: it dominates on a tiny convnet, vanishes on ResNet-18), the query-gradient "
               "accumulation and the in-place inner optimizer step over all parameters; no host sync (losses "
               "stay on the device until the end of simulate)")
OUTER_LIMIT = ("per iteration on top of the steps: one deep copy of the model for the simulated adversary, "
               "`clip_grad_norm_`, the FTS Adam step over all parameters, the finiteness check "
               "(`_foreach_norm`), one host sync for the iteration's metrics")


NOTES = [
    "inner step = simulate(K) / K: support step on 90% of the batch (in-place inner optimizer update of the "
    "adversary's copy) + suppression-loss gradient on the 10% query at the adapted weights; the plain step "
    "processes the whole batch once. So the inner step does ~1.1x the forward/backward work of a plain step by "
    "design.",
    "outer iteration = one FTS (K inner steps), gradient clipping, the FTS Adam step, ntr_steps NTR steps "
    "(Adam), the NaN check: the mean interval between protect's consecutive per-iteration on_metrics calls "
    "over iterations 2..N-1 of one protect(N) call (eval_every/probe_every > N). The set-up before iteration 1 "
    "and the evaluation + probe protect always runs in iteration N are outside the measured intervals; they "
    "are in 'protect wall - N x iteration' (with the first iteration's warm-up; noise can make it slightly "
    "negative for cheap models). The callback runs after the iteration's one host sync (and a device "
    "synchronize), so no device work leaks across intervals.",
    "reference for the outer ratio: (K + ntr) plain steps (the plain optimizer, not Adam) timed in the same "
    "rounds.",
]
DETAIL_COLUMNS = ["model", "precision", "layout", "input", "batch", "params", "K", "ntr", "rounds (outer)", "N",
                  "ms/plain step", "ms/inner step", "inner/plain", "ms/outer iteration", "(K+ntr) plain steps ms",
                  "outer/(K+ntr) plain", "protect wall - N x iteration s"]


def setup_text(args: Any) -> str:
    """The section's set-up paragraph: threads, device, optimizers, interleaving."""
    import torch  # noqa: PLC0415

    device = args.device + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
    return (f"torch.set_num_threads({args.threads}) in this one process; device `{device}`; inner optimizer "
            f"`{args.inner_optimizer}` (plain step: its torch.optim twin, lr 1e-3); query_fraction {QUERY_FRACTION}; "
            f"suppression loss `ice`; random inputs pre-made on the device. Each round runs the contenders in "
            f"rotating order after one unrecorded warm-up round; ratios are per round (paired), reported as median "
            f"[min-max]. torch {torch.__version__}."
            + (" **SMOKE sizes: the numbers check the script only.**" if args.smoke else ""))


def report_model(sec: harness.Section, m: Measured, smoke: bool) -> list[Any]:
    """Add one model's headline rows, raw data and error notes to ``sec``; return its detail-table row."""
    p = m.preset
    label = f"{m.model} {m.precision} {m.layout}" + ("" if m.graphs else " eager")
    inner_ratio = harness.spread(harness.paired_ratios(m.inner, m.plain))
    outer_ref = [s * (p.inner_steps + p.ntr_steps) for s in m.outer_plain]
    outer_ratio = harness.spread(harness.paired_ratios(m.outer, outer_ref))
    sec.goal(f"{label}: FTS inner step / plain step", f"<= {INNER_GOAL}", inner_ratio.text(3),
             None if smoke else inner_ratio.median <= INNER_GOAL, INNER_LIMIT)
    if m.outer:
        sec.goal(f"{label}: outer iteration / (K+ntr) plain steps", f"<= {INNER_GOAL} (the inner goal carried to "
                 "the whole iteration)", outer_ratio.text(3), None if smoke else outer_ratio.median <= INNER_GOAL,
                 OUTER_LIMIT)
    sec.data[label] = {"preset": p.__dict__, "params": m.params, "plain_s": m.plain, "inner_s": m.inner,
                       "outer_s": m.outer, "outer_plain_s": m.outer_plain, "protect_fixed_s": m.fixed,
                       "protect_errors": m.errors}
    sec.notes += [f"**{label}: protect raised after the measured iterations** (its final evaluation/probe; the "
                  f"per-iteration times are complete): {e}" for e in m.errors]
    outer = [harness.spread(m.outer).text(1, 1e3), harness.spread(outer_ref).text(1, 1e3), outer_ratio.text(3),
             harness.spread(m.fixed).text(2)] if m.outer else ["skipped", "-", "-", "-"]
    return [m.model, m.precision, m.layout + ("" if m.graphs else " (eager)"), f"3x{p.image_size}x{p.image_size}",
            p.batch_size, f"{m.params:,}", p.inner_steps,
            p.ntr_steps, f"{p.rounds} ({p.outer_rounds})", p.outer_iterations, harness.spread(m.plain).text(2, 1e3),
            harness.spread(m.inner).text(2, 1e3), inner_ratio.text(3), *outer]


def layout_table(results: list[Measured]) -> harness.Table:
    """Contiguous vs channels-last for every model x precision measured in both (measured one after the other
    in this run, not interleaved: context for ModelSpec.channels_last, not a paired ratio)."""
    table = harness.Table("memory layout: contiguous ms / channels_last ms (> 1: channels_last is faster; "
                          "medians of consecutive, not interleaved, measurements)",
                          ["model", "precision", "plain step", "inner step", "outer iteration"])
    by_key = {(m.model, m.precision, m.layout): m for m in results if m.graphs}
    for (model, precision, layout), cl in by_key.items():
        co = by_key.get((model, precision, "contiguous"))
        if layout != "channels_last" or co is None:
            continue
        ratio = lambda a, b: f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "-"  # noqa: E731
        table.rows.append([model, precision, ratio(co.plain, cl.plain), ratio(co.inner, cl.inner),
                           ratio(co.outer, cl.outer)])
    return table


def section(results: list[Measured], args: Any) -> harness.Section:
    """The results section: a headline per model and precision, the detail table, notes, raw samples."""
    sec = harness.Section(NAME, "FTS inner step and protection iteration vs plain training steps", setup_text(args))
    detail = harness.Table("per model: ms per step / iteration (median [min-max] over rounds)", DETAIL_COLUMNS)
    detail.rows += [report_model(sec, m, args.smoke) for m in results]
    sec.tables.append(detail)
    layouts = layout_table(results)
    if layouts.rows:
        sec.tables.append(layouts)
    sec.notes += NOTES
    return sec


def main() -> None:
    """Measure every requested model x precision; write the section."""
    args = parse_args()
    harness.check_device(args.device)
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    precisions = {"off": ["fp32"], "on": ["bf16"], "both": ["fp32", "bf16"]}[args.bf16]
    cuda = args.device.startswith("cuda")
    graphs = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graphs] if cuda else [True]
    results = [measure(model, precision, layout, g, args) for model in args.models for precision in precisions
               for layout in args.layouts for g in graphs]
    md, js = section(results, args).write(Path(args.out))
    harness.say(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
