"""`byol-ray mlflow-server`: a real MLflow tracking server on 127.0.0.1 (``tracking/server.py``).

    byol-ray mlflow-server                      # http://127.0.0.1:5000, store in outputs/
    byol-ray mlflow-server --port 5001 --backend-store-uri sqlite:////srv/mlflow.db \
        --artifacts-destination /srv/mlartifacts
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..config import TrackingConfig
from ..errors import UserError, run_cli
from ..tracking.server import DEFAULT_HOST, DEFAULT_PORT, MlflowServer, experiment_page, is_loopback
from ..tracking.uri import absolute_store_uri, sqlite_path


def build_parser() -> argparse.ArgumentParser:
    out = Path("outputs").resolve()
    p = argparse.ArgumentParser(
        prog="byol-ray mlflow-server", description="start a local MLflow tracking server (127.0.0.1 by default)"
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to bind (default 127.0.0.1; MLflow has no authentication: use an SSH tunnel rather than 0.0.0.0)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--backend-store-uri",
        default=f"sqlite:///{out / 'mlflow.db'}",
        help="runs database (default: the store `byol-ray train` writes, outputs/mlflow.db)",
    )
    p.add_argument(
        "--artifacts-destination",
        default=str(out / "mlartifacts"),
        help="where uploaded artifacts go: a folder or s3://bucket/prefix",
    )
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument(
        "--experiment",
        default=TrackingConfig.experiment,
        help="the experiment whose runs page is printed (default: the config's tracking.experiment)",
    )
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        if not 1 <= args.port <= 65535:
            raise UserError(f"--port {args.port} is not a TCP port; pass 1-65535 (default {DEFAULT_PORT}).")
        if not is_loopback(args.host):
            print(
                f"byol-ray: warning: binding MLflow to {args.host}: MLflow has no authentication, so anyone "
                f"who can reach port {args.port} there can read and change every run. Prefer the default "
                f"127.0.0.1 and an SSH tunnel (ssh -L {args.port}:127.0.0.1:{args.port} ...).",
                file=sys.stderr,
                flush=True,
            )
        if not args.artifacts_destination.partition("://")[1]:
            Path(args.artifacts_destination).mkdir(parents=True, exist_ok=True)
        db = sqlite_path(absolute_store_uri(args.backend_store_uri))
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        server = MlflowServer(
            args.backend_store_uri, args.artifacts_destination, args.host, args.port, workers=args.workers
        )
        # SIGTERM (e.g. from a supervisor) ends the server group too, like Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            server.start()
            print(
                f"[mlflow-server] {server.url} (store {server.backend_store_uri}, artifacts "
                f"{server.artifacts_destination}); train with tracking.tracking_uri={server.url}; Ctrl-C stops it",
                flush=True,
            )
            page = experiment_page(server.url, args.experiment)
            print(
                f"[mlflow-server] runs of experiment {args.experiment!r}: "
                + (
                    page
                    or f"none yet; once a run is logged, open {server.url} and pick the experiment, "
                    f"then 'Model training' at the top left"
                ),
                flush=True,
            )
            assert server.proc is not None  # start() returned: the server process is up
            return server.proc.wait()
        finally:
            server.stop()

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
