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

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from .errors import UserError, run_cli

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


def absolute_store_uri(uri: str) -> str:
    """A relative `sqlite:///x.db` would land in whatever directory the server was started from."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def server_command(host: str, port: int, backend_store_uri: str, artifacts_destination: str,
                   workers: int = 1) -> list[str]:
    """`mlflow server` from this interpreter's environment (the venv's MLflow, whatever PATH says).

    `--serve-artifacts` proxies artifact uploads through the server, so clients need no direct access
    to `--artifacts-destination` (a local folder here, an s3:// bucket on a cluster)."""
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", absolute_store_uri(backend_store_uri),
            "--serve-artifacts", "--artifacts-destination", artifacts_destination,
            "--workers", str(workers)]


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s).status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer:
    """One `mlflow server` process group; `start()` again after `stop()` reuses the same port and store."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, host: str = DEFAULT_HOST,
                 port: int = 0, log_path: str | os.PathLike | None = None, workers: int = 1):
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

    def start(self, timeout_s: float = 120.0) -> "MlflowServer":
        if port_in_use(self.host, self.port):
            raise UserError(
                f"port {self.port} on {self.host} is already in use (another MLflow server?). Stop that "
                f"process, or pass a free port with --port N."
            )
        cmd = server_command(self.host, self.port, self.backend_store_uri, self.artifacts_destination,
                             self.workers)
        # Without a log file the server's output goes to our terminal.
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            # Own process group: the server forks workers, and stop() must end all of them.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
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


def build_parser() -> argparse.ArgumentParser:
    out = Path("outputs").resolve()
    p = argparse.ArgumentParser(prog="byol-ray mlflow-server",
                                description="start a local MLflow tracking server (127.0.0.1 by default)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default 127.0.0.1; MLflow has no authentication: use an SSH tunnel "
                        "rather than 0.0.0.0)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--backend-store-uri", default=f"sqlite:///{out / 'mlflow.db'}",
                   help="runs database (default: the store `byol-ray train` writes, outputs/mlflow.db)")
    p.add_argument("--artifacts-destination", default=str(out / "mlartifacts"),
                   help="where uploaded artifacts go: a folder or s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        if not 1 <= args.port <= 65535:
            raise UserError(f"--port {args.port} is not a TCP port; pass 1-65535 (default {DEFAULT_PORT}).")
        if not is_loopback(args.host):
            print(f"byol-ray: warning: binding MLflow to {args.host}: MLflow has no authentication, so anyone "
                  f"who can reach port {args.port} there can read and change every run. Prefer the default "
                  f"127.0.0.1 and an SSH tunnel (ssh -L {args.port}:127.0.0.1:{args.port} ...).",
                  file=sys.stderr, flush=True)
        if not args.artifacts_destination.partition("://")[1]:
            Path(args.artifacts_destination).mkdir(parents=True, exist_ok=True)
        if args.backend_store_uri.startswith("sqlite:///"):
            Path(absolute_store_uri(args.backend_store_uri)[len("sqlite:///"):]).parent.mkdir(
                parents=True, exist_ok=True)
        server = MlflowServer(args.backend_store_uri, args.artifacts_destination, args.host, args.port,
                              workers=args.workers)
        # SIGTERM (e.g. from a supervisor) ends the server group too, like Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            server.start()
            print(f"[mlflow-server] {server.url} (store {server.backend_store_uri}, artifacts "
                  f"{server.artifacts_destination}); train with tracking.tracking_uri={server.url}; Ctrl-C stops it",
                  flush=True)
            return server.proc.wait()
        finally:
            server.stop()

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
