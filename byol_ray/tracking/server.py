"""`byol-ray mlflow-server`: a real MLflow tracking server (database backend, served artifacts).

    byol-ray mlflow-server                      # http://127.0.0.1:5000, store in outputs/
    byol-ray mlflow-server --port 5001 --backend-store-uri sqlite:////srv/mlflow.db \
        --artifacts-destination /srv/mlartifacts

Bound to 127.0.0.1 by default: MLflow has no authentication, so anyone who can reach the port can read
and change every run. Reach it from elsewhere through an SSH tunnel; binding another address prints a
warning. `MlflowServer` (and the `mlflow_server` context manager) start the same command for tests and
scripts, on a free port, and wait until it answers `/health`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .client import client
from .uri import absolute_store_uri, healthy

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def experiment_page(url: str, experiment: str) -> str:
    """The UI page of `experiment`'s runs on the server at `url` ('' while the store has no such experiment).

    MLflow 3.17's UI opens an experiment in its GenAI view (traces, which training runs do not have) unless
    the URL or the browser's saved choice asks for the model-training view, whatever the experiment's
    `mlflow.experimentKind` tag says: this URL asks for it."""
    exp = client(url).get_experiment_by_name(experiment)
    return f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp else ""


def server_command(
    host: str, port: int, backend_store_uri: str, artifacts_destination: str, workers: int = 1
) -> list[str]:
    """`mlflow server` from this interpreter's environment (the venv's MLflow, whatever PATH says).

    `--serve-artifacts` proxies artifact uploads through the server, so clients need no direct access
    to `--artifacts-destination` (a local folder here, an s3:// bucket on a cluster)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        absolute_store_uri(backend_store_uri),
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        str(workers),
    ]


class MlflowServer:
    """One `mlflow server` process group; `start()` again after `stop()` reuses the same port and store."""

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str,
        host: str = DEFAULT_HOST,
        port: int = 0,
        log_path: str | os.PathLike | None = None,
        workers: int = 1,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.backend_store_uri = absolute_store_uri(backend_store_uri)
        self.artifacts_destination = artifacts_destination
        self.log_path = Path(log_path) if log_path else None
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        if port_in_use(self.host, self.port):
            raise UserError(
                f"port {self.port} on {self.host} is already in use (another MLflow server?). Stop that "
                f"process, or pass a free port with --port N."
            )
        cmd = server_command(self.host, self.port, self.backend_store_uri, self.artifacts_destination, self.workers)
        # Without a log file the server's output goes to our terminal.
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            # Own process group: the server forks workers, and stop() must end all of them.
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log:
                log.close()
        deadline = time.monotonic() + timeout_s
        while not healthy(self.url):
            if self.proc.poll() is not None:
                raise UserError(
                    f"mlflow server exited with code {self.proc.returncode} before answering {self.url}/health"
                    + (f"; see {self.log_path}" if self.log_path else "")
                    + ". Check --backend-store-uri and --artifacts-destination."
                )
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"mlflow server did not answer {self.url}/health within {timeout_s:.0f} s.")
            time.sleep(0.25)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Workers of the group can outlive the parent for a moment; the port must be free for a restart.
        deadline = time.monotonic() + 30
        while port_in_use(self.host, self.port) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            time.sleep(0.2)
        self.proc = None


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, **kw) -> Iterator[MlflowServer]:
    """A started server, stopped on exit (tests, scripts)."""
    server = MlflowServer(backend_store_uri, artifacts_destination, **kw).start()
    try:
        yield server
    finally:
        server.stop()
