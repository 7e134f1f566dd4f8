"""`byol-ray train` (also `python -m byol_ray.train`): BYOL pretraining on Ray Train.

byol-ray train --config experiments/fmnist.yaml optim.epochs=5 run.num_workers=2
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import load_config
from ..errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray train", description="BYOL pretraining on Ray Train")
    p.add_argument("--config", "-c", default=None, help="YAML config (e.g. experiments/fmnist.yaml)")
    p.add_argument(
        "--debug", action="store_true", help="show Python tracebacks and Ray's whole log (as BYOL_RAY_VERBOSE=1)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=5")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["BYOL_RAY_VERBOSE"] = "1"  # read by distributed.cluster; set before Ray starts

    def go() -> int:
        cfg = load_config(args.config, args.overrides)
        from ..distributed.driver import run_training  # Ray only once the config is valid

        out = run_training(cfg)
        print(f"[driver] done in {out['wall_seconds']:.0f} s; MLflow run {out['run_id']}", flush=True)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
