"""Where the per-worker loop reports to. The loop calls ``report(metrics, state)`` once per epoch on every
worker (Ray's report is a barrier) and ``latest_state()`` once at start; nothing else in the loop knows
whether it runs in-process (`LocalSession`, here) or in a Ray Train worker (``distributed.session``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

from ..core.state import TrainState, load_state, save_state


class Session(Protocol):
    rank: int
    world_size: int
    local_rank: int

    def latest_state(self) -> TrainState | None: ...
    def report(self, metrics: dict[str, Any], state: TrainState | None = None) -> None: ...


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

    def latest_state(self) -> TrainState | None:
        ckpts = self._checkpoints()
        return load_state(ckpts[-1]) if ckpts else None

    def report(self, metrics: dict[str, Any], state: TrainState | None = None) -> None:
        self.reports.append(dict(metrics))
        if state is not None:
            save_state(self.dir / f"checkpoint_{state.epoch:06d}", state)
            for old in self._checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
