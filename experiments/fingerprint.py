"""A behaviour fingerprint for refactors: one short fixed-seed pretraining, in-process, printed in full.

Run it before and after a change that should not alter behaviour and compare the two outputs with `diff`:
every metric the run logs (to full float precision), the final evaluation rows, a hash of the final online
and target weights, and a hash of one batch of augmented views.

    .venv/bin/python experiments/fingerprint.py before.json   # then again after the change, and diff

Timings (epoch seconds, images/s, the warm-up's speed) differ between any two runs and are left out.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from typing import Any

import torch

from byol_ray.config import load_config
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession

OVERRIDES = [
    "data.train_subset=1024",
    "data.test_subset=512",
    "optim.epochs=2",
    "optim.steps_per_epoch=4",
    "optim.batch_size=64",
    "optim.time_budget_minutes=0",
    "eval.linear_epochs=5",
    "eval.knn_k=20",
    "run.num_workers=1",
    "run.torch_threads=2",
    "tracking.enabled=false",
    "run.seed=0",
]


class RecordingTracker:
    """Keeps every logged metric and param, in order."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, Any]]] = []
        self.params: dict[str, Any] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, {k: metrics[k] for k in sorted(metrics)}))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.params.update({f"tag:{k}": v for k, v in tags.items()})


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


TIMINGS = ("epoch_seconds", "images_per_s", "plan.warmup_images_per_s")


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: fingerprint.py OUT.json [CONFIG [key=value ...]]")
    out_path, config = argv[0], argv[1] if len(argv) > 1 else "experiments/fmnist.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*OVERRIDES, f"run.output_dir={tmp}", *argv[2:]])
        tracker = RecordingTracker()
        out = pretrain(cfg, LocalSession(f"{tmp}/ckpt"), tracker=tracker)
    trainer = out["trainer"]
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = trainer.views.both(images, torch.Generator().manual_seed(1))
    result = {
        "metrics": [[step, {k: repr(v) for k, v in m.items() if k not in TIMINGS}] for step, m in tracker.metrics],
        "params": {k: repr(v) for k, v in sorted(tracker.params.items()) if k not in TIMINGS},
        "eval_rows": [repr(r) for r in out["eval_rows"]],
        "online": tensor_hash(dict(trainer.online.state_dict())),
        "target": tensor_hash(dict(trainer.target.state_dict())),
        "views": tensor_hash({"views": views}),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
