"""`byol-ray bench` (also `python -m byol_ray.bench`): where a BYOL training step's time goes.

    byol-ray bench --config experiments/fmnist.yaml [section.key=value ...] [--json out.json] [--mlflow]

It sets up as a training worker does and times both one training step and the training loop's own epochs
(``loop.train_one_epoch``), alternating in one run.

The figures are described in ``training/bench.py``. Neither Ray nor MLflow is imported unless --mlflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import UserError, run_cli
from ..training.bench import EPOCH_STEPS, flat_metrics, run_bench, table


def log_to_mlflow(cfg: Config, res: dict[str, Any], json_path: Path | None) -> str:
    # Imported here: the GPU check machine runs the benchmark without MLflow installed.
    from ..tracking.tracker import RUN_NAME_TAG, Tracker
    from ..tracking.uri import check_reachable, resolve_tracking_uri

    check_reachable(resolve_tracking_uri(cfg))
    s = res["setup"]
    # Its own run-name tag: a training of the same run.name must not take this run for itself.
    tracker = Tracker.start(
        cfg,
        tags={RUN_NAME_TAG: f"{cfg.run.name}/bench", "byol_ray.kind": "bench", "device_name": s["device_name"]},
        run_name=f"bench-{s['backbone']}-{s['image_size']}px-b{s['batch_size']}",
    )
    tracker.log_metrics(flat_metrics(res), step=0)
    if json_path is not None:
        tracker.log_artifact(json_path)
    tracker.end("FINISHED")
    return tracker.run_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray bench", description="BYOL training throughput benchmark")
    p.add_argument("--config", "-c", default=None, help="YAML config (e.g. experiments/fmnist.yaml)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--mlflow", action="store_true", help="log the figures to MLflow (tracking.* of the config)")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions per figure (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions before each figure")
    p.add_argument(
        "--epoch-steps",
        type=int,
        default=EPOCH_STEPS,
        metavar="N",
        help="steps per timed epoch of the training loop (one after every N repetitions; longer epochs spread "
        "the loop's per-epoch work thinner, as training's full epochs do)",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="use N random images of data.image_size instead of the dataset (no data needed)",
    )
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.batch_size=256")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        if args.repeats < 1 or args.epoch_steps < 1 or args.warmup < 0 or args.synthetic < 0:
            raise UserError("--repeats and --epoch-steps must be >= 1, --warmup and --synthetic >= 0")
        cfg = load_config(args.config, args.overrides)
        res = run_bench(cfg, args.repeats, args.warmup, args.synthetic, args.epoch_steps)
        print(table(res), flush=True)
        json_path = None
        if args.json:
            json_path = Path(args.json).expanduser().resolve()
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(res, indent=2))
            print(f"[bench] figures written to {json_path}", flush=True)
        if args.mlflow:
            run_id = log_to_mlflow(cfg, res, json_path)
            print(f"[bench] logged to MLflow run {run_id}", flush=True)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
