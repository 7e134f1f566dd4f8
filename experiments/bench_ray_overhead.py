"""Benchmark: the cost of Ray Train around the per-worker loop, and 2 workers x 1 CPU vs 1 worker x 2 CPUs.

    .venv/bin/python experiments/bench_ray_overhead.py [section.key=value ...]   # from the repo root

The model and batch are the main job's (experiments/fmnist.yaml) on the first 15,360 training images,
3 epochs, no evaluation and no MLflow. Prints steady-state training images/s (the last epoch's, after a
warm-up epoch) of
  A. the loop run in-process (LocalSession),
  B. the same loop as 1 Ray Train worker with the same CPUs,
  C. 2 Ray Train workers x 1 CPU (DDP over gloo), against D. 1 worker x 2 CPUs (= B),
and the ratios B/A (Ray's overhead) and C/D, all measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import ray

from byol_ray.config import load_config
from byol_ray.distributed.driver import run_training
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession

BASE = [
    "data.train_subset=15360",
    "optim.epochs=3",
    "optim.time_budget_minutes=0",
    "optim.warmup_epochs=0",
    "eval.final=false",
    "tracking.enabled=false",
    "run.log_every=1000",
]


def main(argv: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    cfg = load_config("experiments/fmnist.yaml", BASE + [f"run.output_dir={tmp}", "run.cpus_per_worker=2"] + argv)
    local = LocalSession(tmp / "local")
    pretrain(cfg, local)
    a = local.reports[-1]["images_per_s"]

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    b = run_training(cfg.replace({"run.name": "one_worker"}))["metrics"]["images_per_s"]
    c = run_training(cfg.replace({"run.name": "two_workers", "run.num_workers": 2, "run.cpus_per_worker": 1}))[
        "metrics"
    ]["images_per_s"]
    ray.shutdown()
    res = {
        "in_process_img_s": a,
        "ray_1x2cpu_img_s": b,
        "ray_2x1cpu_img_s": c,
        "ray_over_in_process": b / a,
        "two_workers_over_one": c / b,
    }
    print("\n| setting | images/s | ratio |\n|---|---:|---:|")
    print(f"| in-process loop, 2 threads | {a:.0f} | 1.00 (reference) |")
    print(f"| Ray Train, 1 worker x 2 CPUs | {b:.0f} | {b / a:.3f} of in-process |")
    print(f"| Ray Train, 2 workers x 1 CPU (DDP, gloo) | {c:.0f} | {c / b:.3f} of 1 worker x 2 CPUs |")
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
