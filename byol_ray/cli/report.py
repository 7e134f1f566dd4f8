"""`byol-ray report <sweep>`: a sweep's MLflow runs -> the paper-shaped ablation table (Markdown, CSV, PNG).

    byol-ray report tau                    # the newest `tau` sweep in the store the preset's config uses
    byol-ray report tau run.output_dir=/data/out --run-id <parent run id>

Reads the store only: a store that does not exist is an error, not a new empty one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import run_cli
from ..sweep_spec import load_sweep
from ..tracking.report import build_report
from ..tracking.runs import sweep_parent_id
from ..tracking.tracker import Tracker
from ..tracking.uri import check_store_exists, resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray report", description="a sweep's ablation table from MLflow")
    p.add_argument("sweep", help="the sweep's preset name or YAML file (as given to `byol-ray sweep`)")
    p.add_argument("overrides", nargs="*", help="the same section.key=value overrides the sweep was run with")
    p.add_argument("--run-id", default="", help="the sweep's MLflow parent run (default: the newest one)")
    p.add_argument("--output-dir", default="", help="where to write the files (default: <output_dir>/sweep-<name>)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)

    def go() -> int:
        spec = load_sweep(args.sweep, args.overrides)
        cfg = spec.trial_config(spec.baseline, spec.seeds[0], args.overrides)
        uri = resolve_tracking_uri(cfg)
        check_store_exists(uri, f"sweep {spec.name!r}")
        run_id = args.run_id or sweep_parent_id(uri, cfg.tracking.experiment, spec.name)
        out = Path(args.output_dir) if args.output_dir else cfg.output_dir / f"sweep-{spec.name}"
        build_report(Tracker(uri, run_id), out)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
