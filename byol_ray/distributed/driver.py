"""Pretraining on Ray Train: what each worker runs, and the driver that starts them.

Like Ray's own Train examples: `train_loop_per_worker` runs the plain per-worker loop
(``training.loop.pretrain``) in every worker; `run_training` checks everything it can before asking Ray
for anything (``preflight``), opens or resumes the MLflow run, fits a `TorchTrainer` and hands the result
to ``results.finish_run``. Rerunning the same ``run.name`` resumes its latest checkpoint and continues
the same MLflow run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import ray
import ray.train
from ray.train.v2.api.config import ScalingConfig  # v2's, with (min, max); mypy sees v1's as ray.train's

from ..config import Config, apply_gpu_recipe
from ..tracking.tracker import Tracker, open_training_run, undelivered_path, worker_tracker
from ..training.loop import log, pretrain
from . import ingest
from .cluster import reserve_worker_group, training_device, verbose_ray, worker_resources
from .failures import ByolTrainer, quiet_user_errors, user_error_in
from .ownership import claim_run
from .preflight import preflight, preflight_run, storage_path
from .results import finish_run
from .session import RaySession


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the per-worker loop with a Ray session and, on rank 0, the MLflow
    writer for per-epoch metrics (its spool keeps what an unreachable server could not take; the driver
    delivers it at the end) and the system metrics of its machine."""
    cfg = Config.from_dict(loop_config["config"])
    if not loop_config.get("verbose"):
        quiet_ray_train_reports()
    quiet_user_errors()
    session = RaySession()
    log(f"[worker] rank {session.rank} of {session.world_size} on node {ray.get_runtime_context().get_node_id()}")
    run_id = loop_config.get("mlflow_run_id", "")
    writer = (
        worker_tracker(loop_config["tracking_uri"], run_id, loop_config.get("undelivered_path") or None, cfg.tracking)
        if (run_id and session.rank == 0)
        else contextlib.nullcontext()
    )
    with writer as tracker:
        pretrain(cfg, session, tracker, run_id, stream_factory=ingest.stream_factory)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report (the whole metrics dict, over a thousand characters) and checkpoint at
    INFO in each worker; the loop prints its own one-line progress, so keep Ray's to warnings, and MLflow's
    system-metrics sampler to warnings too. Ray's internal logger names (`context` names its logger by file
    path, not module): best effort."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for module in (context, storage):
        for name in (module.__name__, module.__file__):
            if name:
                logging.getLogger(name).setLevel(logging.WARNING)


def run_training(
    cfg: Config,
    tags: dict[str, str] | None = None,
    parent_run_id: str = "",
    callbacks: list | None = None,
    run_name: str = "",
) -> dict[str, Any]:
    """Driver: preflight, MLflow run, TorchTrainer.fit, model and evaluation table logged at the end.

    `callbacks` go to Ray Train's RunConfig (a sweep passes Tune's TuneReportCallback); `parent_run_id`
    makes the MLflow run a child (a sweep trial, under the sweep's run); `run_name` is the name the
    MLflow UI shows for a new run (default: run.name, which still names the Ray Train run and finds the
    MLflow run again on a rerun).
    """
    uri = preflight(cfg)
    with claim_run(cfg, uri) as claim:  # one live driver per run.name; refused here while another lives
        preflight_run(cfg, uri)
        cfg = apply_gpu_recipe(cfg, training_device(cfg))  # the config's GPU recipe when the workers get GPUs
        reserve_worker_group(cfg)
        if ingest.uses_ray_data(cfg):
            ingest.check_ingest_capacity(cfg)
        tracker = open_training_run(cfg, tags, parent_run_id, run_name) if cfg.tracking.enabled else None
        if tracker:
            claim.opened(tracker.run_id, tracker)
        return _fit(cfg, uri, tracker, callbacks)


def _fit(cfg: Config, uri: str, tracker: Tracker | None, callbacks: list | None) -> dict[str, Any]:
    """TorchTrainer.fit and the end of the run; the MLflow run never left RUNNING by an error."""
    resources = worker_resources(cfg)
    trainer = ByolTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": tracker.run_id if tracker else "",
            "tracking_uri": uri,
            "undelivered_path": str(undelivered_path(cfg)),
            "verbose": verbose_ray(),
        },
        # A factory: Ray Train calls it at every worker-group start, so a restart streams from its epoch.
        datasets={ingest.DATASET: functools.partial(ingest.train_dataset, cfg.to_dict())}
        if ingest.uses_ray_data(cfg)
        else None,
        # An elastic range goes to Ray as (min, max): Ray Train starts with the workers that fit, restarts a
        # smaller group from the latest checkpoint when a node is lost, and every run.resize_interval_s
        # restarts it larger from that checkpoint when nodes return.
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            elastic_resize_monitor_interval_s=cfg.run.resize_interval_s,
            use_gpu="GPU" in resources,
            resources_per_worker=resources,
        ),
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
        try:
            result = trainer.fit()
        except Exception as e:
            # A worker's error in the user's input (not retried, see failures.py): its own paragraph.
            user = user_error_in(e)
            if user is None:
                raise
            raise user from None
        return finish_run(cfg, tracker, result, time.time() - t0)
    except BaseException as e:
        # Never leave the MLflow run RUNNING: a rerun of the same run.name resumes it (either way).
        # Best effort: the error being raised matters more than one the tracking server adds.
        if tracker:
            # SystemExit: Ray's SIGTERM (e.g. Tune stopping a trial early), not a failure of the run.
            tracker.end_after_error(
                "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED", f"{type(e).__name__}: {e}"
            )
        raise
