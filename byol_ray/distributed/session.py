"""The per-worker loop's session inside a Ray Train worker: rank 0 hands the checkpoint to Ray."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train

from ..config import Config
from ..core.state import CheckpointError, TrainState, load_state, resumable_checkpoint, save_state
from ..training.loop import log, pause_point


class RaySession:
    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def latest_state(self) -> TrainState | None:
        """The state of Ray's latest checkpoint; in storage this node reads directly (a local or shared
        folder), the newest readable one up to it when it is torn (`state.resumable_checkpoint`)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        path = Path(ckpt.path)
        if not (path.is_absolute() and path.is_dir()):  # remote storage (s3://...): downloaded, no fallback
            with ckpt.as_directory() as d:
                try:
                    return load_state(d)
                except Exception as e:  # torch raises several types for a torn file
                    raise CheckpointError(
                        f"Ray's latest checkpoint of this run, {ckpt.path}, cannot be read ({type(e).__name__}: "
                        f"{str(e)[:200]}), and in remote storage the one before it is not looked for. Start the "
                        f"run again under a new run.name."
                    ) from None
        found = resumable_checkpoint(path.parent, newest=path.name)
        assert found is not None  # the folder exists: a state, or CheckpointError
        state, skipped = found
        if self.rank == 0:
            for torn, why in skipped:
                log(f"[resume] the checkpoint {torn} cannot be read ({why}); resuming from the one before it")
        return state

    def report(self, metrics: dict[str, Any], state: TrainState | None = None) -> None:
        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, state)
            if "checkpoint" in (state.config.get("debug", {}).get("pause_at") or []):
                pause_point(Config.from_dict(state.config), self.rank, "checkpoint")  # written, not yet Ray's
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
