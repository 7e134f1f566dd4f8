"""After ``TorchTrainer.fit``: the evaluation table printed and written, then logged to MLflow with the
encoder, and the run ended. A tracking server that is down at this point loses nothing: the checkpoint
and table are on disk, and rerunning the command logs them without training again."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..core.state import encoder_from_state, load_state
from ..eval.embedding import example_images, serving_model
from ..eval.scoring import rows_to_markdown, write_table
from ..tracking.client import delivery_errors
from ..tracking.tracker import Tracker, deliver_undelivered, undelivered_path
from ..tracking.uri import TrackingError, redact
from ..training.loop import eval_rows_from_metrics


def finish_run(cfg: Config, tracker: Tracker | None, result, wall: float) -> dict[str, Any]:
    """Print and write the evaluation table, log it and the encoder, end the MLflow run."""
    metrics = dict(result.metrics or {})
    rows = eval_rows_from_metrics(metrics)
    out: dict[str, Any] = {
        "metrics": metrics,
        "rows": rows,
        "wall_seconds": wall,
        "checkpoint": result.checkpoint,
        "run_id": tracker.run_id if tracker else "",
    }
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
            tracker.set_tags(
                {
                    "restarts": str(int(metrics.get("restarts", 0))),
                    "wall_seconds": f"{wall:.0f}",
                    "collapsed": str(bool(metrics.get("collapsed", 0))).lower(),
                }
            )
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
    """Rebuild the online encoder from the final checkpoint and log it as an MLflow PyTorch model that
    serves embeddings: uint8 images in (its signature and input example say which), the evaluator's
    features out."""
    with checkpoint.as_directory() as d:
        state = load_state(d)
    model = serving_model(cfg, encoder_from_state(state))
    example = example_images(cfg, state.in_channels)
    uri = tracker.log_model(model, "encoder", input_example=example)
    print(f"[driver] encoder logged to MLflow as {uri}", flush=True)
    return uri
