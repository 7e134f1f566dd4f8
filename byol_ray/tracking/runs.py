"""Finding runs in a store: a training run by its name, a sweep's parent and children, child runs as a
DataFrame. The tags that give runs these roles are defined here, once."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserError
from .client import client, mlflow_errors, tracking_uri_scope

SWEEP_TAG = "byol_ray.sweep"
ROLE_TAG = "byol_ray.role"
VARIANT_TAG = "byol_ray.variant"
SEED_TAG = "byol_ray.seed"
ABLATION_TAG = "byol_ray.ablation"
PARENT_TAG = "mlflow.parentRunId"


def find_sweep_parent(c, experiment_id: str, sweep_name: str):
    """The newest parent run of sweep `sweep_name` in the experiment, or None."""
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def sweep_parent_id(uri: str, experiment: str, sweep_name: str) -> str:
    """The newest parent run id of a sweep, or a UserError that says how to make one."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    run = find_sweep_parent(c, exp.experiment_id, sweep_name) if exp else None
    if run is None:
        raise UserError(
            f"no sweep {sweep_name!r} in the MLflow store {uri} (experiment {experiment!r}). Run "
            f"`byol-ray sweep {sweep_name}` first, or point at the store the sweep wrote to with the "
            f"same overrides (run.output_dir=..., tracking.tracking_uri=...)."
        )
    return run.info.run_id


def child_runs(c, parent_run_id: str, filter_string: str = "") -> list:
    """The runs whose parent is `parent_run_id` (as MLflow Run objects), with an extra filter."""
    exp_id = c.get_run(parent_run_id).info.experiment_id
    f = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and {filter_string}" if filter_string else "")
    return c.search_runs([exp_id], filter_string=f)


def child_runs_frame(uri: str, parent_run_id: str) -> pd.DataFrame:
    """The child runs as `mlflow.search_runs` returns them (params.*, metrics.*, tags.* columns)."""
    import mlflow

    exp_id = client(uri).get_run(parent_run_id).info.experiment_id
    with tracking_uri_scope(uri):  # search_runs has no tracking_uri argument
        return mlflow.search_runs(experiment_ids=[exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def run_experiment(uri: str, run_id: str) -> tuple[str, str] | None:
    """(run id, experiment name) of a run in the store, or None when the store does not hold it."""
    c = client(uri)
    try:
        run = c.get_run(run_id)
        return run.info.run_id, c.get_experiment(run.info.experiment_id).name
    except mlflow_errors():
        return None


def download_json(uri: str, run_id: str, artifact_path: str) -> Any:
    """A JSON artifact of a run, parsed."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as d:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=d, tracking_uri=uri
        )
        return json.loads(Path(local).read_text())
