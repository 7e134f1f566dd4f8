"""The per-worker loop's session inside a Ray Train worker: rank 0 hands the checkpoint to Ray."""

from __future__ import annotations

import tempfile
from typing import Any

import ray.train

from ..core.state import TrainState, load_state, save_state


class RaySession:
    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def latest_state(self) -> TrainState | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict[str, Any], state: TrainState | None = None) -> None:
        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
