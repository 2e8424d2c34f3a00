"""What a spec can name, for ``sophon-ray ls`` and validation: the datasets, every mode's models and suppression
losses (asked of the mode table), the simulated attacker's optimizers, and the recipe table's strategies,
optimizers, schedules, augmentations and BatchNorm modes (imports torch)."""

from __future__ import annotations

from sophon_ray.core.data import DATASETS
from sophon_ray.core.simulation import INNER_OPTIMIZERS
from sophon_ray.modes import MODES
from sophon_ray.recipes import BN_MODES, OPTIMIZERS, SCHEDULES, SETTINGS, STRATEGIES
from sophon_ray.recipes.augment import AUGMENTS
from sophon_ray.registry import Registry


def _strategies_with_modes() -> dict[str, str]:
    out = {}
    for name in STRATEGIES.names():
        s = STRATEGIES.get(name)
        own = f"; its settings: {', '.join(s.settings)}" if s.settings else ""
        out[name] = f"{s.doc} [{', '.join(s.modes) or 'every mode'}{own}]"
    return out


def catalog() -> dict[str, dict[str, str]]:
    """Section title -> (name -> one-line description), in the order ``sophon-ray ls`` prints them."""
    out: dict[str, dict[str, str]] = {"datasets": DATASETS.describe(), "modes": MODES.describe()}
    for mode in MODES.names():
        m = MODES.get(mode)
        out[f"{mode} models"] = m.models().describe()
        out[f"{mode} losses"] = m.losses().describe()
    out["inner optimizers (simulated attacker)"] = INNER_OPTIMIZERS.describe()
    out["strategies"] = _strategies_with_modes()
    out["recipe settings"] = {n: f"{s.doc} (default {s.default!r})" for n, s in SETTINGS.items()}
    for title, registry in (("optimizers", OPTIMIZERS), ("schedules", SCHEDULES), ("augmentations", AUGMENTS),
                            ("BN modes", BN_MODES)):
        out[title] = registry.describe()
    return out


def registries() -> dict[str, Registry]:
    """The registries a spec's names are checked against (validation)."""
    return {"datasets": DATASETS, "inner optimizers": INNER_OPTIMIZERS, "strategies": STRATEGIES,
            "optimizers": OPTIMIZERS, "schedules": SCHEDULES, "augmentations": AUGMENTS, "BN modes": BN_MODES}
