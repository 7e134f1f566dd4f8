"""`python -m byol_ray.bench`: the same as `byol-ray bench` (``cli/bench.py``)."""

import sys

from .cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
