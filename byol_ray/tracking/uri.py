"""Tracking-store URIs: resolving, masking secrets, and checking that a store answers (no mlflow import)."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError


class TrackingError(UserError):
    """The tracking store cannot be reached or did not take what was sent; the message says what to do."""


_URI_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def redact(value: Any) -> Any:
    """Mask the password of any `scheme://user:password@host` in a string (a tracking URI, a database
    URI); other values unchanged. Applied to everything logged as params or written as config."""
    if isinstance(value, str):
        return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def absolute_store_uri(uri: str) -> str:
    """`sqlite:///x.db` made absolute: a relative path resolves against each process's working directory
    (every Ray worker has its own), or wherever a server happened to be started."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def resolve_tracking_uri(cfg: Config) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the output directory."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{cfg.output_dir / 'mlflow.db'}"
    return absolute_store_uri(uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the MLflow server at `url` answers its /health endpoint."""
    try:
        with urllib.request.urlopen(_without_userinfo(url).rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        if not healthy(uri, timeout_s):
            raise TrackingError(
                f"the MLflow tracking server {redact(uri)} is unreachable (no answer from its /health within "
                f"{timeout_s:g} s). Start it (byol-ray mlflow-server, or mlflow server ...), fix "
                f"tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false."
            )
    elif (db := sqlite_path(uri)) is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow database folder {db.parent}: {e}") from None


def _without_userinfo(uri: str) -> str:
    return re.sub(r"://[^/@]*@", "://", uri, count=1)
