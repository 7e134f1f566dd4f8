"""Checkpoint files: everything needed to resume exactly, loaded with ``weights_only=True``.

A checkpoint holds plain tensors, numbers, strings and dicts only (no pickled objects), so loading one
cannot execute code. It records the config it was made with; resuming under a config whose model, data or
schedule differ fails with a message instead of silently training something else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError

STATE_FILE = "state.pt"
# Config sections that must match for a checkpoint to be resumable (run/eval/tracking may change).
# train_subset and steps_per_epoch set the steps per epoch (a change would leave the restored step count
# out of step with the lr/tau schedule); a different optimizer cannot load the saved optimizer state.
_MUST_MATCH = ("model", "data.dataset", "data.image_size", "data.train_subset", "optim.batch_size",
               "optim.epochs", "optim.steps_per_epoch", "optim.optimizer", "optim.accumulate_steps",
               "run.num_workers")


def save_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / STATE_FILE)  # atomic: a crash mid-save never leaves a torn checkpoint
    return d / STATE_FILE


def load_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint_*` folder holding a state file in a Ray Train run folder (Ray names them
    by timestamp, so name order is time order), or None."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def check_compatible(state: dict[str, Any], cfg: Config) -> None:
    """Raise ConfigError when the checkpoint was made with a config that cannot be resumed under `cfg`."""
    saved = Config.from_dict(state["config"]).flat()
    now = cfg.flat()
    diffs = [k for k in now if any(k == m or k.startswith(m + ".") for m in _MUST_MATCH) and saved.get(k) != now[k]]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {now[k]!r}" for k in diffs[:5])
        raise ConfigError(
            f"the checkpoint of run {cfg.run.name!r} was made with a different config ({detail}). "
            f"Resume with the original config, or start a new run with a different run.name."
        )
