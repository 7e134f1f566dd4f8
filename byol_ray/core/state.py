"""Checkpoint state: the typed object a checkpoint holds, its one writer and one reader.

A checkpoint file holds plain tensors, numbers, strings and dicts only (no pickled objects) and is loaded
with ``weights_only=True``, so loading one cannot execute code. It records the config it was made with;
resuming under a config whose model, data or schedule differ fails with a message instead of silently
training something else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError
from ..errors import UserError
from .model import OnlineNetwork

STATE_FILE = "state.pt"
# Config sections that must match for a checkpoint to be resumable (run/eval/tracking may change, the
# number of workers too: the global batch and the step count do not depend on it, and the state loads
# into a group of any size). train_subset and steps_per_epoch set the steps per epoch (a change would
# leave the restored step count out of step with the lr/tau schedule); a different optimizer cannot load
# the saved optimizer state.
_MUST_MATCH = (
    "model",
    "data.dataset",
    "data.image_size",
    "data.train_subset",
    "optim.batch_size",
    "optim.epochs",
    "optim.steps_per_epoch",
    "optim.optimizer",
    "optim.accumulate_steps",
)


@dataclass
class TrainState:
    """Everything needed to resume a run exactly at an epoch boundary, and to rebuild its encoder."""

    trainer: dict[str, Any]  # Pretrainer.state_dict(): networks, optimiser, probe, step
    epoch: int  # epochs completed
    in_channels: int  # of the encoder's input
    config: dict[str, Any]  # Config.to_dict() of the run that made it
    rng: torch.Tensor  # torch's CPU generator state
    restarts: int = 0
    mlflow_run_id: str = ""
    collapsed: bool = False  # the run stopped for good on a collapsed representation
    plan: dict[str, Any] = field(default_factory=dict)  # training.plan.StepPlan: total steps, budget
    world_size: int = 0  # workers of the group that wrote it (0: unknown, a state from before it was kept)

    def to_file_dict(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer,
            "epoch": self.epoch,
            "in_channels": self.in_channels,
            "config": self.config,
            "rng": {"torch": self.rng},
            "restarts": self.restarts,
            "mlflow_run_id": self.mlflow_run_id,
            "collapsed": self.collapsed,
            "plan": self.plan,
            "world_size": self.world_size,
        }

    @classmethod
    def from_file_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            trainer=d["trainer"],
            epoch=int(d["epoch"]),
            in_channels=int(d["in_channels"]),
            config=d["config"],
            rng=d["rng"]["torch"],
            restarts=int(d.get("restarts", 0)),
            mlflow_run_id=str(d.get("mlflow_run_id", "")),
            collapsed=bool(d.get("collapsed", False)),
            plan=dict(d.get("plan") or {}),
            world_size=int(d.get("world_size", 0)),
        )


def save_state(directory: str | os.PathLike, state: TrainState) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (STATE_FILE + ".tmp")
    torch.save(state.to_file_dict(), tmp)
    os.replace(tmp, d / STATE_FILE)  # atomic: a crash mid-save never leaves a torn checkpoint
    return d / STATE_FILE


def load_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    return TrainState.from_file_dict(torch.load(path, map_location=map_location, weights_only=True))


class CheckpointError(UserError):
    """A run has checkpoints, but none of them can be read."""


def resumable_checkpoint(
    run_dir: str | os.PathLike, newest: str = ""
) -> tuple[TrainState, list[tuple[Path, str]]] | None:
    """The newest checkpoint of a Ray Train run folder that loads, and the newer ones passed over because
    they could not be (each with why); None when the folder has no checkpoint. `newest` (a checkpoint
    folder name) ignores later ones: those Ray never registered.

    A checkpoint is written atomically, but a disk can still tear or lose one. Falling back to the one
    before it (Ray keeps run.keep_checkpoints of them) resumes the run instead of leaving it stuck: Ray's
    run folder remembers every checkpoint it registered, so deleting the torn folder by hand would not."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and (not newest or p.name <= newest))
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            return load_state(path), skipped
        except Exception as e:  # a torn or foreign file: torch raises several types
            skipped.append((path, f"{type(e).__name__}: {str(e)[:200]}"))
    if skipped:
        raise CheckpointError(
            f"none of its {len(skipped)} checkpoint(s) in {run_dir} can be read (the newest, {skipped[0][0].name}: "
            f"{skipped[0][1]}). Start the run again under a new run.name; this folder can then be deleted."
        )
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint_*` folder holding a state file in a Ray Train run folder (Ray names them
    by timestamp, so name order is time order), or None."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def check_compatible(state: TrainState, cfg: Config) -> None:
    """Raise ConfigError when the checkpoint was made with a config that cannot be resumed under `cfg`."""
    saved = Config.from_dict(state.config).flat()
    now = cfg.flat()
    diffs = [k for k in now if any(k == m or k.startswith(m + ".") for m in _MUST_MATCH) and saved.get(k) != now[k]]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {now[k]!r}" for k in diffs[:5])
        raise ConfigError(
            f"the checkpoint of run {cfg.run.name!r} was made with a different config ({detail}). "
            f"Resume with the original config, or start a new run with a different run.name."
        )


def encoder_from_state(state: TrainState) -> nn.Module:
    """The trained online encoder of a checkpoint, rebuilt from its own config, in eval mode."""
    online = OnlineNetwork(Config.from_dict(state.config).model, state.in_channels)
    online.load_state_dict(state.trainer["online"])
    return online.encoder.eval()
