"""`byol-ray sweep <preset or file>`: one of the paper's ablations as a Ray Tune sweep.

byol-ray sweep tau                         # experiments/sweeps/tau.yaml, 3 seeds per row
byol-ray sweep my_sweep.yaml optim.epochs=2 run.output_dir=/data/out
byol-ray sweep tau --fresh                 # start over instead of resuming
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError, run_cli
from ..sweep_spec import load_sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray sweep", description="a Ray Tune ablation sweep of BYOL")
    p.add_argument("sweep", help="a preset name (tau, batch, transforms, predictor, ...) or a sweep YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every trial")
    p.add_argument("--fresh", action="store_true", help="start a new sweep instead of resuming the last one")
    p.add_argument("--resume", action="store_true", help="resume the last sweep (the default; kept for clarity)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: what the cluster holds)")
    p.add_argument(
        "--debug", action="store_true", help="show Python tracebacks and Ray's whole log (as BYOL_RAY_VERBOSE=1)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.debug:
        os.environ["BYOL_RAY_VERBOSE"] = "1"  # read by distributed.cluster; set before Ray starts

    def go() -> int:
        if args.fresh and args.resume:
            raise UserError("--fresh and --resume contradict each other: pick one")
        spec = load_sweep(args.sweep, args.overrides)
        from ..distributed.sweep import run_sweep  # Ray only once the sweep file is valid

        run_sweep(spec, args.overrides, fresh=args.fresh, max_concurrent=args.max_concurrent)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
