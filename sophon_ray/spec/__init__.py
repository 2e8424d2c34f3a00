"""The sweep spec: frozen, typed dataclasses (:mod:`.schema`) built from YAML with dotted overrides and hashed
(:mod:`.loader`). Precedence: dataclass defaults < YAML file < ``--set a.b=v`` overrides (< grid point, in the
drivers). The checks against the recipe table and the modes live in :mod:`sophon_ray.run.validate`
(``load_spec``)."""

from sophon_ray.spec.loader import *  # noqa: F403
from sophon_ray.spec.loader import __all__ as _loader_all
from sophon_ray.spec.schema import *  # noqa: F403
from sophon_ray.spec.schema import __all__ as _schema_all

__all__ = [*_schema_all, *_loader_all]
