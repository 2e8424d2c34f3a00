"""SOPHON protection in plain PyTorch: alternate fine-tuning suppression (FTS) and normal training
reinforcement (NTR), with rollback, NaN guards, periodic probes and validation-based checkpoint choice."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from sophon_ray.core.attack import finetune
from sophon_ray.recipes import AttackConfig
from sophon_ray.core.state import ProtectState, load_tree, save_tree
from sophon_ray.core.data import BatchStream, infinite_batches
from sophon_ray.seam import Model as Net
from sophon_ray.core.simulation import sample_environment, simulate
from sophon_ray.spec import ProbeSpec, ProtectSpec
from sophon_ray.spec.schema import SELECT_PREFER
from sophon_ray.seam import Sync, Task
from sophon_ray.core.training import evaluate

log = logging.getLogger(__name__)
MetricSink = Callable[[int, dict[str, float]], None]
SHARED, LOCAL = "protect-state", "protect-rank{rank}"


@dataclass
class Candidate:
    """A probed state of the model during protection (scores in the task's metric: classification accuracy)."""

    iteration: int
    original_acc: float
    probe_acc: float
    state: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class ProtectResult:
    model: Net
    selected_iteration: int
    original_acc: float          # validation accuracy of the selected state
    probe_acc: float             # probe restricted accuracy of the selected state
    candidates: list[tuple[int, float, float]]
    rollbacks: list[dict[str, float | str]]
    iterations_run: int
    stopped: str | None
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0        # the iteration of the state checkpoint it continued from (0: it started fresh)
    selection: Selection | None = None   # why the selected state was chosen (:func:`selection`)


def save_state(state: ProtectState, directory: str | Path, rank: int = 0) -> None:
    """Write ``state`` into ``directory`` (safetensors + JSON, never pickled): rank 0 writes the shared part, every
    rank its own local part, so the ranks of one Ray Train report can write into one checkpoint folder."""
    if rank == 0:
        save_tree({"iteration": state.iteration, **state.shared}, directory, SHARED)
    save_tree(state.local, directory, LOCAL.format(rank=rank))


def load_state(directory: str | Path, rank: int = 0) -> ProtectState:
    """The state :func:`save_state` wrote, for ``rank``; CheckpointError when a part is missing or unreadable."""
    shared = load_tree(directory, SHARED)
    return ProtectState(shared.pop("iteration"), shared, load_tree(directory, LOCAL.format(rank=rank)))


@dataclass
class _Snapshot:
    iteration: int
    model: dict[str, torch.Tensor]
    fts_opt: dict
    ntr_opt: dict


def _snapshot(iteration: int, model: Net, fts_opt: torch.optim.Optimizer, ntr_opt: torch.optim.Optimizer) -> _Snapshot:
    return _Snapshot(iteration, copy.deepcopy(model.state_dict()), copy.deepcopy(fts_opt.state_dict()),
                     copy.deepcopy(ntr_opt.state_dict()))


def _restore(snap: _Snapshot, model: Net, fts_opt: torch.optim.Optimizer, ntr_opt: torch.optim.Optimizer) -> None:
    """Load ``snap`` into the model and optimizers; the snapshot stays as it was (an optimizer's load_state_dict
    keeps the given tensors as its state and its steps would then update the snapshot in place)."""
    model.load_state_dict(snap.model)
    fts_opt.load_state_dict(copy.deepcopy(snap.fts_opt))
    ntr_opt.load_state_dict(copy.deepcopy(snap.ntr_opt))


def _capture(iteration: int, seconds: float, model: Net, fts_opt: torch.optim.Optimizer,
             ntr_opt: torch.optim.Optimizer, good: _Snapshot, candidates: list[Candidate],
             rollbacks: list[dict[str, float | str]], history: list[dict[str, float]], rng: random.Random,
             gen: torch.Generator, streams: list[BatchStream], device: torch.device | str) -> ProtectState:
    shared = {"model": model.state_dict(), "fts_opt": fts_opt.state_dict(), "ntr_opt": ntr_opt.state_dict(),
              "good": {"iteration": good.iteration, "model": good.model, "fts_opt": good.fts_opt,
                       "ntr_opt": good.ntr_opt},
              "candidates": [{"iteration": c.iteration, "original_acc": c.original_acc, "probe_acc": c.probe_acc,
                              "state": c.state} for c in candidates],
              "rollbacks": rollbacks, "history": history, "seconds": seconds}
    local = {"rng": rng.getstate(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "streams": [s.state() for s in streams]}
    if torch.device(device).type == "cuda":
        local["cuda_rng"] = torch.cuda.get_rng_state(device)
    return ProtectState(iteration, shared, local)


def probe(model: Net, restricted_train: list[Dataset], restricted_val: list[Dataset], probes: tuple[ProbeSpec, ...],
          epochs: int, seed: int, device: torch.device | str, *, task: Task) -> float:
    """Worst case (max) restricted *validation* score over the probe attacks and restricted domains: each
    probe fine-tunes on a stratified share of the protector's restricted data for ``epochs``."""
    scores = []
    for train, val in zip(restricted_train, restricted_val):
        for p in probes:
            cfg = AttackConfig(strategy=p.strategy, optimizer=p.optimizer, lr=p.lr, batch_size=p.batch_size,
                               data_fraction=p.data_fraction, epochs=epochs, seed=seed)
            scores.append(finetune(model, train, val, cfg, device=device, task=task).final)
    return max(scores)


@dataclass(frozen=True)
class Selection:
    """Which probed state :func:`select` returns and why: ``chosen``; ``best``, the lowest probe score among the
    eligible candidates (those at or above ``floor``, or all of them when none is: ``floor_met`` False); ``tied``,
    the eligible candidates within ``tolerance`` of the best probe; the rule ``prefer`` (:data:`SELECT_PREFER`)."""

    chosen: Candidate
    best: Candidate
    eligible: int
    tied: int
    floor: float
    floor_met: bool
    tolerance: float
    prefer: str

    @property
    def probe_cost(self) -> float:
        """How many probe points less protected the chosen state is than the most protected eligible one (0: it
        is the most protected)."""
        return self.chosen.probe_acc - self.best.probe_acc

    @property
    def reason(self) -> str:
        """One line (no '|': it goes into markdown tables) saying why ``chosen`` was returned."""
        c, b = self.chosen, self.best
        where = (f"{self.eligible} probed state(s) at or above the floor {self.floor:.1f}" if self.floor_met else
                 f"no probed state met the floor {self.floor:.1f}, so among all {self.eligible}")
        if self.prefer == "protection":
            return f"lowest probe {c.probe_acc:.1f} of {where} (select_prefer protection)"
        rule = f"select_tolerance {self.tolerance:g}, select_prefer original"
        if self.probe_cost <= 0:
            return (f"lowest probe {c.probe_acc:.1f} of {where}; also the best original {c.original_acc:.1f} of the "
                    f"{self.tied} within {self.tolerance:g} of it ({rule})")
        return (f"best original {c.original_acc:.1f} of the {self.tied} within {self.tolerance:g} of the lowest probe "
                f"{b.probe_acc:.1f} (iteration {b.iteration}, original {b.original_acc:.1f}) of {where}: "
                f"{self.probe_cost:.1f} probe points less protected ({rule})")


def selection(candidates: list[Candidate], floor: float, tolerance: float = 5.0,
              prefer: str = "original") -> Selection:
    """Checkpoint selection (``ProtectSpec.select_*``). Eligible: the candidates at or above ``floor`` (all, if none
    is). ``prefer`` ``protection``: the lowest probe score (equal scores: the best original score, then the latest
    iteration). ``original``: the probe scores within ``tolerance`` points of the lowest count as equal, and the
    best original score among them wins (then the lower probe, then the later iteration): the rule before it was a
    setting, which can return a less protected state than the lowest probe."""
    if not candidates:
        raise ValueError("select: no probed candidates to choose from")
    if prefer not in SELECT_PREFER:
        raise ValueError(f"select: unknown select_prefer {prefer!r}; allowed: {', '.join(SELECT_PREFER)}")
    eligible = [c for c in candidates if c.original_acc >= floor]
    floor_met = bool(eligible)
    eligible = eligible or list(candidates)
    best = min(eligible, key=lambda c: (c.probe_acc, -c.original_acc, -c.iteration))
    tied = [c for c in eligible if c.probe_acc <= best.probe_acc + tolerance]
    chosen = best if prefer == "protection" else max(tied, key=lambda c: (c.original_acc, -c.probe_acc, c.iteration))
    return Selection(chosen, best, len(eligible), len(tied), floor, floor_met, tolerance, prefer)


def select(candidates: list[Candidate], floor: float, tolerance: float = 5.0, prefer: str = "original") -> Candidate:
    """The candidate :func:`selection` chooses."""
    return selection(candidates, floor, tolerance, prefer).chosen


def protect(model: Net, original_train: Dataset, original_val: Dataset, restricted_train: list[Dataset],
            restricted_val: list[Dataset], spec: ProtectSpec, normal_acc: float,
            device: torch.device | str = "cpu", on_metrics: MetricSink | None = None,
            sync: Sync | None = None, rank: int = 0,
            probe_train: list[Dataset] | None = None, seed: int | None = None,
            on_checkpoint: Callable[[ProtectState], None] | None = None,
            resume: ProtectState | None = None, *, task: Task) -> ProtectResult:
    """Protect a copy of ``model`` against fine-tuning on every restricted domain (SOPHON).

    Each iteration: one FTS step (sample an environment, simulate ``inner_steps`` of fine-tuning on a
    fresh restricted batch each, mean query gradient of the suppression loss, clip to ``clip_norm``,
    Adam at ``alpha * base_lr``), then ``ntr_steps`` cross-entropy steps on original batches (a second
    Adam at ``beta * base_lr``). ``alpha`` 0 turns suppression off (the NTR-only control): the simulation still
    runs, so the control draws every batch and environment that the same variant with suppression draws. Every ``eval_every`` iterations the original validation accuracy is
    checked against ``normal_acc - max_drop``; a breach or a non-finite loss rolls back to the last good
    state (up to ``max_rollbacks`` times, then stops). Every ``probe_every`` iterations (and at the end)
    a probe attack scores the state; the returned model is the state chosen by :func:`selection` with the
    floor ``normal_acc - select_drop`` and the variant's ``select_tolerance`` and ``select_prefer``.

    Data-parallel use (Ray Train): every worker passes its own shard as ``original_train`` /
    ``restricted_train``, its ``rank`` (which seeds its own environments and batches), the full
    ``probe_train`` and validation sets (so every rank takes the same decisions), and a ``sync`` that
    averages FTS and NTR gradients and BatchNorm statistics: all ranks then hold identical weights.

    ``seed`` (default: the variant's first seed) seeds environments, batches and probes.

    ``task`` (default: classification) supplies the fitting loss (adversary and NTR), the suppression loss named
    ``spec.loss`` (at the variant's timestep policy ``spec.suppression_t`` when set: generation) and the score
    (accuracy, or generation's denoising skill) that floors, probes and selection read, all in its percent scale
    where higher is better; metrics are emitted under its names.

    Fault tolerance: every ``spec.checkpoint_every`` iterations (0: never) ``on_checkpoint`` gets the whole
    :class:`ProtectState`; ``resume`` (such a state, from the same inputs and rank) continues from its iteration and
    gives bit-identical results to a run that never stopped (on the CPU).
    """
    start = time.perf_counter()
    seed = spec.seeds[0] if seed is None else seed
    torch.manual_seed(seed)
    rng = random.Random(seed * 1009 + rank)
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    probe_train = probe_train or restricted_train
    model = copy.deepcopy(model).to(device)
    model.train()
    # the variant's own timestep policy only when it has one (a task without timesteps is called as before)
    suppression = (task.suppression(spec.loss) if spec.suppression_t is None
                   else task.suppression(spec.loss, timesteps=spec.suppression_t))
    # the fitting losses, once (the simulation keys its captured inner step by its fit): NTR's and the simulated
    # attacker's stages (generation: generation.fit_t and simulate_t); the probes fine-tune at the attack stage
    ntr_fit, simulate_fit = task.fitting("fit"), task.fitting("simulate")
    metric = task.metric
    floor = normal_acc - spec.max_drop
    restricted_batches = [infinite_batches(d, spec.batch_size, gen) for d in restricted_train]
    original_batches = infinite_batches(original_train, spec.batch_size, gen)
    fts_opt = torch.optim.Adam(model.parameters(), lr=spec.alpha * spec.base_lr)
    ntr_opt = torch.optim.Adam(model.parameters(), lr=spec.beta * spec.base_lr)
    streams = [*restricted_batches, original_batches]
    good = _snapshot(0, model, fts_opt, ntr_opt)
    candidates: list[Candidate] = []
    rollbacks: list[dict[str, float | str]] = []
    history: list[dict[str, float]] = []
    stopped, iteration, last_log = None, 0, time.perf_counter()
    if resume is not None:
        sh, lo = resume.shared, resume.local
        iteration, rollbacks, history = resume.iteration, sh["rollbacks"], sh["history"]
        good = _Snapshot(**sh["good"])
        candidates = [Candidate(**c) for c in sh["candidates"]]
        _restore(_Snapshot(iteration, sh["model"], sh["fts_opt"], sh["ntr_opt"]), model, fts_opt, ntr_opt)
        rng.setstate(lo["rng"])
        gen.set_state(lo["gen"])
        torch.set_rng_state(lo["torch_rng"])
        if "cuda_rng" in lo:
            torch.cuda.set_rng_state(lo["cuda_rng"], device)
        for stream, position in zip(streams, lo["streams"], strict=True):
            stream.load_state(position)
        start -= sh["seconds"]
        log.info("protect %s | resumed from the state checkpoint of iteration %d", spec.label, iteration)
    resumed_from = iteration

    def add_candidate(it: int, original_acc: float) -> None:
        score = probe(model, probe_train, restricted_val, spec.probes, spec.probe_epochs, seed, device, task=task)
        candidates.append(Candidate(it, original_acc, score, copy.deepcopy(model.state_dict())))
        emit(it, {metric.key("probe"): score})

    def emit(it: int, metrics: dict[str, float]) -> None:
        if on_metrics:
            on_metrics(it, metrics)

    while iteration < spec.iterations:
        every = spec.checkpoint_every
        if on_checkpoint and every and iteration > resumed_from and iteration % every == 0:
            on_checkpoint(_capture(iteration, time.perf_counter() - start, model, fts_opt, ntr_opt, good, candidates,
                                   rollbacks, history, rng, gen, streams, device))
        iteration += 1
        env = sample_environment(spec.environments, rng)
        sim = simulate(model, restricted_batches[iteration % len(restricted_batches)], env, suppression,
                       spec.inner_steps, spec.query_fraction, gen, fit=simulate_fit)
        for name, param in model.named_parameters():
            param.grad = sim.grads[name]
        if sync:
            sync.grads([p.grad for p in model.parameters()])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip_norm)
        fts_opt.step()
        ntr_loss = torch.zeros((), device=grad_norm.device)
        for _ in range(spec.ntr_steps):
            x, y = next(original_batches)
            loss = ntr_fit(model, x.to(device), y.to(device))
            ntr_opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync:
                sync.grads([p.grad for p in model.parameters()])
            ntr_opt.step()
            ntr_loss += loss.detach()
        if sync:
            sync.buffers([b for b in model.buffers() if b.is_floating_point()])
        # one host sync per iteration for everything the loop decides on
        norm, ntr, weights_finite = torch.stack([grad_norm.float(), ntr_loss / max(spec.ntr_steps, 1),
                                                 _finite(model).float()]).tolist()
        row = {"fts_loss": sim.fts_loss, "adversary_loss": sim.adversary_loss, "ntr_loss": ntr,
               "fts_grad_norm": norm}
        finite = all(math.isfinite(v) for v in row.values()) and weights_finite == 1.0
        probe_now = iteration % spec.probe_every == 0 or iteration == spec.iterations
        if finite and iteration % spec.eval_every and not probe_now:
            emit(iteration, row)
            continue
        checked = evaluate(model, original_val, device, task=task) if finite else None
        original_acc = checked.score if checked is not None else float("nan")
        row[metric.original] = original_acc
        row |= checked.logged("original") if checked is not None else {}   # generation: original_skill_t<t>, ...
        history.append({"iteration": iteration, **row})
        emit(iteration, row)
        if not finite or original_acc < floor:
            reason = ("non-finite loss or weights" if not finite
                      else f"{metric.original} {original_acc:.1f} < floor {floor:.1f}")
            rollbacks.append({"iteration": iteration, "to": good.iteration, "reason": reason})
            log.warning("protect %s | rollback %d -> %d: %s", spec.label, iteration, good.iteration, reason)
            emit(iteration, {"rollback": 1.0})
            _restore(good, model, fts_opt, ntr_opt)
            if len(rollbacks) > spec.max_rollbacks:
                stopped = f"{len(rollbacks)} rollbacks (max_rollbacks={spec.max_rollbacks})"
                break
            continue
        good = _snapshot(iteration, model, fts_opt, ntr_opt)
        if probe_now:
            add_candidate(iteration, original_acc)
        now = time.perf_counter()
        log.info("protect %s %d/%d | fts_loss %.3f | ntr_loss %.3f | %s %.1f | %.2f s/it", spec.label, iteration,
                 spec.iterations, sim.fts_loss, ntr_loss, metric.original, original_acc,
                 (now - last_log) / spec.eval_every)
        last_log = now
    if not candidates or candidates[-1].iteration != good.iteration:
        _restore(good, model, fts_opt, ntr_opt)
        add_candidate(good.iteration, evaluate(model, original_val, device, task=task).score)
    picked = selection(candidates, normal_acc - spec.select_drop, spec.select_tolerance, spec.select_prefer)
    chosen = picked.chosen
    log.info("protect %s | selected iteration %d: %s", spec.label, chosen.iteration, picked.reason)
    if picked.probe_cost > 0:
        log.warning("protect %s | the selected state (iteration %d) is %.1f probe points less protected than "
                    "iteration %d: select_prefer original counts probes within select_tolerance %g as equal; "
                    "select_prefer: protection returns the most protected state", spec.label, chosen.iteration,
                    picked.probe_cost, picked.best.iteration, spec.select_tolerance)
    model.load_state_dict(chosen.state)
    return ProtectResult(
        model=model, selected_iteration=chosen.iteration, original_acc=chosen.original_acc,
        probe_acc=chosen.probe_acc, candidates=[(c.iteration, c.original_acc, c.probe_acc) for c in candidates],
        rollbacks=rollbacks, iterations_run=iteration, stopped=stopped, seconds=time.perf_counter() - start,
        history=history, resumed_from=resumed_from, selection=picked,
    )


def _finite(model: Net) -> torch.Tensor:
    """A device bool: every parameter finite (the norm of a tensor holding inf or NaN is not finite)."""
    return torch.stack(torch._foreach_norm(list(model.parameters()))).isfinite().all()
