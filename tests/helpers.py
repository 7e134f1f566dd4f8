"""Helpers shared by test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from byol_ray.config import Config, load_config

# A config small enough for a 2-worker Ray Train run in seconds on 2 cores.
TINY = [
    "data.train_subset=512",
    "data.test_subset=256",
    "optim.batch_size=64",
    "optim.steps_per_epoch=3",
    "optim.epochs=3",
    "model.width=8",
    "model.projector_hidden=64",
    "model.predictor_hidden=64",
    "eval.linear_epochs=20",
    "eval.knn_k=20",
    "run.num_workers=2",
    "run.cpus_per_worker=1",
    "run.log_every=100",
    "run.max_failures=0",
]

# A few seconds of training per trial; 1 worker x 1 CPU so two trials fit a 2-CPU runtime at once.
TINY_SWEEP_BASE = {
    "data": {"train_subset": 512, "test_subset": 256},
    "model": {"width": 4, "projector_hidden": 64, "predictor_hidden": 64},
    "optim": {"batch_size": 64, "steps_per_epoch": 4, "epochs": 4, "warmup_epochs": 0},
    "eval": {"linear_epochs": 20, "knn_k": 20, "baselines": False},
    "run": {"num_workers": 1, "cpus_per_worker": 1, "log_every": 100, "max_failures": 0},
    "tracking": {"log_model": False},
}


def write_sweep(tmp_path: Path, variants: list[dict], seeds=1, name="tiny", fmnist_root: str = "", **extra) -> Path:
    """A sweep file of `variants` over TINY_SWEEP_BASE, writing under tmp_path/out."""
    base = {
        **TINY_SWEEP_BASE,
        "data": {**TINY_SWEEP_BASE["data"], "root": fmnist_root},
        "run": {**TINY_SWEEP_BASE["run"], "output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": name,
        "ablation": "tiny test ablation",
        "base_config": "base.yaml",
        "seeds": seeds,
        "baseline": variants[0]["name"],
        "variants": variants,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cluster_pids(temp_dir: str) -> list[int]:
    """This cluster's processes: every Ray process carries its temp/session dir on its command line."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass  # ended meanwhile, or not ours to read
    return pids


def kill_cluster(temp_dir: str) -> None:
    """End this cluster's processes only (`ray stop` would end every Ray runtime on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while cluster_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


# A small model for single-process tests of the step, the benchmark and the streamed input.
SMALL_MODEL = [
    "model.width=8",
    "model.projector_hidden=32",
    "model.predictor_hidden=32",
    "model.projector_out=16",
    "run.torch_threads=1",
]


def write_image_folder(root: Path) -> Path:
    """A real ImageNet-style folder: 3 classes of PNGs (lossless) with different sizes and aspects."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (33, 47), (64, 64), (50, 36)]
    for split, n in (("train", 12), ("val", 3)):
        for c in ("ant", "bee", "cat"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def folder_cfg(root, tmp_path, *extra) -> Config:
    return load_config(
        None,
        SMALL_MODEL
        + [
            "data.dataset=folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.stream=true",
            "eval.final=false",
            "eval.knn_every=0",
            "optim.batch_size=8",
            "optim.epochs=1",
            "model.stem=small",
            f"run.output_dir={tmp_path}",
            "tracking.enabled=false",
            *extra,
        ],
    )
