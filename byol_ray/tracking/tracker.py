"""The one MLflow writer.

Every MLflow call of the project goes through here, with the tracking URI passed explicitly (Ray actors do
not inherit ``mlflow.set_tracking_uri``), and only one process writes to a run at a time: the driver
creates the run and logs params/tags, rank 0 of the workers logs per-epoch metrics while the driver
waits, and the driver logs the model and artifacts at the end.

A tracking server can go away in the middle of a run. The workers' writer (`Tracker(..., spool=path)`)
then does not hold training up: each call tries once with a short timeout, queues what failed, retries
the queue on the next call, and keeps the queue in a JSON-lines file (`undelivered_metrics.jsonl` in the
run's output folder) so that nothing is lost even if the worker dies. At the end the driver delivers
that file if the server is back, or reports where it is (`deliver_undelivered`).

Nothing secret reaches MLflow or the logs through here: a password in a URI is masked (`redact`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import Config, TrackingConfig
from .client import client, delivery_errors, get_or_create_experiment, short_http, tracking_uri_scope
from .models import model_requirements
from .system_metrics import SystemMetrics
from .uri import artifact_root, redact, resolve_tracking_uri, sqlite_path

RUN_NAME_TAG = "byol_ray.run_name"
UNDELIVERED_FILE = "undelivered_metrics.jsonl"
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_tags(world_size: str) -> dict[str, str]:
    """Where the run ran; `world_size` is run.num_workers as RunConfig.describe_workers writes it ("[1, 2]")."""
    return {
        "git_commit": git_commit(),
        "torch_version": _version("torch"),
        "ray_version": _version("ray"),
        "mlflow_version": _version("mlflow"),
        "python_version": platform.python_version(),
        "world_size": world_size,
    }


def _read_spool(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))  # a line torn by a crash mid-write is skipped, not fatal
    return out


def _write_spool(path: Path, pending: list[dict[str, Any]]) -> None:
    if not pending:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in pending))
    os.replace(tmp, path)  # atomic: a crash never leaves half a queue


class Tracker:
    """Writes to one MLflow run, addressed by id; safe to construct in any process.

    With `spool` (the workers' writer), metrics survive a tracking-server outage: see the module doc.
    """

    def __init__(self, uri: str, run_id: str, spool: str | os.PathLike | None = None):
        self.uri = uri
        self.run_id = run_id
        self.client = client(uri)
        self.spool = Path(spool) if spool else None
        # Metrics a previous worker of this run could not deliver (it died, or the server was down).
        self.pending: list[dict[str, Any]] = _read_spool(self.spool)
        self._warned = False
        self.system_metrics: SystemMetrics | None = None  # set by `worker_tracker`
        self.skip_steps: set[int] = set()  # steps the run already holds (`worker_tracker`)

    @classmethod
    def start(
        cls, cfg: Config, tags: dict[str, str] | None = None, parent_run_id: str = "", run_name: str = ""
    ) -> Tracker:
        """Create a new run in the config's experiment, with the resolved config as params.

        `run_name` is the name the MLflow UI shows (default: run.name); the run is found again by its
        run.name, kept in a tag."""
        uri = resolve_tracking_uri(cfg)
        c = client(uri)
        exp_id = get_or_create_experiment(c, cfg.tracking.experiment, artifact_root(uri))
        all_tags = {RUN_NAME_TAG: cfg.run.name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(exp_id, tags=all_tags, run_name=run_name or cfg.run.name)
        t = cls(uri, run.info.run_id)
        t.log_params(cfg.flat())
        return t

    def log_params(self, params: dict[str, Any]) -> None:
        """Params in batches; the workers' writer (with a spool) makes one short try and warns instead of
        stopping training (what it logs, the run's plan, is also in every checkpoint)."""
        from mlflow.entities import Param

        items = [Param(k, str(redact(v))[:6000]) for k, v in params.items()]
        try:
            with short_http() if self.spool is not None else contextlib.nullcontext():
                items = self._new_params(items)
                for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
                    self.client.log_batch(self.run_id, params=items[i : i + 100])
        except delivery_errors() as e:
            if self.spool is None:
                raise
            print(
                f"[mlflow] could not log params {sorted(params)} to {redact(self.uri)} ({type(e).__name__})",
                file=sys.stderr,
                flush=True,
            )

    def _new_params(self, items: list) -> list:
        """The params the run does not hold yet. MLflow refuses to change a param; a run resumed after its
        driver died logs its plan again, and keeps what the first attempt logged (said in one line)."""
        held = self.client.get_run(self.run_id).data.params
        changed = sorted(p.key for p in items if p.key in held and held[p.key] != p.value)
        if changed:
            print(
                f"[mlflow] run {self.run_id} keeps the values an earlier attempt logged for {', '.join(changed)}",
                flush=True,
            )
        return [p for p in items if p.key not in held]

    def logged_epochs(self, key: str = "loss") -> set[int]:
        """The steps at which the run already holds `key`, delivered or queued in the spool."""
        steps = {int(m["step"]) for m in self.pending if m["key"] == key}
        with short_http() if self.spool is not None else contextlib.nullcontext():
            try:
                steps |= {m.step for m in self.client.get_metric_history(self.run_id, key)}
            except delivery_errors():
                pass  # unreachable: nothing to compare against, the epoch is logged (and queued)
        return steps

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step in self.skip_steps:
            # An epoch trained again after the driver died before Ray registered its checkpoint: the run
            # already holds its metrics (the same numbers, but for timings), one point per epoch.
            print(
                f"[mlflow] epoch {step} is already in run {self.run_id}; its metrics are not logged again", flush=True
            )
            return
        ts = int(time.time() * 1000)
        if self.spool is None:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
            return
        self.pending += [
            {"run_id": self.run_id, "key": k, "value": float(v), "timestamp": ts, "step": step}
            for k, v in metrics.items()
        ]
        self.flush()

    def flush(self) -> int:
        """Send the queued metrics (one short try); returns how many are still undelivered."""
        try:
            with short_http():
                self._send_pending()
                if self.system_metrics is not None:
                    self.system_metrics.start()  # again, if an outage ended its sampler
            if self._warned:
                print(f"[mlflow] {redact(self.uri)} is reachable again; queued metrics delivered", flush=True)
                self._warned = False
        except delivery_errors() as e:
            if not self._warned:
                print(
                    f"[mlflow] cannot reach {redact(self.uri)} ({type(e).__name__}); training goes on, metrics "
                    f"are queued, retried every epoch and kept in {self.spool}",
                    file=sys.stderr,
                    flush=True,
                )
                self._warned = True
        if self.spool is not None:
            _write_spool(self.spool, self.pending)
        return len(self.pending)

    def _send_pending(self) -> None:
        """The queue, run by run, in MLflow-sized batches; each batch leaves the queue once it is sent."""
        from mlflow.entities import Metric

        while self.pending:
            run_id = self.pending[0]["run_id"]
            batch = [m for m in self.pending if m["run_id"] == run_id][:_METRICS_PER_BATCH]
            self.client.log_batch(
                run_id, metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in batch]
            )
            sent = {id(m) for m in batch}
            self.pending = [m for m in self.pending if id(m) not in sent]

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model, name: str = "encoder", input_example=None) -> str:
        """The trained encoder as an MLflow PyTorch model; returns its model URI."""
        import mlflow
        import mlflow.pytorch

        self._drop_models_of_dead_attempts(name)
        # log_model has no tracking_uri or run_id argument: it logs to the fluent API's active run.
        with tracking_uri_scope(self.uri), mlflow.start_run(run_id=self.run_id):
            # pt2 (torch.export) rather than pickle: loading it back cannot run arbitrary code.
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                input_example=input_example,
                serialization_format="pt2",
                pip_requirements=model_requirements(),
            )
        return info.model_uri

    def _drop_models_of_dead_attempts(self, name: str) -> None:
        """A model `name` the run already has was logged by a driver that died before it ended the run (a
        model it was still writing stays PENDING): deleted, so the run ends with one, the one logged now."""
        exp = self.client.get_run(self.run_id).info.experiment_id
        for m in self.client.search_logged_models([exp], filter_string=f"source_run_id = '{self.run_id}'"):
            if m.name == name:
                self.client.delete_logged_model(m.model_id)
                print(
                    f"[mlflow] deleted model {m.model_id} ({m.status}), left by an earlier attempt of this run",
                    flush=True,
                )

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def end_after_error(self, status: str, error: str) -> bool:
        """Best effort, one short try per call: tag the error and end the run with `status`.

        Used while an error is already on its way up; a tracking server that is down must not hold it
        up for MLflow's minutes of retries. Returns whether the run was marked.
        """
        try:
            with short_http():
                self.client.set_tag(self.run_id, "error", redact(error)[:5000])
                self.client.set_terminated(self.run_id, status=status)
            return True
        except delivery_errors() as e:
            print(
                f"[mlflow] could not mark run {self.run_id} {status} at {redact(self.uri)} "
                f"({type(e).__name__}); it stays RUNNING until the same command is rerun",
                file=sys.stderr,
                flush=True,
            )
            return False

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


def _newest_run_by_name(cfg: Config):
    """The newest run of this experiment with our run-name tag, or None."""
    uri = resolve_tracking_uri(cfg)
    if (db := sqlite_path(uri)) is not None and not db.is_file():
        return None  # no store yet, so no run (and opening one would create it)
    c = client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_run_by_name(cfg: Config, unfinished_only: bool = False) -> str:
    """The id of the newest run of this experiment with our run-name tag ('' if none); with
    `unfinished_only`, only a run that did not finish (its driver died, or it failed), to resume it."""
    run = _newest_run_by_name(cfg)
    if run is None or (unfinished_only and run.info.status == "FINISHED"):
        return ""
    return run.info.run_id


def finished_run_id(cfg: Config) -> str:
    """The id of this run.name's newest run if it FINISHED (a rerun has nothing left to do), else ''."""
    run = _newest_run_by_name(cfg)
    return run.info.run_id if run is not None and run.info.status == "FINISHED" else ""


OWNER_TAG = "byol_ray.owner"  # the driver that owns the run (distributed.ownership), as JSON
OWNER_HEARTBEAT_TAG = "byol_ray.owner_heartbeat"  # when it last renewed that claim, Unix seconds


def set_owner_tags(tracker: Tracker, owner: str, heartbeat: float) -> None:
    """Put the owning driver's claim on its MLflow run. (No `short_http` here: it changes the process's
    environment, which the heartbeat thread must leave to the driver's own calls.)"""
    tracker.set_tags({OWNER_TAG: owner, OWNER_HEARTBEAT_TAG: f"{heartbeat:.0f}"})


def live_owner_tag(cfg: Config, ttl_s: float) -> str:
    """The owner claim (JSON) on this run.name's newest MLflow run while it is RUNNING and its heartbeat is
    younger than `ttl_s`; '' otherwise."""
    run = _newest_run_by_name(cfg)
    if run is None or run.info.status != "RUNNING":
        return ""
    owner, beat = run.data.tags.get(OWNER_TAG, ""), run.data.tags.get(OWNER_HEARTBEAT_TAG, "")
    try:
        fresh = time.time() - float(beat) <= ttl_s
    except ValueError:
        return ""
    return owner if fresh else ""


def undelivered_path(cfg: Config) -> Path:
    return cfg.output_dir / cfg.run.name / UNDELIVERED_FILE


def deliver_undelivered(tracker: Tracker, path: str | os.PathLike) -> str:
    """Driver, end of run: send what the workers could not (with MLflow's usual patience); returns a
    one-line report, '' when there was nothing to deliver. What still fails stays in the file."""
    late = Tracker(tracker.uri, tracker.run_id, spool=path)
    if not late.pending:
        return ""
    n = len(late.pending)
    # The driver's own client retries for minutes: a server restarting at the end still gets them.
    late.client = tracker.client
    try:
        late._send_pending()
    except delivery_errors() as e:
        _write_spool(Path(path), late.pending)
        return (
            f"[mlflow] {len(late.pending)} of {n} metric values could not be sent to {redact(tracker.uri)} "
            f"({type(e).__name__}); they are in {path}, one JSON object per line (run_id, key, value, "
            f"timestamp, step), ready for MlflowClient.log_batch once the server is back."
        )
    _write_spool(Path(path), [])
    return f"[mlflow] delivered {n} metric values that the workers had queued while {redact(tracker.uri)} was down"


def open_training_run(
    cfg: Config, tags: dict[str, str] | None = None, parent_run_id: str = "", run_name: str = ""
) -> Tracker:
    """The MLflow run of a training: the unfinished run of this run.name if there is one (its driver
    died, or it failed: the rerun continues it), else a new one with the config as params, shown as
    `run_name` (default: run.name). Either way the config (secrets masked) is logged as config.json."""
    uri = resolve_tracking_uri(cfg)
    existing = find_run_by_name(cfg, unfinished_only=True)
    if existing:
        tracker = Tracker(uri, existing)
        tracker.client.update_run(existing, status="RUNNING")  # it may have been ended KILLED/FAILED
        print(f"[driver] resuming MLflow run {existing} of run.name={cfg.run.name}", flush=True)
    else:
        tracker = Tracker.start(
            cfg,
            tags={**environment_tags(cfg.run.describe_workers()), **(tags or {})},
            parent_run_id=parent_run_id,
            run_name=run_name,
        )
        print(f"[driver] MLflow run {tracker.run_id} at {redact(uri)}", flush=True)
    out_dir = cfg.output_dir / cfg.run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(redact(cfg.to_dict()), indent=2))
    tracker.log_artifact(out_dir / "config.json")
    return tracker


@contextlib.contextmanager
def worker_tracker(
    uri: str, run_id: str, spool: str | os.PathLike | None, tracking: TrackingConfig
) -> Iterator[Tracker]:
    """Rank 0's writer for one training: per-epoch metrics (queued through an outage, see the module doc)
    and, with `tracking.system_metrics`, MLflow's system metrics sampled while it trains.

    Every MLflow call of the block makes one short try: the worker never waits on a server that is down,
    neither for its metrics nor for the sampler, which ends within seconds at an outage and is started
    again by the first flush that gets through. What is queued is flushed at the end."""
    tracker = Tracker(uri, run_id, spool=spool)
    tracker.skip_steps = tracker.logged_epochs()
    with short_http():
        if tracking.system_metrics:
            tracker.system_metrics = SystemMetrics(uri, run_id, tracking.system_metrics_interval_s)
            tracker.system_metrics.start()
        try:
            yield tracker
        finally:
            if tracker.system_metrics is not None:
                tracker.system_metrics.stop()
                tracker.system_metrics = None
    tracker.flush()
