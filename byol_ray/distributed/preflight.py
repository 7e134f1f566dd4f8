"""Checks before any Ray resource is requested: the Ray address (or, for a local Ray, this machine's
CPUs and GPUs), the tracking store, the data files and whether they hold a batch; then, under the run's
claim, whether this run.name already finished and a resumable checkpoint. Each fails in seconds with one
paragraph naming the problem and the fix."""

from __future__ import annotations

import ray

from ..config import Config
from ..core.state import CheckpointError, check_compatible, resumable_checkpoint
from ..data.readers import check_data
from ..errors import UserError
from ..tracking.tracker import finished_run_id
from ..tracking.uri import check_reachable, redact, resolve_tracking_uri
from ..training.loop import steps_per_epoch
from .cluster import check_address, check_resources, this_machine


def storage_path(cfg: Config) -> str:
    return cfg.run.storage_path or str(cfg.output_dir / "ray_results")


def preflight(cfg: Config) -> str:
    """Checks that need no Ray resources and touch no run; returns the tracking URI."""
    check_cluster(cfg)
    n_train = check_data(cfg.data)
    if n_train is not None:
        steps_per_epoch(cfg, n_train)  # raises when the images do not fill one batch
    uri = resolve_tracking_uri(cfg)
    if cfg.tracking.enabled:
        check_reachable(uri)
    return uri


def preflight_run(cfg: Config, uri: str) -> None:
    """Checks of the run itself, made once this driver owns it (`ownership.claim_run`): its checkpoints and
    MLflow run are then not being written by another driver."""
    check_resume(cfg)
    if cfg.tracking.enabled:
        check_not_finished(cfg, uri)


def check_cluster(cfg: Config) -> None:
    """The address Ray would connect to answers; a local Ray this machine could never fit is refused
    before it starts. Already connected (a sweep's trial): the cluster is checked when the group is reserved."""
    if ray.is_initialized():
        return
    starts_local_ray = check_address(cfg.run.address)
    if starts_local_ray and not cfg.run.autoscaling:
        check_resources(cfg, this_machine())


def check_not_finished(cfg: Config, uri: str) -> None:
    """Rerunning a run.name continues its unfinished MLflow run; a finished one has nothing left to do, and
    starting it again would make an empty duplicate."""
    run_id = finished_run_id(cfg)
    if run_id:
        raise UserError(
            f"run.name={cfg.run.name!r} already finished: MLflow run {run_id} (experiment "
            f"{cfg.tracking.experiment!r} in {redact(uri)}) holds its results, and nothing was started. To train "
            f"again, give the new run its own name, e.g. run.name={cfg.run.name}-2."
        )


def check_resume(cfg: Config) -> None:
    """A rerun of a run.name resumes its latest readable checkpoint: refuse one made with an incompatible
    config now, rather than in the workers once Ray has started (they check again: remote storage is not
    read here). A torn latest checkpoint is skipped for the one before it, as the workers will."""
    if "://" in storage_path(cfg):
        return
    try:
        found = resumable_checkpoint(f"{storage_path(cfg)}/{cfg.run.name}")
    except CheckpointError as e:
        raise UserError(f"run {cfg.run.name!r} cannot be resumed: {e}") from None
    if found is None:
        return
    state, skipped = found
    for path, why in skipped:
        print(
            f"[driver] the checkpoint {path} cannot be read ({why}); the run resumes from the one before it", flush=True
        )
    check_compatible(state, cfg)
