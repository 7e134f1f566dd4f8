"""Tracking-store URIs: resolving, masking secrets, and checking that a store answers (no mlflow import)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
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
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def resolve_tracking_uri(cfg: Config) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the output directory."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{cfg.output_dir / 'mlflow.db'}"
    return absolute_store_uri(uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


ARTIFACTS_FOLDER = "mlartifacts"  # beside a SQLite store; `byol-ray mlflow-server` uses the same name


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of this store keeps its artifacts: an absolute folder beside a SQLite file,
    so artifacts live and move with the store. None leaves it to the store: a tracking server has its own
    (`--artifacts-destination`, as `mlflow-artifacts:` URIs). Without this, MLflow puts them in `./mlruns` of
    whatever directory first created the experiment (under `ray job submit`: Ray's temporary copy of the
    working dir, which Ray deletes)."""
    db = sqlite_path(uri)
    return str(db.parent / ARTIFACTS_FOLDER) if db is not None else None


# Folders that vanish: the system's temporary folders, and Ray's per-job copy of a working dir (under
# the session folder, wherever --temp-dir put it).
_TEMPORARY_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")
_RAY_WORKING_DIR_COPY = "/runtime_resources/working_dir_files/"


def artifacts_at_risk(location: str, uri: str) -> str:
    """Why an experiment's artifact location would lose its artifacts ('' when it would not): a relative
    folder (each process resolves it against its own working directory) or a temporary one. A folder
    inside the store's own folder is safe wherever that is (a test's store under /tmp, say)."""
    scheme, sep, rest = location.partition(":")
    if sep and scheme != "file" and len(scheme) > 1:
        return ""  # mlflow-artifacts:, s3:, gs: ...: the store's or a bucket's
    path = rest.removeprefix("//") if scheme == "file" else location
    if not path.startswith("/"):
        return "a relative folder, which each process resolves against its own working directory"
    db = sqlite_path(uri)
    if db is not None and Path(path).is_relative_to(db.parent):
        return ""
    if _RAY_WORKING_DIR_COPY in path + "/":
        return "inside Ray's temporary copy of a job's working directory, which Ray deletes"
    temp_roots = {*_TEMPORARY_ROOTS, tempfile.gettempdir()}
    if any(Path(path).is_relative_to(t) for t in temp_roots):
        return "a temporary folder"
    return ""


def _get(url: str, timeout_s: float) -> tuple[int | None, str]:
    """(HTTP status, start of the body) of a GET; (None, why) when nothing answers."""
    try:
        with urllib.request.urlopen(_without_userinfo(url), timeout=timeout_s) as r:
            return int(r.status), r.read(4000).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read(300).decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, str(e)


def health_answer(url: str, timeout_s: float = 2.0) -> int | None:
    """The HTTP status the MLflow server at `url` gives for /health; None when nothing answers."""
    return _get(url.rstrip("/") + "/health", timeout_s)[0]


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the MLflow server at `url` answers its /health endpoint."""
    return health_answer(url, timeout_s) == 200


_GO_ON = (
    "To go on, point at a working store (tracking.tracking_uri=... or MLFLOW_TRACKING_URI, or another "
    "run.output_dir), or set tracking.enabled=false."
)


def check_server(uri: str, timeout_s: float) -> None:
    """A tracking server that answers, and answers its API without an error."""
    base = uri.rstrip("/")
    status, body = _get(base + "/health", timeout_s)
    if status is None:
        raise TrackingError(
            f"the MLflow tracking server {redact(uri)} is unreachable (no answer from its /health within "
            f"{timeout_s:g} s). Start it (byol-ray mlflow-server, or mlflow server ...), fix "
            f"tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false."
        )
    asked = "/health"
    if status == 200:  # one cheap read of the API, which a server with a broken database fails
        asked = "a search of experiments"
        status, body = _get(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout_s)
        if status == 200:
            try:
                json.loads(body)
                return
            except ValueError:
                status = -1
    what = "a reply that is not JSON" if status == -1 else f"HTTP {status}"
    said = " ".join(body.split())[:160]
    raise TrackingError(
        f"the MLflow tracking server {redact(uri)} answers with errors ({what} from {asked}"
        f"{': ' + repr(said) if said else ''}), so the run could log nothing. Check the server's own log (its "
        f"database, its disk, a proxy in front of it) and restart it. {_GO_ON}"
    )


def check_sqlite_store(db: Path) -> None:
    """The folder of a SQLite store can be written (SQLite keeps its journal beside the file), and an
    existing file is an SQLite database holding an MLflow store, not something else."""
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingError(
            f"the MLflow store {db} cannot be used: its folder {folder} cannot be created ({e.strerror}). {_GO_ON}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass  # SQLite writes its journal beside the database
    except OSError as e:
        raise TrackingError(
            f"the MLflow store {db} cannot be written: its folder {folder} does not take new files "
            f"({e.strerror}), and SQLite keeps its journal there. Make the folder writable for this user, "
            f"or move the store. {_GO_ON}"
        ) from None
    if not db.exists():
        return
    if not db.is_file() or not os.access(db, os.R_OK | os.W_OK):
        raise TrackingError(
            f"the MLflow store {db} is not a file this user can read and write. Fix its permissions, or move "
            f"it aside. {_GO_ON}"
        )
    if db.stat().st_size == 0:
        return  # an empty file is an empty database: MLflow sets it up
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise TrackingError(
            f"the MLflow store {db} is not a readable SQLite database ({e}): it was overwritten, cut short or "
            f"is another kind of file. Move it aside (the runs in it are lost unless a backup holds them) and "
            f"rerun to start a new store there, or restore it from a backup. {_GO_ON}"
        ) from None
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:5])
        raise TrackingError(
            f"the MLflow store {db} is an SQLite database of something else (tables {shown}; none of MLflow's "
            f"experiments, runs, alembic_version): byol-ray will not write MLflow's tables into it. Point "
            f"tracking.tracking_uri at a file of its own, e.g. sqlite:///{db.parent / 'mlflow.db'} if that is "
            f"free, or move this one. {_GO_ON}"
        )


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries, and one paragraph, not SQLAlchemy's traceback)
    when the tracking store cannot be reached or used: a server that does not answer or answers errors, a
    SQLite file that is not an MLflow store, a store folder that cannot be written."""
    if uri.startswith(("http://", "https://")):
        check_server(uri, timeout_s)
    elif (db := sqlite_path(uri)) is not None:
        check_sqlite_store(db)


def check_store_exists(uri: str, what: str) -> None:
    """For commands that only read a store: it must exist (MLflow would create an empty SQLite store)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(
            f"there is no MLflow store at {db}, so there is no {what} to read. Run from the folder the runs were "
            f"made in, or point at their store with the same overrides they were made with (run.output_dir=... "
            f"or tracking.tracking_uri=...)."
        )
    check_reachable(uri)


def _without_userinfo(uri: str) -> str:
    return re.sub(r"://[^/@]*@", "://", uri, count=1)
