"""Where the per-worker loop reports to: in-process (tests, laptops) or a Ray Train worker.

The loop calls ``report(metrics, state)`` once per epoch on every worker (Ray's report is a barrier) and
``latest_state()`` once at start; nothing else in the loop knows which of the two it runs under.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import load_state, save_state


class LocalSession:
    """Single process; checkpoints in ``<dir>/checkpoint_<epoch>``, keeping the newest `keep`."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, checkpoint_dir: str | Path, keep: int = 2):
        self.dir = Path(checkpoint_dir)
        self.keep = keep
        self.reports: list[dict[str, Any]] = []

    def _checkpoints(self) -> list[Path]:
        return sorted(self.dir.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))

    def latest_state(self) -> dict[str, Any] | None:
        ckpts = self._checkpoints()
        return load_state(ckpts[-1]) if ckpts else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        self.reports.append(dict(metrics))
        if state is not None:
            save_state(self.dir / f"checkpoint_{int(state['epoch']):06d}", state)
            for old in self._checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)


class RaySession:
    """Inside a Ray Train worker: rank 0 hands the checkpoint to ``ray.train.report``."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def latest_state(self) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        import ray.train

        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
