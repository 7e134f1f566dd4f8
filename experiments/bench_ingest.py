"""Benchmark: the DataLoader ingest against the Ray Data ingest on the same JPEG folder, side by side.

    .venv/bin/python experiments/bench_ingest.py [--images N] [section.key=value ...]   # from the repo root

Writes the first N Fashion-MNIST training images (default 6,144) as 64 px JPEGs (bicubic upscale,
quality 90) into a class folder tree, then trains the main job's model and batch (experiments/fmnist.yaml:
ResNet-10 at width 32, views at 20 px, batch 128) from it twice, as 1 Ray Train worker x 1 CPU on a local
Ray of 2 CPUs, streaming the folder (crops cut at 28 px from the full 64 px image):
  A. data.loader=dataloader: one DataLoader process beside the worker decodes and crops;
  B. data.loader=ray_data: Ray Data tasks on the other CPU decode and crop, the worker iterates its shard.
Both feed the real training step (flip, jitter, blur, solarize batched on the device, the BYOL step).
Runs them in the order A, B, B, A, so that a machine that speeds up or slows down during the run favours
neither, and prints each run's steady-state images/s (the last of 3 epochs), each path's mean and B/A.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from byol_ray.config import DataConfig, load_config
from byol_ray.data.readers import FASHION_MNIST_CLASSES, load_split
from byol_ray.distributed.driver import run_training

BASE = [
    "data.dataset=folder",
    "data.image_size=28",
    "data.stream=true",
    "data.num_workers=1",
    "optim.epochs=3",
    "optim.time_budget_minutes=0",
    "optim.warmup_epochs=0",
    "eval.final=false",
    "tracking.enabled=false",
    "run.cpus_per_worker=1",
    "run.log_every=1000",
]


def write_jpeg_folder(root: Path, n: int, side: int = 64) -> Path:
    """Fashion-MNIST's first n train (and 256 test) images as side x side JPEGs in class folders."""
    fm = DataConfig(root="/usr/share/datasets/fashion-mnist")
    for split, folder, count in (("train", "train", n), ("test", "val", 256)):
        data = load_split(DataConfig(**{**fm.__dict__, "train_subset": count, "test_subset": count}), split)
        for i, (img, lab) in enumerate(zip(data.images[:, 0].numpy(), data.labels.tolist())):
            d = root / folder / FASHION_MNIST_CLASSES[lab].replace("/", "-")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((side, side), Image.Resampling.BICUBIC).save(d / f"{i:06d}.jpg", quality=90)
    return root


def main(argv: list[str]) -> None:
    n = 6144
    if "--images" in argv:
        i = argv.index("--images")
        n, argv = int(argv[i + 1]), argv[:i] + argv[i + 2 :]
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    t0 = time.time()
    root = write_jpeg_folder(tmp / "fmnist64", n)
    print(f"[bench] wrote {n} train JPEGs at 64 px under {root} in {time.time() - t0:.0f} s", flush=True)
    cfg = load_config("experiments/fmnist.yaml", BASE + [f"data.root={root}", f"run.output_dir={tmp}"] + argv)
    load = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[float]] = {"dataloader": [], "ray_data": []}
    for i, loader in enumerate(("dataloader", "ray_data", "ray_data", "dataloader")):
        metrics = run_training(cfg.replace({"run.name": f"{loader}-{i}", "data.loader": loader}))["metrics"]
        runs[loader].append(metrics["images_per_s"])
        print(f"[bench] run {i + 1}/4 data.loader={loader}: {metrics['images_per_s']:.0f} img/s", flush=True)
    ray.shutdown()
    ra, rb = float(np.mean(runs["dataloader"])), float(np.mean(runs["ray_data"]))
    res = {
        "images": n,
        "runs_img_s": runs,
        "dataloader_img_s": ra,
        "ray_data_img_s": rb,
        "ray_data_over_dataloader": rb / ra,
        "loadavg_1_5_15_at_start": load,
        "loadavg_1_5_15_at_end": os.getloadavg(),
    }
    print("\n| ingest (1 worker x 1 CPU + 1 CPU decoding) | images/s | ratio |\n|---|---:|---:|")
    print(f"| DataLoader (data.num_workers=1), mean of 2 | {ra:.0f} | 1.00 (reference) |")
    print(f"| Ray Data (tasks on the other CPU), mean of 2 | {rb:.0f} | {rb / ra:.3f} of DataLoader |")
    print(json.dumps(res))
    print(f"[bench] load average at start {np.round(load, 2).tolist()}, at end {np.round(os.getloadavg(), 2).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1:])
