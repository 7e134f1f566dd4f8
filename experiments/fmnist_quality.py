"""BYOL on Fashion-MNIST in-process (no Ray, no MLflow): pretraining through `loop.pretrain`, then the
end-of-run evaluation (linear probe and kNN of BYOL's encoder against an untrained encoder and raw
pixels). Run by experiments/gpu_check.sh; prints and writes the table, the wall time and the images/s.

    python experiments/fmnist_quality.py OUT.json --config experiments/fmnist.yaml [section.key=value ...]

The data files are read from ``data.root`` (the IDX .gz files; nothing is downloaded).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from byol_ray.config import load_config
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession


def main(argv: list[str]) -> int:
    out_path, rest = Path(argv[0]), argv[1:]
    if len(rest) < 2 or rest[0] != "--config":
        print(__doc__)
        return 2
    cfg = load_config(rest[1], rest[2:] + ["tracking.enabled=false"])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as ckpt:
        session = LocalSession(ckpt, keep=1)
        out = pretrain(cfg, session)
    wall = time.time() - t0
    train = [r for r in session.reports]
    pretrain_s = sum(r["epoch_seconds"] for r in train)
    res = {
        "config": cfg.to_dict(),
        "wall_seconds": wall,
        "pretraining_seconds": pretrain_s,
        "epochs": len(train),
        "images_per_s_last_epoch": train[-1]["images_per_s"] if train else 0.0,
        "loss_per_epoch": [r["loss"] for r in train],
        "online_probe_acc_per_epoch": [r.get("online_probe_acc") for r in train],
        "eval_rows": [r.__dict__ for r in out["eval_rows"]],
    }
    out_path.write_text(json.dumps(res, indent=2))
    print(f"[quality] {len(train)} epochs, {pretrain_s:.0f} s of pretraining, {wall:.0f} s in all")
    print("| encoder | linear top-1 (%) | kNN top-1 (%) |\n|---|---:|---:|")
    for r in out["eval_rows"]:
        print(f"| {r.name} | {r.linear_top1:.2f} | {r.knn_top1:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
