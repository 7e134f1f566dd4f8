"""Trainings packed onto one GPU as a sweep packs its trials (run.gpus_per_worker=0.25: four one-worker
trials per GPU, each its own process): each packed training's images/s against the same training alone.
Run by experiments/gpu_check.sh.

    python experiments/gpu_packing_check.py OUT.json --config experiments/fmnist.yaml [--copies 4]
        [--device cuda|cpu] [section.key=value ...]

Every training is `loop.pretrain` with a `LocalSession` in a process of its own (no Ray, no MLflow), on
the config as loaded with, for --device cuda (the default), its `on_gpu` recipe applied, as a sweep's
trial gets it; the command line's keys win over the recipe. First one training alone, then --copies of
it started at once. --device cpu runs the same on CPUs (no recipe), to check this script without a GPU.

What is compared: images/s over the epochs after each training's first (which includes the start-up:
cuDNN autotuning, allocator warm-up); for the packed trainings only the epochs that ran while every
copy was past its first epoch and none had ended, so every figure is one of four at once. "overlapped"
says whether each copy had such an epoch. Give enough epochs (4 or more) for that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from byol_ray.config import Config, apply_gpu_recipe, load_config
from byol_ray.core.state import TrainState
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession


class StampedSession(LocalSession):
    """A `LocalSession` that also records when each epoch's report came (wall-clock, comparable across
    processes on one machine) and keeps no checkpoints."""

    def report(self, metrics: dict[str, Any], state: TrainState | None = None) -> None:
        super().report({**metrics, "reported_at": time.time()}, None)


def train(cfg_path: Path, out_path: Path) -> None:
    """One training (a child process): its epochs' end times, lengths and images/s to `out_path`."""
    cfg = Config.from_dict(json.loads(cfg_path.read_text()))
    with tempfile.TemporaryDirectory() as ckpt:
        session = StampedSession(ckpt)
        pretrain(cfg, session)
    epochs = [
        {"end": r["reported_at"], "seconds": r["epoch_seconds"], "images_per_s": r["images_per_s"]}
        for r in session.reports
    ]
    out_path.write_text(json.dumps(epochs))


def run_at_once(copies: int, cfg_path: Path, work: Path, tag: str) -> list[list[dict[str, float]]]:
    """`copies` trainings started together as processes; each one's epochs."""
    outs = [work / f"{tag}-{i}.json" for i in range(copies)]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(cfg_path), str(out)]) for out in outs]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"{tag}: training process exit codes {codes}")
    return [json.loads(out.read_text()) for out in outs]


def rate(epochs: list[dict[str, float]]) -> float:
    """Images/s over these epochs: images over seconds, so a longer epoch weighs more."""
    seconds = sum(e["seconds"] for e in epochs)
    return sum(e["images_per_s"] * e["seconds"] for e in epochs) / seconds if seconds else 0.0


def while_all_ran(runs: list[list[dict[str, float]]]) -> tuple[list[list[dict[str, float]]], bool]:
    """Each run's epochs after its first that lay wholly inside the window where every run was past its
    first epoch and none had ended; where a run has none, its epochs after the first (and False)."""
    start = max(r[0]["end"] for r in runs)
    end = min(r[-1]["end"] for r in runs)
    inside = [[e for e in r[1:] if e["end"] - e["seconds"] >= start and e["end"] <= end] for r in runs]
    overlapped = all(inside)
    return [ins or r[1:] or r for ins, r in zip(inside, runs)], overlapped


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        train(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) < 3 or argv[1] != "--config":
        print(__doc__)
        return 2
    out_path, config, rest = Path(argv[0]), argv[2], argv[3:]
    copies, device, overrides = 4, "cuda", []
    it = iter(rest)
    for a in it:
        if a == "--copies":
            copies = int(next(it))
        elif a == "--device":
            device = next(it)
        else:
            overrides.append(a)
    if device not in ("cuda", "cpu"):
        print(f"--device must be cuda or cpu, got {device!r}")
        return 2
    cfg = load_config(config, [*overrides, "tracking.enabled=false"])
    cfg = apply_gpu_recipe(cfg, "cuda") if device == "cuda" else cfg.replace({"run.device": "cpu"})

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg_path = work / "config.json"
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        alone_runs = run_at_once(1, cfg_path, work, "alone")
        packed_runs = run_at_once(copies, cfg_path, work, "packed")
    alone = rate(alone_runs[0][1:] or alone_runs[0])
    counted, overlapped = while_all_ran(packed_runs)
    each = [rate(c) for c in counted]
    ratios = [x / alone for x in each]
    res = {
        "device": device,
        "copies": copies,
        "config": cfg.to_dict(),
        "images_per_s_alone": alone,
        "images_per_s_each": each,
        "images_per_s_sum": sum(each),
        "each_over_alone": ratios,
        "sum_over_alone": sum(each) / alone,
        "overlapped": overlapped,
        "epochs_alone": alone_runs[0],
        "epochs_packed": packed_runs,
    }
    out_path.write_text(json.dumps(res, indent=2))
    print(
        f"[packing] {copies} at once on one {device} device: "
        + ", ".join(f"{x:,.0f}" for x in each)
        + f" img/s each ({sum(each):,.0f} in all) against {alone:,.0f} img/s alone: each at "
        f"{min(ratios):.2f}-{max(ratios):.2f} of alone, all together "
        f"{res['sum_over_alone']:.2f}x" + ("" if overlapped else " (some copies never ran an epoch with all others)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
