"""``python -m sophon_ray.cli``: the same as the ``sophon-ray`` command."""

import sys

from sophon_ray.cli import main

sys.exit(main())
