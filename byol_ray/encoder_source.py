"""Where an encoder to evaluate comes from: a Ray Train checkpoint or an MLflow model, and the baseline.

``--encoder`` is a checkpoint directory (or the run folder holding them: the newest is used) or an MLflow
model URI (``runs:/<id>/encoder``, ``models:/...``) logged by the pretraining driver. Resolving finds the
pretraining config and MLflow run id (and fails on bad input) before any evaluation work, in the
process that parses the arguments; loading, possibly in a Ray task, gives a trainable module either
way, so every protocol can fine-tune it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import UserError
from .tracking import check_reachable, resolve_tracking_uri


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
    from .checkpoint import STATE_FILE, latest_checkpoint, load_state

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
    cfg = Config.from_dict(state["config"])
    # <output_dir>/ray_results/<name>/checkpoint_*: evaluations land next to the pretraining run.
    default_out = d.parent.parent.parent if d.parent.parent.name == "ray_results" else cfg.output_dir
    out = Path(output_dir).resolve() if output_dir else default_out
    uri = tracking_uri or _default_uri(cfg, out)
    return EncoderRef(spec, "checkpoint", str(d), cfg.to_dict(), str(state.get("mlflow_run_id", "")), uri, str(out))


def _default_uri(cfg: Config, out: Path) -> str:
    return resolve_tracking_uri(cfg.replace({"run.output_dir": str(out), "tracking.tracking_uri": ""}))


def _resolve_mlflow(uri: str, tracking_uri: str, output_dir: str) -> EncoderRef:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    out = Path(output_dir or Config().run.output_dir).resolve()
    tracking = tracking_uri or resolve_tracking_uri(Config().replace({"run.output_dir": str(out)}))
    check_reachable(tracking)
    client = MlflowClient(tracking_uri=tracking)
    try:
        run_id = _model_run_id(client, uri)
        cfg_path = client.download_artifacts(run_id, "config.json")
    except MlflowException as e:
        raise UserError(
            f"--encoder {uri}: cannot find this model or its run's config.json in the MLflow store "
            f"{tracking} ({str(e).splitlines()[0]}). Check the URI and --tracking-uri."
        ) from None
    cfg = Config.from_dict(json.loads(Path(cfg_path).read_text()))
    return EncoderRef(uri, "mlflow", uri, cfg.to_dict(), run_id, tracking, str(out))


def _model_run_id(client, uri: str) -> str:
    """The run that logged the model behind runs:/<id>/..., models:/m-<id>, models:/<name>/<version|@alias>."""
    m = re.match(r"^runs:/([^/]+)/", uri)
    if m:
        return m.group(1)
    m = re.match(r"^models:/([^/@]+)(?:/([^/]+)|@(.+))?$", uri)
    if not m:
        raise UserError(f"--encoder {uri}: not a checkpoint folder nor a runs:/ or models:/ MLflow URI")
    name, version, alias = m.groups()
    if version is None and alias is None:  # MLflow 3 logged model id (what log_model returns)
        return client.get_logged_model(name).source_run_id
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return mv.run_id


def load_encoder(ref: EncoderRef):
    """(the pretrained encoder as a trainable module, its input channels)."""
    from .model import OnlineNetwork, build_encoder

    cfg = Config.from_dict(ref.config)
    if ref.kind == "checkpoint":
        from .checkpoint import load_state

        state = load_state(ref.location)
        channels = int(state["in_channels"])
        online = OnlineNetwork(cfg.model, channels)
        online.load_state_dict(state["trainer"]["online"])
        return online.encoder.eval(), channels
    import mlflow.pytorch

    os.environ["MLFLOW_TRACKING_URI"] = ref.tracking_uri  # load_model reads the store from here
    graph = mlflow.pytorch.load_model(ref.location)
    weights = graph.state_dict()
    channels = int(weights["conv1.weight"].shape[1])
    # The logged pt2 graph runs in eval mode only (torch.export); the same weights in the module the
    # config describes can also be fine-tuned.
    encoder = build_encoder(cfg.model, channels)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"--encoder {ref.source}: its weights do not fit the encoder of its run's "
                        f"config.json ({str(e).splitlines()[0]})") from None
    return encoder.eval(), channels


def untrained_encoder(cfg: Config, channels: int, seed: int, device):
    """The baseline: the pretrained encoder's architecture with a seeded random init."""
    import torch

    from .model import build_encoder

    torch.manual_seed(seed)
    return build_encoder(cfg.model, channels).to(device)
