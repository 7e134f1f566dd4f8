"""What one more worker costs in traffic and what a checkpoint costs, for the paper's networks as byol-ray
builds them (docs/scaling.md).

    PYTHONPATH=. .venv/bin/python experiments/scaling_figures.py [--backbones resnet18 resnet50]
        [--workers 8 32 64 512] [--repeats 3] [--dir outputs/scaling] [--json outputs/scaling/figures.json]

For each backbone, the replica of experiments/imagenet_resnet50.yaml (ImageNet stem, width 64, the paper's
4096-256 projector and 4096 predictor) is built as training builds it (`core.engine.Pretrainer`, on the CPU,
fp32) and takes one real step on a small random batch, so LARS and the probe's Adam hold their state. Then:

- the numbers every step all-reduces between workers: the online network's gradients (DDP: encoder,
  projector, predictor), its float BatchNorm buffers (averaged after each step) and the online probe's
  gradients; their bytes in fp32, and what a ring all-reduce moves per worker, 2(N-1)/N of them, for each N;
- the checkpoint: the real `TrainState` (online and target networks, LARS momentum, probe and its Adam, the
  config, the RNG) written with `core.state.save_state` and read with `load_state` into `--dir`, its size and
  the median wall time of `--repeats` saves and loads (to the local disk's page cache: the copy to shared
  storage comes on top, at that storage's bandwidth).

Then the time and GPU-hours of a paper-scale run (ImageNet's 1,281,167 images, 300 epochs, batch 4096) on
each N, from the last backbone's figures and the assumptions given as options, which nothing here measures:
a GPU's images/s for the whole BYOL step (`--gpu-img-s`), each worker's network bandwidth (`--network-gbit`),
the shared storage's write bandwidth (`--storage-gb-s`) and a GPU-hour's price (`--usd-per-gpu-hour`). A step
takes the compute of its 4096 images spread over N GPUs plus the ring all-reduce at that bandwidth (no overlap
with the backward pass; with full overlap it would take the larger of the two); each epoch adds one checkpoint
(the save measured here plus its copy to storage). Start-up, evaluation and the all-reduce's per-message
latency are left out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from byol_ray.config import Config, load_config
from byol_ray.core.engine import InputSpec, Pretrainer
from byol_ray.core.state import STATE_FILE, TrainState, load_state, save_state

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "experiments" / "imagenet_resnet50.yaml"
IMAGENET_CLASSES = 1000
FP32_BYTES = 4
STEP_BATCH = 4  # images of the one step that fills the optimiser state (BatchNorm wants more than 1)


def paper_config(backbone: str) -> Config:
    return load_config(
        str(PAPER_CONFIG),
        [
            f"model.backbone={backbone}",
            "run.device=cpu",
            "run.gpus_per_worker=0",
            "run.precision=fp32",
            "run.compile=false",
        ],
    )


def build_replica(cfg: Config) -> Pretrainer:
    inputs = InputSpec(3, IMAGENET_CLASSES, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return Pretrainer(cfg, inputs, steps_per_epoch=1, device=torch.device("cpu"))


def synchronised(trainer: Pretrainer) -> dict[str, int]:
    """Numbers all-reduced per step, by what the engine reduces (engine.Pretrainer._step)."""
    probe = sum(p.numel() for p in trainer.probe.parameters()) if trainer.probe is not None else 0
    return {
        "gradients": sum(p.numel() for p in trainer.net.parameters() if p.requires_grad),
        "bn_buffers": sum(b.numel() for b in trainer.net.buffers() if b.is_floating_point()),
        "probe_gradients": probe,
    }


def one_step(trainer: Pretrainer, cfg: Config) -> None:
    side = cfg.data.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (STEP_BATCH, 3, side, side), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, IMAGENET_CLASSES, (STEP_BATCH,), generator=gen)
    trainer.start_epoch(0)
    trainer.train_step([(images, labels)])


def checkpoint_figures(trainer: Pretrainer, cfg: Config, folder: Path, repeats: int) -> dict[str, float]:
    state = TrainState(trainer.state_dict(), 1, 3, cfg.to_dict(), torch.get_rng_state())
    saves, loads = [], []
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        save_state(folder, state)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_state(folder)
        loads.append(time.perf_counter() - t0)
    return {
        "bytes": (folder / STATE_FILE).stat().st_size,
        "save_s": statistics.median(saves),
        "load_s": statistics.median(loads),
    }


def ring_bytes_per_worker(volume: int, workers: int) -> float:
    return 2 * (workers - 1) / workers * volume


IMAGENET_TRAIN = 1_281_167
PAPER_EPOCHS = 300
PAPER_BATCH = 4096
ASSUMPTIONS = ("gpu_img_s", "network_gbit", "storage_gb_s", "usd_per_gpu_hour")


def paper_run(volume: int, ckpt: dict[str, float], workers: int, args: argparse.Namespace) -> dict[str, float]:
    """One paper-scale run on `workers` GPUs under the assumptions in `args` (see the module doc)."""
    steps = IMAGENET_TRAIN // PAPER_BATCH * PAPER_EPOCHS  # drop_last, as the loop does
    compute_s = PAPER_BATCH / (workers * args.gpu_img_s)
    comm_s = ring_bytes_per_worker(volume, workers) / (args.network_gbit * 1e9 / 8)
    ckpt_s = ckpt["save_s"] + ckpt["bytes"] / (args.storage_gb_s * 1e9)
    wall_s = steps * (compute_s + comm_s) + PAPER_EPOCHS * ckpt_s
    gpu_hours = workers * wall_s / 3600
    return {
        "per_worker_batch": PAPER_BATCH / workers,
        "compute_ms": 1e3 * compute_s,
        "allreduce_ms": 1e3 * comm_s,
        "checkpoint_s": ckpt_s,
        "wall_h": wall_s / 3600,
        "wall_h_full_overlap": (steps * max(compute_s, comm_s) + PAPER_EPOCHS * ckpt_s) / 3600,
        "gpu_hours": gpu_hours,
        "usd": gpu_hours * args.usd_per_gpu_hour,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--workers", nargs="+", type=int, default=[8, 32, 64, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=str(REPO / "outputs" / "scaling"), help="where the checkpoints are written")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--gpu-img-s", type=float, default=1000.0, help="ASSUMED images/s of one GPU for the BYOL step")
    p.add_argument("--network-gbit", type=float, default=100.0, help="ASSUMED network bandwidth per worker, Gbit/s")
    p.add_argument("--storage-gb-s", type=float, default=1.0, help="ASSUMED shared-storage write bandwidth, GB/s")
    p.add_argument("--usd-per-gpu-hour", type=float, default=3.0, help="ASSUMED price of a GPU-hour, USD")
    args = p.parse_args(argv)
    figures: dict[str, Any] = {}
    for backbone in args.backbones:
        cfg = paper_config(backbone)
        trainer = build_replica(cfg)
        one_step(trainer, cfg)
        counts = synchronised(trainer)
        volume = sum(counts.values()) * FP32_BYTES
        ckpt = checkpoint_figures(trainer, cfg, Path(args.dir) / backbone, args.repeats)
        figures[backbone] = {
            "parameters": {**counts, "total": sum(counts.values())},
            "allreduce_bytes_per_step": volume,
            "ring_bytes_per_worker_per_step": {n: ring_bytes_per_worker(volume, n) for n in args.workers},
            "checkpoint": ckpt,
        }
        mb = 1e6
        print(
            f"{backbone}: all-reduced per step {counts['gradients']:,} gradients + {counts['bn_buffers']:,} BatchNorm "
            f"buffers + {counts['probe_gradients']:,} probe gradients = {sum(counts.values()):,} numbers, "
            f"{volume / mb:.1f} MB in fp32"
        )
        print(
            "  ring all-reduce, MB sent (and received) per worker per step: "
            + ", ".join(f"N={n}: {ring_bytes_per_worker(volume, n) / mb:.1f}" for n in args.workers)
        )
        print(
            f"  checkpoint (TrainState with target network, LARS momentum, probe): {ckpt['bytes'] / mb:.1f} MB, "
            f"save {ckpt['save_s']:.2f} s, load {ckpt['load_s']:.2f} s (median of {args.repeats})"
        )
        del trainer
        shutil.rmtree(Path(args.dir) / backbone, ignore_errors=True)
    last = figures[args.backbones[-1]]
    print(
        f"paper-scale run of {args.backbones[-1]} ({IMAGENET_TRAIN:,} images x {PAPER_EPOCHS} epochs, batch "
        f"{PAPER_BATCH}), ASSUMING {args.gpu_img_s:g} img/s per GPU, {args.network_gbit:g} Gbit/s per worker, "
        f"{args.storage_gb_s:g} GB/s to storage, {args.usd_per_gpu_hour:g} USD per GPU-hour:"
    )
    print("  GPUs | per-GPU batch | compute ms/step | all-reduce ms/step | checkpoint s/epoch | hours (overlapped) "
          "| GPU-hours | USD")  # fmt: skip
    runs = {}
    for n in args.workers:
        r = runs[n] = paper_run(last["allreduce_bytes_per_step"], last["checkpoint"], n, args)
        print(
            f"  {n} | {r['per_worker_batch']:g} | {r['compute_ms']:.1f} | {r['allreduce_ms']:.1f} | "
            f"{r['checkpoint_s']:.2f} | {r['wall_h']:.2f} ({r['wall_h_full_overlap']:.2f}) | {r['gpu_hours']:,.0f} | "
            f"{r['usd']:,.0f}"
        )
    figures["paper_run"] = {"assumptions": {k: getattr(args, k) for k in ASSUMPTIONS}, "by_gpus": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
