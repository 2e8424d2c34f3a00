"""The checks only generation mode knows: its DDPM settings, the UNet's input size, and a simulated attacker
without a classifier head."""

from __future__ import annotations

from typing import Any

from sophon_ray.modes.generation.ddpm import policy_problem
from sophon_ray.modes.generation.unet import DENOISERS
from sophon_ray.registry import did_you_mean
from sophon_ray.spec import PROTOCOLS, SCORE_EVAL_T, TIMESTEP_STAGES


def problems(spec: Any) -> list[tuple[str, str]]:
    """(field path, message) for every problem of a generation spec's own settings."""
    out: list[tuple[str, str]] = []
    g, path = spec.generation, "generation"
    if g.timesteps < 2:
        out.append((f"{path}.timesteps", f"must be >= 2 (the DDPM chain's length; the paper uses 1000), got "
                    f"{g.timesteps}"))
    if not 0 < g.beta_start < g.beta_end < 1:
        out.append((f"{path}.beta_start", f"needs 0 < beta_start < beta_end < 1 (DDPM: 1e-4, 0.02), got "
                    f"{g.beta_start}, {g.beta_end}"))
    if g.protocol not in PROTOCOLS:
        out.append((f"{path}.protocol", f"unknown protocol '{g.protocol}'{did_you_mean(g.protocol, list(PROTOCOLS))}; "
                    f"allowed: {', '.join(PROTOCOLS)} (it fills every timestep stage left unset)"))
    for stage in TIMESTEP_STAGES:
        policy = getattr(g, stage)
        if policy is None or (stage == "score_t" and policy == SCORE_EVAL_T):
            continue
        problem = policy_problem(policy, max(g.timesteps, 2))
        if problem is not None:
            fix = (f"; or {SCORE_EVAL_T} (the mean at generation.eval_t)" if stage == "score_t" else "") + \
                  ("; or leave it out for the protocol's" if g.protocol in PROTOCOLS else "")
            out.append((f"{path}.{stage}", problem + fix))
    if not g.eval_t:
        out.append((f"{path}.eval_t", "needs at least one timestep, e.g. [1, 10, 100, 250, 500]"))
    for j, t in enumerate(g.eval_t):
        if not 0 <= t < g.timesteps:
            out.append((f"{path}.eval_t.{j}", f"must be in 0..{g.timesteps - 1} (generation.timesteps - 1), got {t}"))
    if g.samples < 0:
        out.append((f"{path}.samples", f"must be >= 0, got {g.samples}"))
    if g.sample_steps is not None and not 2 <= g.sample_steps <= g.timesteps:
        out.append((f"{path}.sample_steps", f"must be in 2..{g.timesteps} (respaced sampling steps) or null (all "
                    f"{g.timesteps}), got {g.sample_steps}"))
    for i, variant in enumerate(spec.protect):
        for key in ("head_reinit", "head_only"):
            if getattr(variant.environments, key):
                out.append((f"protect.{i}.environments.{key}", "a denoiser has no classifier head: the simulated "
                            f"attacker fine-tunes every parameter in generation mode; set {key}: 0"))
    return out + _input_size(spec)


def _input_size(spec: Any) -> list[tuple[str, str]]:
    """A UNet preset must be able to halve the original domain's image size at every level."""
    if spec.model.arch not in DENOISERS:
        return []
    import torch  # noqa: PLC0415

    try:
        with torch.device("meta"):
            DENOISERS.get(spec.model.arch)(spec.original.channels, spec.original.image_size)
    except ValueError as err:
        return [("original.image_size", f"{err} (model.arch {spec.model.arch})")]
    return []
