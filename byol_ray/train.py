"""Pretraining on Ray Train: the driver, and ``python -m byol_ray.train`` for laptops and ``ray job submit``.

    python -m byol_ray.train --config experiments/fmnist.yaml optim.epochs=5 run.num_workers=2

The driver validates everything it can (config, data files, MLflow, cluster resources) before asking Ray
for anything, creates or resumes the MLflow run, then runs `train_loop_per_worker` in a `TorchTrainer`.
Rerunning the same command with the same ``run.name`` resumes that run from its latest checkpoint and
continues the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .data import check_data
from .errors import UserError, run_cli
from .tracking import (TrackingError, Tracker, check_reachable, deliver_undelivered, delivery_errors, environment_tags,
                       find_run_by_name, redact, resolve_tracking_uri, undelivered_path)


class ResourceError(UserError):
    pass


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the plain per-worker loop with a Ray session and, on rank 0,
    the MLflow writer for per-epoch metrics."""
    import ray

    from .loop import log, pretrain
    from .session import RaySession

    cfg = Config.from_dict(loop_config["config"])
    quiet_ray_train_reports()
    session = RaySession()
    log(f"[worker] rank {session.rank} of {session.world_size} on node {ray.get_runtime_context().get_node_id()}")
    run_id = loop_config.get("mlflow_run_id", "")
    # The spool keeps metrics the tracking server could not take (an outage); the driver delivers it at the end.
    tracker = (Tracker(loop_config["tracking_uri"], run_id, spool=loop_config.get("undelivered_path") or None)
               if (run_id and session.rank == 0) else None)
    pretrain(cfg, session, tracker, run_id)
    if tracker is not None:
        tracker.flush()


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report (the whole metrics dict) and checkpoint at INFO in each worker; the loop
    prints its own one-line progress, so keep Ray's to warnings. Internal logger names: best effort."""
    import logging

    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def storage_path(cfg: Config) -> str:
    return cfg.run.storage_path or str(cfg.output_dir / "ray_results")


def _node_capacities(cfg: Config) -> list[tuple[float, float, int]]:
    """(CPUs, GPUs, workers that fit) for each live node; a worker cannot span nodes."""
    import ray

    r = cfg.run
    need_gpu = worker_resources(cfg).get("GPU", 0.0)
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        cpu, gpu = n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)
        by_cpu = int(cpu // r.cpus_per_worker + 1e-9)
        by_gpu = int(gpu // need_gpu + 1e-9) if need_gpu else by_cpu
        out.append((cpu, gpu, min(by_cpu, by_gpu)))
    return out


def worker_capacity(cfg: Config) -> int:
    """How many of this config's workers the cluster holds at once."""
    return sum(fit for _, _, fit in _node_capacities(cfg))


def check_resources(cfg: Config) -> None:
    """Fail in seconds when the cluster can never hold the worker group (Ray would wait forever)."""
    r = cfg.run
    need_gpu = worker_resources(cfg).get("GPU", 0.0)
    nodes = _node_capacities(cfg)
    fit = sum(f for _, _, f in nodes)
    if fit < r.num_workers:
        total_cpu = sum(c for c, _, _ in nodes)
        total_gpu = sum(g for _, g, _ in nodes)
        raise ResourceError(
            f"the Ray cluster cannot hold {r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU"
            + (f" + {need_gpu:g} GPU" if need_gpu else "")
            + f": its {len(nodes)} node(s) have {total_cpu:g} CPUs and {total_gpu:g} GPUs in all, room for "
            f"{fit} such worker(s). Lower run.num_workers / run.cpus_per_worker / run.gpus_per_worker, or "
            f"add nodes (for a local cluster: ray start --head --num-cpus N)."
        )


def worker_resources(cfg: Config) -> dict[str, float]:
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.device == "cuda" or cfg.run.gpus_per_worker > 0:
        resources["GPU"] = cfg.run.gpus_per_worker or 1.0
    return resources


def request_worker_group(cfg: Config) -> None:
    """On an autoscaling cluster: ask for the whole worker group up front, so GPU nodes start now."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[worker_resources(cfg)] * cfg.run.num_workers)


def preflight(cfg: Config) -> str:
    """Checks that need no Ray resources; returns the tracking URI."""
    check_data(cfg.data)
    check_resume(cfg)
    check_ray_address(cfg.run.address)
    uri = resolve_tracking_uri(cfg)
    if cfg.tracking.enabled:
        check_reachable(uri)
    return uri


def check_resume(cfg: Config) -> None:
    """A rerun of a run.name resumes its latest checkpoint: refuse one made with an incompatible config
    now, rather than in the workers once Ray has started (they check again: remote storage is not read here)."""
    from .checkpoint import check_compatible, latest_checkpoint, load_state

    if "://" in storage_path(cfg):
        return
    latest = latest_checkpoint(Path(storage_path(cfg)) / cfg.run.name)
    if latest is None:
        return
    try:
        state = load_state(latest)
    except Exception as e:  # a torn or foreign file: torch raises several types
        raise UserError(
            f"the latest checkpoint of run {cfg.run.name!r}, {latest}, cannot be read ({type(e).__name__}: "
            f"{str(e)[:200]}). Delete that folder to resume from the one before, or use a new run.name."
        ) from None
    check_compatible(state, cfg)


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when `run.address` does not answer: ray.init retries an unreachable address for
    many minutes. ("auto", "local" and "" need no check: they find or start a cluster.)"""
    import socket

    if address in ("", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    fix = ("Start the cluster (`ray start --head`), fix run.address (host:port of the head, 6379 by default; "
           "ray://host:10001 for Ray Client), or leave run.address empty to start a local Ray.")
    if not host or not port.isdigit():
        raise UserError(f"run.address={address!r} is not host:port. {fix}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"the Ray cluster at run.address={address!r} does not answer ({e}). {fix}") from None


def connect_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=cfg.run.address or None, log_to_driver=True)
    except ConnectionError as e:
        raise UserError(
            f"cannot connect to the Ray cluster at {cfg.run.address!r} ({e}). Start one with "
            f"`ray start --head`, or leave run.address empty to start a local Ray."
        ) from None


def run_training(cfg: Config, tags: dict[str, str] | None = None, parent_run_id: str = "",
                 callbacks: list | None = None) -> dict[str, Any]:
    """Driver: preflight, MLflow run, TorchTrainer.fit, model and evaluation table logged at the end.

    `callbacks` go to Ray Train's RunConfig (a sweep passes Tune's TuneReportCallback); `parent_run_id`
    makes the MLflow run a child (a sweep trial, under the sweep's run).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    uri = preflight(cfg)
    connect_ray(cfg)
    if cfg.run.autoscaling:
        request_worker_group(cfg)
    else:
        check_resources(cfg)

    tracker = None
    if cfg.tracking.enabled:
        existing = find_run_by_name(cfg, unfinished_only=True)
        if existing:
            tracker = Tracker(uri, existing)
            tracker.client.update_run(existing, status="RUNNING")  # it may have been ended KILLED/FAILED
            print(f"[driver] resuming MLflow run {existing} of run.name={cfg.run.name}", flush=True)
        else:
            tracker = Tracker.start(cfg, tags={**environment_tags(cfg.run.num_workers), **(tags or {})},
                                    parent_run_id=parent_run_id)
            print(f"[driver] MLflow run {tracker.run_id} at {redact(uri)}", flush=True)
        out_dir = cfg.output_dir / cfg.run.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(redact(cfg.to_dict()), indent=2))
        tracker.log_artifact(out_dir / "config.json")

    resources = worker_resources(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": tracker.run_id if tracker else "",
            "tracking_uri": uri,
            "undelivered_path": str(undelivered_path(cfg)),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu="GPU" in resources,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks or None,
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
        out = finish_run(cfg, tracker, result, time.time() - t0)
    except BaseException as e:
        # Never leave the MLflow run RUNNING: a rerun of the same run.name resumes it (either way).
        # Best effort: the error being raised matters more than one the tracking server adds.
        if tracker:
            # SystemExit: Ray's SIGTERM (e.g. Tune stopping a trial early), not a failure of the run.
            tracker.end_after_error("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED",
                                    f"{type(e).__name__}: {e}")
        raise
    return out


def finish_run(cfg: Config, tracker: Tracker | None, result, wall: float) -> dict[str, Any]:
    """After fit: print and write the evaluation table, log it and the encoder, end the MLflow run."""
    from .evaluate import EvalRow, rows_to_markdown, write_table

    metrics = dict(result.metrics or {})
    rows = [EvalRow(**json.loads(r)) for r in metrics.get("eval_rows", [])]
    out: dict[str, Any] = {"metrics": metrics, "rows": rows, "wall_seconds": wall,
                           "checkpoint": result.checkpoint, "run_id": tracker.run_id if tracker else ""}
    files = write_table(rows, cfg.output_dir / cfg.run.name) if rows else {}
    if rows:
        print("\n" + rows_to_markdown(rows), flush=True)
        print(f"[driver] evaluation table written to {files['markdown']} and {files['csv']}", flush=True)
    if tracker:
        # These calls keep MLflow's own retries (minutes): a server restarting as the run ends still
        # gets its results. Past them, nothing is lost: the checkpoint and the table are on disk, and
        # rerunning the command logs them without training again.
        try:
            late = deliver_undelivered(tracker, undelivered_path(cfg))
            if late:
                print(late, flush=True)
            tracker.set_tags({"restarts": str(int(metrics.get("restarts", 0))), "wall_seconds": f"{wall:.0f}",
                              "collapsed": str(bool(metrics.get("collapsed", 0))).lower()})
            for f in files.values():
                tracker.log_artifact(f)
            if cfg.tracking.log_model and result.checkpoint is not None:
                out["model_uri"] = log_encoder(cfg, tracker, result.checkpoint)
            tracker.end("FINISHED")
        except delivery_errors() as e:
            where = f" ({result.checkpoint.path})" if result.checkpoint is not None else ""
            table = f"; the evaluation table is in {files['markdown']}" if files else ""
            raise TrackingError(
                f"training finished and its final checkpoint is saved{where}{table}, but the MLflow tracking "
                f"server {redact(tracker.uri)} did not take the run's final results ({type(e).__name__}). "
                f"Once it is reachable again, rerun the same command: it resumes MLflow run {tracker.run_id} "
                f"from the final checkpoint, without training again, and logs them."
            ) from None
    return out


def log_encoder(cfg: Config, tracker: Tracker, checkpoint) -> str:
    """Rebuild the online encoder from the final checkpoint and log it as an MLflow PyTorch model."""
    import torch

    from .checkpoint import load_state
    from .model import OnlineNetwork

    with checkpoint.as_directory() as d:
        state = load_state(d)
    channels = int(state["in_channels"])
    online = OnlineNetwork(cfg.model, channels)
    online.load_state_dict(state["trainer"]["online"])
    encoder = online.encoder.eval()
    example = torch.zeros(2, channels, cfg.data.image_size, cfg.data.image_size).numpy()
    uri = tracker.log_model(encoder, "encoder", input_example=example)
    print(f"[driver] encoder logged to MLflow as {uri}", flush=True)
    return uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray train", description="BYOL pretraining on Ray Train")
    p.add_argument("--config", "-c", default=None, help="YAML config (e.g. experiments/fmnist.yaml)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=5")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        cfg = load_config(args.config, args.overrides)
        out = run_training(cfg)
        print(f"[driver] done in {out['wall_seconds']:.0f} s; MLflow run {out['run_id']}", flush=True)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
