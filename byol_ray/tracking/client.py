"""The MLflow client, experiments, and MLflow's process-wide settings kept to the calls that need them.

MLflow reads its tracking URI and HTTP retry settings from process-wide state (``mlflow.set_tracking_uri``
exports ``MLFLOW_TRACKING_URI``; the retry settings are environment variables). Nothing here changes
that state for good: the few fluent-API calls that have no ``tracking_uri`` argument run inside
`tracking_uri_scope`, and the short-retry calls inside `short_http`, both of which restore what was there.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from .uri import artifacts_at_risk, redact, sqlite_path

# One try, 10 s at most, instead of MLflow's default of 7 retries with exponential back-off and a 120 s
# timeout: for calls that must not stall training (or an error on its way up) while a server is down.
_SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def client(uri: str):
    """An MlflowClient bound to `uri` (Ray actors do not inherit a tracking URI set elsewhere)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# Marks an experiment as model training for MLflow 3's UI (its "Model training" rather than GenAI view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(c, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created with `artifact_location` (`uri.artifact_root` of the store;
    None: the store's default) if it does not exist yet, marked as model training. Warns when its
    artifacts would be lost."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        exp = c.get_experiment(
            c.create_experiment(name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        )
    elif EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag was set, or by someone else
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    warn_if_artifacts_at_risk(exp, c.tracking_uri, artifact_location)
    return exp.experiment_id


_warned: set[tuple[str, str]] = set()


def warn_if_artifacts_at_risk(exp, uri: str, artifact_location: str | None) -> None:
    """Once per process and experiment: a paragraph on stderr when the experiment keeps its artifacts in a
    relative or temporary folder (made before byol-ray chose the location itself), with how to move on."""
    why = artifacts_at_risk(exp.artifact_location, uri)
    if not why or (uri, exp.name) in _warned:
        return
    _warned.add((uri, exp.name))
    fresh = f" (its artifacts will go to {artifact_location})" if artifact_location else ""
    repoint = ""
    if (db := sqlite_path(uri)) is not None and artifact_location:
        repoint = (
            f" Or keep the experiment and send its new runs' artifacts beside the store: sqlite3 {db} "
            f"\"UPDATE experiments SET artifact_location='{artifact_location}' WHERE name='{exp.name}'\"."
        )
    print(
        f"byol-ray: warning: MLflow experiment {exp.name!r} in {redact(uri)} keeps its artifacts in "
        f"{exp.artifact_location}, {why}: the config, evaluation tables and models logged to its runs are lost "
        f"with that folder (those of earlier runs may be gone already; metrics and params are in the store). "
        f"To move on, log to a new experiment with tracking.experiment={exp.name}-2{fresh}.{repoint}",
        file=sys.stderr,
        flush=True,
    )


def delivery_errors() -> tuple[type[BaseException], ...]:
    """What a call to an unreachable or failing tracking server (or a locked SQLite file) raises."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, OSError)


def mlflow_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises for a missing run, model or artifact."""
    from mlflow.exceptions import MlflowException

    return (MlflowException,)


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def short_http() -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP calls inside make one short try (MLflow reads these settings on every request)."""
    return _env(_SHORT_HTTP)


@contextlib.contextmanager
def tracking_uri_scope(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` inside the block only; what was there before is restored."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI
    try:
        yield
    finally:
        # None returns MLflow to reading the environment (and unsets the variable), which then gets
        # back its previous value.
        # MLflow handles None (see above) but annotates the argument as str | Path only.
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous
