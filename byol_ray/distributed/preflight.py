"""Checks before any Ray resource is requested: data files, a resumable checkpoint, the Ray address and
the tracking store. Each fails in seconds with one paragraph naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..core.state import check_compatible, latest_checkpoint, load_state
from ..data.readers import check_data
from ..errors import UserError
from ..tracking.uri import check_reachable, resolve_tracking_uri
from .cluster import check_ray_address


def storage_path(cfg: Config) -> str:
    return cfg.run.storage_path or str(cfg.output_dir / "ray_results")


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
