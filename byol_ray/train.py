"""`python -m byol_ray.train`: the same as `byol-ray train` (``cli/train.py``)."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
