"""Where an encoder to evaluate comes from: a Ray Train checkpoint or an MLflow model, and the baseline.

``--encoder`` is a checkpoint directory (or the run folder holding them: the newest is used) or an MLflow
model URI (``runs:/<id>/encoder``, ``models:/...``) logged by the pretraining driver. Resolving finds the
pretraining config and MLflow run id (and fails on bad input) before any evaluation work, in the
process that parses the arguments; loading, possibly in a Ray task, gives a trainable module either
way, so every protocol can fine-tune it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..core.model import build_encoder
from ..core.state import STATE_FILE, encoder_from_state, latest_checkpoint, load_state
from ..errors import UserError
from ..tracking.models import load_model_weights, model_source
from ..tracking.uri import check_reachable, resolve_tracking_uri


@dataclass
class EncoderRef:
    """Where an encoder comes from and what it was trained with; plain data, so it can go to a Ray task."""

    source: str  # as the user gave it
    kind: str  # "checkpoint" | "mlflow"
    location: str  # checkpoint directory, or model URI
    config: dict  # the pretraining config
    parent_run_id: str  # the pretraining MLflow run ('' if unknown)
    tracking_uri: str
    output_dir: str


def resolve_encoder(spec: str, tracking_uri: str = "", output_dir: str = "") -> EncoderRef:
    """Locate the encoder and its pretraining config and run id (cheap: weights are loaded later)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:/", spec) and not Path(spec).exists():
        return _resolve_mlflow(spec, tracking_uri, output_dir)
    return _resolve_checkpoint(spec, tracking_uri, output_dir)


def _resolve_checkpoint(spec: str, tracking_uri: str, output_dir: str) -> EncoderRef:
    d = Path(spec).expanduser().resolve()
    if d.is_dir() and not (d / STATE_FILE).is_file():
        d = latest_checkpoint(d) or d  # a run folder: its newest checkpoint
    if not (d / STATE_FILE).is_file():
        raise UserError(
            f"--encoder {spec}: no {STATE_FILE} there and no checkpoint_* folder holding one. Pass a "
            f"checkpoint directory (<output_dir>/ray_results/<run name>/checkpoint_*), the run folder "
            f"above them, or an MLflow model URI (runs:/<run id>/encoder)."
        )
    state = load_state(d)
    cfg = Config.from_dict(state.config)
    # <output_dir>/ray_results/<name>/checkpoint_*: evaluations land next to the pretraining run.
    default_out = d.parent.parent.parent if d.parent.parent.name == "ray_results" else cfg.output_dir
    out = Path(output_dir).resolve() if output_dir else default_out
    uri = tracking_uri or _default_uri(cfg, out)
    return EncoderRef(spec, "checkpoint", str(d), cfg.to_dict(), state.mlflow_run_id, uri, str(out))


def _default_uri(cfg: Config, out: Path) -> str:
    return resolve_tracking_uri(cfg.replace({"run.output_dir": str(out), "tracking.tracking_uri": ""}))


def _resolve_mlflow(uri: str, tracking_uri: str, output_dir: str) -> EncoderRef:
    out = Path(output_dir or Config().run.output_dir).resolve()
    tracking = tracking_uri or resolve_tracking_uri(Config().replace({"run.output_dir": str(out)}))
    check_reachable(tracking)
    run_id, config = model_source(uri, tracking)
    cfg = Config.from_dict(config)
    return EncoderRef(uri, "mlflow", uri, cfg.to_dict(), run_id, tracking, str(out))


def load_encoder(ref: EncoderRef):
    """(the pretrained encoder as a trainable module, its input channels)."""
    if ref.kind == "checkpoint":
        state = load_state(ref.location)
        return encoder_from_state(state), state.in_channels
    weights = load_model_weights(ref.location, ref.tracking_uri)
    channels = int(weights["conv1.weight"].shape[1])
    # The logged pt2 graph runs in eval mode only (torch.export); the same weights in the module the
    # config describes can also be fine-tuned.
    encoder = build_encoder(Config.from_dict(ref.config).model, channels)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(
            f"--encoder {ref.source}: its weights do not fit the encoder of its run's "
            f"config.json ({str(e).splitlines()[0]})"
        ) from None
    return encoder.eval(), channels


def untrained_encoder(cfg: Config, channels: int, seed: int, device):
    """The baseline: the pretrained encoder's architecture with a seeded random init."""
    torch.manual_seed(seed)
    return build_encoder(cfg.model, channels).to(device)
