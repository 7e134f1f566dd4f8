"""`python -m byol_ray.cli <command>`: the same as the `byol-ray` console script."""

import sys

from . import main

sys.exit(main())
