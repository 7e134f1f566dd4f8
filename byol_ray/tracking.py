"""The one MLflow writer.

Every MLflow call of the project goes through here, with the tracking URI passed explicitly (Ray actors do
not inherit ``mlflow.set_tracking_uri``), and only one process writes to a run at a time: the driver
creates the run and logs params/tags, rank 0 of the workers logs per-epoch metrics while the driver
waits, and the driver logs the model and artifacts at the end.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .config import Config

RUN_NAME_TAG = "byol_ray.run_name"


class TrackingError(RuntimeError):
    pass


def resolve_tracking_uri(cfg: Config) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the output directory.

    Absolute, because relative SQLite paths resolve against each Ray process's own working directory.
    """
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{cfg.output_dir / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when the tracking server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"the MLflow tracking server {uri} is unreachable ({e}). Start it (byol-ray mlflow-server, "
                f"or mlflow server ...), fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or set "
                f"tracking.enabled=false."
            ) from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow database folder {parent}: {e}") from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(world_size: int) -> dict[str, str]:
    import mlflow
    import ray
    import torch

    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        "world_size": str(world_size),
    }


class Tracker:
    """Writes to one MLflow run, addressed by id; safe to construct in any process."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)

    @classmethod
    def start(cls, cfg: Config, tags: dict[str, str] | None = None, parent_run_id: str = "",
              run_name: str = "") -> "Tracker":
        """Create a new run in the config's experiment, with the resolved config as params."""
        uri = resolve_tracking_uri(cfg)
        client = _client(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        all_tags = {RUN_NAME_TAG: cfg.run.name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, tags=all_tags, run_name=run_name or cfg.run.name)
        t = cls(uri, run.info.run_id)
        t.log_params(cfg.flat())
        return t

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model, name: str = "encoder", input_example=None) -> str:
        """The trained encoder as an MLflow PyTorch model; returns its model URI."""
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            # pt2 (torch.export) rather than pickle: loading it back cannot run arbitrary code.
            info = mlflow.pytorch.log_model(model, name=name, input_example=input_example,
                                            serialization_format="pt2")
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


def find_run_by_name(cfg: Config, unfinished_only: bool = False) -> str:
    """The id of the newest run of this experiment with our run-name tag ('' if none); with
    `unfinished_only`, only a run that did not finish (its driver died, or it failed), to resume it."""
    client = _client(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return ""
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or (unfinished_only and runs[0].info.status == "FINISHED"):
        return ""
    return runs[0].info.run_id
