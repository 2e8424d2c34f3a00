"""The results document (RESULTS.md) of a sweep, written from its MLflow runs with the report's own metrics.

It states the protocol (which grid is reported, on which data, what the protection was allowed to look at),
then intactness per protection seed, robustness per variant on seed means and per protection seed, the best
attack found on each subject, label-information leaks, the precondition (normal vs scratch) and every
evaluation cell. One file holds several sweeps: each sweep's generated part sits between its own markers
(``<!-- results:NAME -->``) and is replaced in place when that sweep's results are written again, so
``--results RESULTS.md`` for the efficacy sweep and for the adaptive one fill the same document. Everything
from the line ``HAND_WRITTEN`` on is kept: that is where a person writes the reading of the numbers.

    sophon-ray report sweeps/efficacy.yaml --results RESULTS.md
    sophon-ray report sweeps/adaptive.yaml --results RESULTS.md
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analysis.families import family_rows
from analysis.runs import CELL_KEYS, UNLOGGED_REASON, Sweep, has_classes
from analysis.tables import cells, sections, varying
from analysis.summary import (ROBUSTNESS_HEADER, best_attacks_section, cell_name, cell_section, complete_cells,
                              definitions, family_part, leaks_section, markdown_table, number, robustness_cells,
                              robustness_rows)
from sophon_ray import names
from sophon_ray.modes import MODES
from sophon_ray.recipes import SETTINGS
from sophon_ray.core.metrics import MEANINGFUL_GAP, Cell, chance

HAND_WRITTEN = "<!-- hand-written below: kept when the results are regenerated -->"


def _grid_line(grid: Mapping[str, Any]) -> str:
    """A grid's axes, those of the first grids always, a setting added since only when it moves off its default."""
    return "; ".join(f"{key} {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}"
                     for key, values in grid.items() if key != "seed" and not _at_later_default(key, values))


def _at_later_default(key: str, values: Any) -> bool:
    setting = SETTINGS.get(key)
    return setting is not None and setting.since >= 1 and list(values) == [setting.default]


def protocol_section(spec: Mapping[str, Any], runs: pd.DataFrame) -> str:
    """What was run and what each part of the protocol may look at, from the logged spec."""
    attack = spec.get("attack", {})
    lines = ["- **Evaluation grid** (reported below; attackers fine-tune on their own pool and are scored on the "
             "restricted *test* split; nothing about the protection was chosen on it), the union of:"]
    lines += [f"  - {_grid_line(g)}" for g in attack.get("evaluation", [])]
    evaluation = runs[runs[names.GRID] == names.EVALUATION]
    lines.append(f"  - attack seeds {sorted(set(evaluation['seed']))}; "
                 f"{evaluation[evaluation['subject'] != 'scratch'].drop_duplicates(list(CELL_KEYS)).shape[0]} cells; "
                 f"{len(evaluation)} fine-tuning runs.")
    development = attack.get("development", [])
    if development:
        lines.append("- **Development grid** (the only attacks protection settings, probes and checkpoint choice may "
                     "look at; the protector's restricted share, scored on restricted *validation* data):")
        lines += [f"  - {_grid_line(g)}" for g in development]
    else:
        lines.append("- **Development grid**: none in this sweep.")
    pools = sorted(set(runs[names.DATA_POOL]))
    if pools == ["disjoint"]:
        lines.append(f"- **Attacker data**: `disjoint` (the attacker's pool is {attack.get('pool_fraction', 0.5):g} of "
                     "the restricted training split, disjoint from the protector's share and validation data; "
                     "`data_fraction` is a share of that pool).")
    else:
        lines.append(f"- **Attacker data**: `{', '.join(pools)}` (`shared`: the attacker draws from the whole "
                     "restricted training split, the protector's share included).")
    for variant in spec.get("protect", []):
        probes = ", ".join(f"{p['strategy']}/{p['optimizer']}/lr {p['lr']:g}/batch {p['batch_size']}"
                           for p in variant.get("probes", []))
        chosen = " (chosen by the defender search on development data: *Defender search* below)" \
            if variant.get("defended") else ""
        lines.append(f"- **Protection `{variant.get('name') or variant.get('loss')}`**{chosen}: loss "
                     f"`{variant.get('loss')}`, {variant.get('iterations')} iterations, {variant.get('inner_steps')} "
                     f"inner steps, base lr {variant.get('base_lr'):g}, alpha {variant.get('alpha'):.3g}, beta "
                     f"{variant.get('beta'):.3g}, {variant.get('ntr_steps')} NTR steps, batch "
                     f"{variant.get('batch_size')}; simulated attacker: {_environments(variant.get('environments', {}))}"
                     f"; seeds {variant.get('seeds')}; probes (checkpoint choice, {variant.get('probe_epochs')} epochs, "
                     f"validation data): {probes}; {_selection_rule(variant)}.")
    return "\n".join(lines)


def _environments(env: Mapping[str, Any]) -> str:
    """The simulated attacker in words: a recipe space (its searched dimensions) and known recipes, or the
    optimizer / lr / head environments."""
    known = env.get("known") or []
    extra = (f", or one of {len(known)} known recipes (the red team's finds) with probability "
             f"{env.get('known_share', 0.5):g}" if known else "")
    space = env.get("recipes")
    if space:   # what a simulation draws (its inner steps stand for epochs, batch size and data fraction)
        unused = {"batch_size", "epochs", "data_fraction", "lora_rank", "lora_alpha"}
        if not {"last-k", "reinit-last-k"} & set(space.get("strategy", [])):
            unused.add("blocks")
        dims = "; ".join(f"{k} {_values(v)}" for k, v in space.items() if _several(v) and k not in unused)
        return f"a recipe drawn from a space ({dims}){extra}"
    return (f"{', '.join(env.get('optimizers', []))} at lr {env.get('lr', [0, 0])[0]:g}-{env.get('lr', [0, 0])[1]:g}, "
            f"head re-init p {env.get('head_reinit', 0):g}, head-only p {env.get('head_only', 0):g}{extra}")


def _several(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and len(value) > 1)


def _values(value: Any) -> str:
    if isinstance(value, dict) and value.get("distribution") != "choice":
        return f"{value.get('distribution')} {value.get('low'):g}..{value.get('high'):g}"
    items = value.get("values", []) if isinstance(value, dict) else value
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in items)


def _selection_rule(variant: Mapping[str, Any]) -> str:
    """How a variant chose among its probed states (a spec from before the settings existed: the old rule, now
    their defaults)."""
    prefer, tolerance = variant.get("select_prefer", "original"), variant.get("select_tolerance", 5.0)
    if prefer == "protection":
        return "selection: the lowest probe (select_prefer protection)"
    return (f"selection: probes within {tolerance:g} points of the lowest count as equal, then the best original "
            f"score (select_prefer original, select_tolerance {tolerance:g})")


def intactness_table(protect: pd.DataFrame, normal_test: float, metric: names.Metric = names.ACCURACY) -> str:
    """Per protected model: original-domain scores, the selected iteration and rollbacks, and why that iteration
    (the protection's ``selected_reason``: the selection rule, the lowest probe, the tie band, the cost)."""
    rows = [[r[names.VARIANT], str(r[names.PROTECT_SEED]), number(r["original_val"]),
             number(r["original_test"]), number(normal_test - r["original_test"], "+.1f"),
             number(r["selected_iteration"], ".0f"), number(r["rollbacks"], ".0f"),
             str(r.get(names.SELECTED_REASON, UNLOGGED_REASON)).replace("|", "/")]
            for _, r in protect.iterrows()]
    return markdown_table(["variant", "protection seed", f"val {metric.short}", f"test {metric.short}",
                           "drop vs normal (test)",
                           "selected iteration", "rollbacks", "why this iteration"], rows, text_columns=2)


def per_seed_rows(runs: pd.DataFrame, grid: str, domain: str, chance_level: float) -> list[list[str]]:
    """Robustness rows per (variant, protection seed): each protection seed's cells (mean over attack seeds)."""
    section = runs[(runs[names.GRID] == grid) & (runs[names.DOMAIN] == domain)]
    baselines = section[section["subject"] != "protected"]
    protected = section[section["subject"] == "protected"]
    rows = []
    for (variant, seed), group in protected.groupby([names.VARIANT, names.PROTECT_SEED], sort=True):
        for name, s, _ in robustness_rows(cells(pd.concat([group, baselines])), chance_level):
            rows.append([f"{name} seed {seed}", *robustness_cells(s)])
    return rows


def precondition_section(section: pd.DataFrame, chance_level: float) -> str:
    """How many cells the normal model beats scratch by more than MEANINGFUL_GAP (the protection's premise)."""
    shared = complete_cells(section.drop_duplicates(subset=list(CELL_KEYS)))
    cells_ = [Cell(r.normal, r.normal, r.scratch, chance_level) for r in shared.itertuples()]
    meaningful = sum(c.meaningful for c in cells_)
    keys, _ = varying(shared, CELL_KEYS)
    weakest = shared.assign(gap=shared["normal"] - shared["scratch"]).nsmallest(5, "gap")
    lines = [f"Meaningful cells (normal > scratch + {MEANINGFUL_GAP:g}): **{meaningful} of {len(cells_)}** "
             f"({meaningful / max(1, len(cells_)):.0%}). The five where pretraining helps the attacker least:", ""]
    lines.append(markdown_table(["cell", "normal", "scratch", "normal − scratch"],
                                [[cell_name(r, keys), number(r.normal), number(r.scratch), number(r.gap, "+.1f")]
                                 for _, r in weakest.iterrows()]))
    return "\n".join(lines)


def results_document(sweep: Sweep, runs: pd.DataFrame, curves: Mapping[str, Sequence[float]], protect: pd.DataFrame,
                     normal_test: float, spec: Mapping[str, Any], command: str, seconds: float | None,
                     extra_sections: Sequence[str] = ()) -> str:
    """One sweep's generated part of RESULTS.md: its sections, then ``extra_sections`` (markdown: the adaptive
    attacker, budget and benign sections, per protection seed). :func:`merge_results` places it in the file."""
    metric = sweep.metric
    num_classes = (spec.get("model") or {}).get("num_classes") if MODES.get(sweep.mode).has_classes else None
    chance_level = chance(num_classes) if num_classes else 0.0
    leaks = ("Label-information leaks (protected below chance)" if has_classes(metric)
             else "Worse than refusing (protected below zero skill)")
    cell_table = cells(runs)
    families = family_rows(runs, chance_level)
    took = f" in {seconds / 60:.1f} min" if seconds and not math.isnan(seconds) else ""
    parts = [f"# Results: `{sweep.experiment}` (sweep {sweep.sweep_id})",
             f"Written by `{command}` from the MLflow runs of `sophon-ray run` ({time.strftime('%Y-%m-%d')}); the "
             f"sweep ran{took} on Ray Train + Ray Tune. Everything down to the hand-written part is generated.",
             "## Protocol", protocol_section(spec, runs), definitions(chance_level, metric),
             f"## Intactness (original-domain {metric.noun})",
             f"Normal model: test {metric.noun} {number(normal_test)}. Each protected checkpoint was chosen on "
             f"original-domain *validation* {metric.noun} and development probes; test {metric.noun} reported.",
             intactness_table(protect, normal_test, metric)]
    for grid, domain, section in sections(cell_table):
        if grid != names.EVALUATION:
            continue
        summary_rows = [[f"**{name}** (seed means)", *robustness_cells(s)]
                        for name, s, _ in robustness_rows(section, chance_level)]
        summary_rows += per_seed_rows(runs, grid, domain, chance_level)
        parts += [f"## Evaluation grid, restricted domain `{domain}`",
                  "### Robustness", markdown_table(["variant", *ROBUSTNESS_HEADER], summary_rows),
                  "### Precondition: does pretraining help the attacker?", precondition_section(section, chance_level),
                  "### Best attack found on each subject", best_attacks_section(section, chance_level, metric),
                  *family_part(families, grid, domain),
                  f"### {leaks}", leaks_section(section, chance_level, metric),
                  "### Every cell", cell_section(section, curves, chance_level, metric)]
    for grid, domain, section in sections(cell_table):
        if grid == names.DEVELOPMENT:
            rows = [[name, *robustness_cells(s)] for name, s, _ in robustness_rows(section, chance_level)]
            parts += [f"## Development grid, restricted domain `{domain}` (what tuning may look at)",
                      markdown_table(["variant", *ROBUSTNESS_HEADER], rows)]
    return "\n\n".join([*parts, *extra_sections])


def markers(experiment: str) -> tuple[str, str]:
    """The lines that open and close one sweep's generated part of the results file."""
    return f"<!-- results:{experiment} -->", f"<!-- /results:{experiment} -->"


def merge_results(existing: str, experiment: str, generated: str) -> str:
    """``existing`` (a results file's text, maybe empty) with ``experiment``'s generated part replaced in place
    (or added after the other sweeps'); the other sweeps' parts and the hand-written part (from HAND_WRITTEN on)
    are kept. A file written before the markers existed loses its generated part (it was one sweep's, and is
    regenerated by that sweep's report)."""
    kept = existing[existing.index(HAND_WRITTEN):] if HAND_WRITTEN in existing else HAND_WRITTEN + "\n"
    head = existing[:existing.index(HAND_WRITTEN)] if HAND_WRITTEN in existing else ""
    start, end = markers(experiment)
    block = f"{start}\n{generated}\n{end}"
    if start in head and end in head:
        head = head[:head.index(start)] + block + head[head.index(end) + len(end):]
    elif "<!-- results:" in head:
        head = head.rstrip() + "\n\n" + block + "\n\n"
    else:
        head = block + "\n\n"
    return head.rstrip() + "\n\n" + kept
