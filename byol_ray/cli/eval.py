"""``byol-ray eval {linear,semi,transfer}``: the paper's evaluation suite for one pretrained encoder.

    byol-ray eval linear   --encoder outputs/ray_results/byol-fmnist/checkpoint_...
    byol-ray eval semi     --encoder runs:/<run id>/encoder --fractions 0.01,0.1
    byol-ray eval transfer --encoder outputs/ray_results/byol-fmnist --dataset digits

``--encoder`` is a Ray Train checkpoint directory (or the run folder holding them: the newest is used)
or an MLflow model URI (``runs:/<id>/encoder``, ``models:/...``), see ``eval/encoders.py``. Every protocol
(``eval/protocols.py``) scores the BYOL encoder and an untrained encoder of the same architecture (seeded)
with the same code on the same data, and prints a table shaped like the paper's tables 1-3 with the
difference.

The evaluation runs in-process, or as one Ray task with ``--cpus``/``--gpus`` when given ``--address``
or ``--ray``. The driver alone writes to MLflow (one writer): a child run of the pretraining run, in its
experiment, with the protocol's params, metrics and the table (Markdown + CSV) as artifacts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.transfer import TRANSFER_DATASETS
from ..errors import UserError, run_cli
from ..eval.encoders import EncoderRef, resolve_encoder
from ..eval.linear import PAPER_WEIGHT_DECAYS
from ..eval.protocols import run_protocol
from ..eval.scoring import ResultTable
from ..tracking.runs import run_experiment
from ..tracking.tracker import RUN_NAME_TAG, Tracker
from ..tracking.uri import check_reachable


# ---- MLflow --------------------------------------------------------------------------------------------
def log_to_mlflow(ref: EncoderRef, protocol: str, result: dict, files: list[Path], wall: float) -> str:
    """A child run of the pretraining run, in its experiment; returns the run id."""
    cfg = Config.from_dict(ref.config)
    check_reachable(ref.tracking_uri)
    parent, experiment = "", cfg.tracking.experiment
    if ref.parent_run_id:
        found = run_experiment(ref.tracking_uri, ref.parent_run_id)
        if found is not None:
            parent, experiment = found
        else:
            print(
                f"[eval] the pretraining run {ref.parent_run_id} is not in {ref.tracking_uri}: logging a "
                f"top-level run in experiment {experiment!r}",
                flush=True,
            )
    run_cfg = cfg.replace({"tracking.tracking_uri": ref.tracking_uri, "tracking.experiment": experiment})
    # Its own run-name tag: the training driver resumes the newest unfinished run carrying the pretraining's name.
    tracker = Tracker.start(
        run_cfg,
        tags={RUN_NAME_TAG: f"{cfg.run.name}/eval-{protocol}", "byol_ray.eval_protocol": protocol},
        parent_run_id=parent,
        run_name=f"eval-{protocol}",
    )
    try:
        tracker.log_params({f"evaluation.{k}": v for k, v in result["params"].items()})
        tracker.log_metrics({**result["metrics"], "wall_seconds": wall}, step=0)
        for f in files:
            tracker.log_artifact(f)
    except BaseException as e:
        tracker.end_after_error("FAILED", f"{type(e).__name__}: {e}")  # never leave a RUNNING run behind
        raise
    tracker.end("FINISHED")
    return tracker.run_id


# ---- the command --------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="protocol", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--encoder",
        required=True,
        help="checkpoint dir (or the ray_results/<run> folder above them), or MLflow model URI",
    )
    common.add_argument("--tracking-uri", default="", help="MLflow store (default: the pretraining run's)")
    common.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    common.add_argument("--output-dir", default="", help="tables go to <output-dir>/<run name>/eval_<protocol>/")
    common.add_argument("--seed", type=int, default=0, help="subsets, splits, baseline init and SGD order")
    common.add_argument(
        "--epochs", type=int, default=30, help="linear: SGD epochs; fine-tuning: epochs when --steps is 0"
    )
    common.add_argument("--lrs", type=_floats, default=None, help="learning-rate grid, e.g. 0.01,0.1,1")
    common.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        default=None,
        help="linear/semi: override the pretraining dataset; transfer: the target (repeatable)",
    )
    common.add_argument("--data-root", default="", help="folder holding the dataset files")
    common.add_argument("--train-subset", type=int, default=0, help="first N train images only (quick runs)")
    common.add_argument("--test-subset", type=int, default=0, help="first N test images only (quick runs)")
    common.add_argument("--address", default="", help="run as a Ray task on this cluster")
    common.add_argument("--ray", action="store_true", help="run as a Ray task (local Ray when no --address)")
    common.add_argument("--cpus", type=float, default=2.0, help="CPUs of the Ray task (and torch threads)")
    common.add_argument("--gpus", type=float, default=0.0, help="GPUs of the Ray task (in-process: > 0 = use CUDA)")
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub.add_parser("linear", parents=[common], help="linear classifier on frozen features (top-1/top-5)")
    semi = sub.add_parser("semi", parents=[common], help="fine-tune on class-balanced label subsets")
    semi.add_argument("--fractions", type=_floats, default=[0.01, 0.1], help="label fractions, e.g. 0.01,0.1")
    semi.add_argument("--steps", type=int, default=300, help="optimiser steps per fine-tuning (0 = --epochs)")
    semi.add_argument("--batch-size", type=int, default=128)
    semi.add_argument(
        "--holdout",
        type=float,
        default=0.05,
        help="fraction of train held out (disjoint from the labels) to pick the lr",
    )
    tr = sub.add_parser("transfer", parents=[common], help="linear (and fine-tuning) on another dataset")
    tr.add_argument(
        "--solver",
        choices=("lbfgs", "sgd"),
        default="lbfgs",
        help="lbfgs: the paper's transfer protocol (L2-regularised logistic regression, penalty "
        "picked on held-out data); sgd: the ImageNet linear protocol (--lrs, --epochs)",
    )
    tr.add_argument(
        "--weight-decays",
        dest="wds",
        type=_floats,
        default=None,
        help="lbfgs penalty grid (default: the paper's 45 log-spaced values 1e-6..1e5)",
    )
    tr.add_argument("--finetune", action="store_true", help="also fine-tune encoder + head on all its labels")
    tr.add_argument(
        "--splits",
        type=int,
        default=1,
        help="score N seeded train/test splits and report the mean (small datasets such as digits)",
    )
    tr.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0 = --epochs over the train split)")
    tr.add_argument("--batch-size", type=int, default=128)
    return p


DEFAULT_LRS = {"linear": [0.01, 0.1, 1.0], "semi": [0.05], "transfer": [0.01, 0.1, 1.0]}


def build_spec(args: argparse.Namespace, ref: EncoderRef) -> dict[str, Any]:
    proto = args.protocol
    if proto == "transfer":
        datasets = args.datasets or ["digits"]
        bad = [d for d in datasets if d not in TRANSFER_DATASETS]
        if bad:
            raise UserError(f"unknown transfer dataset {bad[0]!r}; choose from {', '.join(TRANSFER_DATASETS)}")
    else:
        if args.datasets and len(args.datasets) > 1:
            raise UserError(f"eval {proto} takes one --dataset (the pretraining dataset by default)")
        datasets = args.datasets or []
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if getattr(args, "splits", 1) < 1:
        raise UserError(f"--splits must be >= 1, got {args.splits}")
    if any(f > 1 for f in getattr(args, "fractions", [])):
        raise UserError(f"--fractions are fractions of the labels in (0, 1], got {args.fractions}")
    return {
        "protocol": proto,
        "encoder": asdict(ref),
        "seed": args.seed,
        "epochs": args.epochs,
        "lrs": sorted(args.lrs or DEFAULT_LRS[proto]),
        # Fine-tuning in transfer uses the semi-supervised default lr.
        "ft_lrs": sorted(args.lrs or DEFAULT_LRS["semi"]),
        "datasets": datasets,
        "data": {
            "dataset": datasets[0] if datasets and proto != "transfer" else None,
            "root": args.data_root,
            "train_subset": args.train_subset,
            "test_subset": args.test_subset,
        },
        "fractions": getattr(args, "fractions", []),
        "steps": getattr(args, "steps", 0),
        "batch_size": getattr(args, "batch_size", 128),
        "holdout": getattr(args, "holdout", 0.05),
        "finetune": getattr(args, "finetune", False),
        "splits": getattr(args, "splits", 1),
        "solver": getattr(args, "solver", "sgd"),
        "wds": sorted(getattr(args, "wds", None) or PAPER_WEIGHT_DECAYS),
        "threads": max(1, int(args.cpus)),
        "use_gpu": args.gpus > 0,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        t0 = time.time()
        ref = resolve_encoder(args.encoder, args.tracking_uri, args.output_dir)
        spec = build_spec(args, ref)
        cfg = Config.from_dict(ref.config)
        log_mlflow = not args.no_mlflow and cfg.tracking.enabled
        if log_mlflow:
            check_reachable(ref.tracking_uri)  # before minutes of evaluation, not after
        print(
            f"[eval] {args.protocol} evaluation of {ref.kind} {ref.location} (pretraining run "
            f"{ref.parent_run_id or 'unknown'})",
            flush=True,
        )
        if args.address or args.ray:
            from ..distributed.cluster import run_remote

            result = run_remote(run_protocol, spec, args.address, args.cpus, args.gpus)
        else:
            result = run_protocol(spec)
        table = ResultTable(**result["table"])
        wall = time.time() - t0
        out_dir = Path(ref.output_dir) / cfg.run.name / f"eval_{args.protocol}"
        files = table.write(out_dir, f"eval_{args.protocol}")
        paths = [files["markdown"], files["csv"]]
        if result["records"]:
            (out_dir / "subsets.json").write_text(json.dumps(result["records"]))
            paths.append(out_dir / "subsets.json")
        print("\n" + table.to_markdown(), flush=True)
        print(f"[eval] table written to {files['markdown']} and {files['csv']} ({wall:.0f} s)", flush=True)
        if log_mlflow:
            run_id = log_to_mlflow(ref, args.protocol, result, paths, wall)
            print(
                f"[eval] MLflow run {run_id} (child of {ref.parent_run_id or 'no run'}) at {ref.tracking_uri}",
                flush=True,
            )
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
