"""The trained encoder as an MLflow model: where a model URI's run is, and loading its weights back."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import UserError
from .client import client, mlflow_errors, tracking_uri_scope


def model_requirements() -> list[str]:
    """The pip requirements of a logged encoder, stated rather than inferred. MLflow infers them by loading
    the model in a subprocess, which costs seconds per run; a torch.export (pt2) graph needs torch to load
    and numpy for its input example, nothing of this package. The local build label (`+cu130`) is dropped:
    any build of the same torch version loads the graph, and MLflow warns about a mismatch otherwise."""
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("torch", "numpy")]


def model_run_id(c, uri: str) -> str:
    """The run that logged the model behind runs:/<id>/..., models:/m-<id>, models:/<name>/<version|@alias>."""
    m = re.match(r"^runs:/([^/]+)/", uri)
    if m:
        return m.group(1)
    m = re.match(r"^models:/([^/@]+)(?:/([^/]+)|@(.+))?$", uri)
    if not m:
        raise UserError(f"--encoder {uri}: not a checkpoint folder nor a runs:/ or models:/ MLflow URI")
    name, version, alias = m.groups()
    if version is None and alias is None:  # MLflow 3 logged model id (what log_model returns)
        return c.get_logged_model(name).source_run_id
    mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    return mv.run_id


def model_source(model_uri: str, tracking_uri: str) -> tuple[str, dict[str, Any]]:
    """(the run that logged the model, that run's config.json) for an encoder logged by a pretraining."""
    c = client(tracking_uri)
    try:
        run_id = model_run_id(c, model_uri)
        config = json.loads(Path(c.download_artifacts(run_id, "config.json")).read_text())
    except mlflow_errors() as e:
        raise UserError(
            f"--encoder {model_uri}: cannot find this model or its run's config.json in the MLflow store "
            f"{tracking_uri} ({str(e).splitlines()[0]}). Check the URI and --tracking-uri."
        ) from None
    return run_id, config


def load_model_weights(model_uri: str, tracking_uri: str) -> dict:
    """The bare encoder's state dict of a logged encoder (a torch.export pt2 graph, loaded without pickle)."""
    import mlflow.pytorch

    with tracking_uri_scope(tracking_uri):  # load_model has no tracking_uri argument
        return encoder_weights(mlflow.pytorch.load_model(model_uri).state_dict())


def encoder_weights(state_dict: dict) -> dict:
    """The encoder's weights from a served model's state dict (the encoder under `encoder.`, with the
    evaluation transform in front), or from a bare encoder's, as models logged before serving were."""
    prefix = "encoder."
    if any(k.startswith(prefix) for k in state_dict):
        return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict
