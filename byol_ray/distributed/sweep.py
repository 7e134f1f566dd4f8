"""One of the paper's ablations as a Ray Tune sweep (``byol-ray sweep``).

Every trial is a full Ray Train run (the same `driver.run_training` as `byol-ray train`), started from a
Tune function trainable: the pattern Ray 2.60 supports (``Tuner(trainer)`` is deprecated). Each trial is
an MLflow child run of one parent run per sweep. Before the trials, the sweep fixes the steps every trial
trains and scores each seed's untrained encoder once (``sweep_plan.py``). Rerunning the same command
resumes the sweep: Tune restores its experiment, finished trials are not rerun, and an interrupted trial
resumes its Ray Train run from its last checkpoint and continues its MLflow run. At the end the ablation
table is built (``tracking/report.py``), printed, and logged to the parent run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from ..config import Config, apply_gpu_recipe
from ..errors import UserError
from ..sweep_spec import SweepSpec
from ..tracking.report import build_report
from ..tracking.runs import child_runs
from ..tracking.sweeps import finished_trial_metrics, open_parent, settle_children, trial_run_name, trial_tags
from .cluster import (
    live_nodes,
    reserve_worker_group,
    training_device,
    worker_capacity,
    worker_resources,
    workers_per_gpu,
)
from .driver import run_training
from .preflight import preflight, storage_path
from .sweep_plan import max_epochs, score_untrained_seeds, sweep_plan

# The trial function only waits on its Ray Train run. Tune cannot schedule it on nothing, and any CPU
# share (even the 0.01 often suggested) leaves a 2-CPU node 1.98 CPUs: one 1-CPU worker group fewer than
# the trials Tune starts, which then wait. Memory is a resource too, and reserving 64 MiB of it costs no CPU.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "memory": 64 * 2**20}


@contextlib.contextmanager
def noted_interrupts() -> Iterator[threading.Event]:
    """Ctrl-C during ``tuner.fit()``, noted in the event this yields, then handed to Tune as SIGUSR1.

    Tune takes either signal as "stop gracefully": it saves its experiment (a running trial as running, so
    that a restore resumes it), ends the trials and returns from ``fit()``, the trials it ended marked
    TERMINATED. When the stop comes during the last trials, nothing in what ``fit()`` returns tells it from
    a sweep that completed, so the sweep owns SIGINT here and knows. Tune's own SIGINT handler stays off
    (``TUNE_DISABLE_SIGINT_HANDLER``); a second Ctrl-C, or one before Tune listens for SIGUSR1, stops at
    once as KeyboardInterrupt. Outside the main thread no handler can be set, and Tune sets none either."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if seen.is_set() or signal.getsignal(signal.SIGUSR1) == before_usr1:
            raise KeyboardInterrupt  # a second Ctrl-C, or Tune not listening yet: stop here, resumable
        seen.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    before_usr1 = signal.getsignal(signal.SIGUSR1)
    before_handler = signal.signal(signal.SIGINT, on_sigint)
    before_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, before_handler)
        signal.signal(signal.SIGUSR1, before_usr1)  # Tune's own stays set after fit() returns
        if before_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before_env


def trial_key(variant: str, seed: int) -> str:
    return json.dumps([variant, seed])


def trial_fn(
    config: dict[str, Any], trials: dict[str, dict[str, Any]], parent_run_id: str, tags: dict[str, dict[str, str]]
) -> None:
    """One Tune trial: a Ray Train run of one (variant, seed), its metrics forwarded to Tune each epoch."""
    key = config["trial"]
    cfg = Config.from_dict(trials[key])
    done = finished_trial_metrics(cfg, parent_run_id)
    if done is not None:
        # Finished before an interruption that Tune's own state did not record yet: never train it twice.
        print(f"[sweep] {cfg.run.name} already finished in MLflow; not rerun", flush=True)
        tune.report(done)
        return
    variant, seed = json.loads(key)
    run_training(
        cfg,
        tags=tags[key],
        parent_run_id=parent_run_id,
        callbacks=[TuneReportCallback()],
        run_name=trial_run_name(variant, seed),
    )


def max_concurrent_trials(cfg: Config, nodes: list[dict[str, float]] | None = None) -> int:
    """As many trials as the cluster (`nodes`; default: the connected cluster's live nodes) holds at once, at
    least 1: its worker groups (CPUs, GPUs: floor(1 / run.gpus_per_worker) one-worker trials per GPU with
    a fraction each) and the trials' own drivers (memory). `cfg` is the config the trials' workers get
    (with the GPU recipe applied on GPUs)."""
    nodes = live_nodes() if nodes is None else nodes
    groups = worker_capacity(cfg, nodes) // cfg.run.max_workers
    drivers = sum(int(n.get("memory", 0) // TRIAL_DRIVER_RESOURCES["memory"]) for n in nodes)
    return max(1, min(groups, drivers))


def describe_devices(cfg: Config, device: str, nodes: list[dict[str, float]] | None = None) -> str:
    """How the trials use the cluster's GPUs, for the sweep's start line ('' on CPUs)."""
    if device != "cuda":
        return ""
    nodes = live_nodes() if nodes is None else nodes
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    g = worker_resources(cfg)["GPU"]
    if g < 1:
        share = f"{workers_per_gpu(g)} trials per GPU (run.gpus_per_worker={g:g})"
    else:
        share = f"{g * cfg.run.max_workers:g} GPU(s) per trial"
    return f"{share} on {gpus:g} GPU(s), GPU recipe (on_gpu) applied"


def run_sweep(
    spec: SweepSpec, cli_overrides: list[str], fresh: bool = False, max_concurrent: int = 0
) -> dict[str, Any]:
    # Every trial's config was validated by load_sweep; the first one stands for the sweep's storage,
    # tracking and resources until the parent run (and so the trials' names) exists.
    base = spec.trial_config(spec.variants[0].name, spec.seeds[0], cli_overrides)
    if not base.tracking.enabled:
        raise UserError(
            "a sweep records its trials as MLflow runs and builds its table from them: remove tracking.enabled=false"
        )
    uri = preflight(base)
    out_dir = base.output_dir / f"sweep-{spec.name}"
    tracker, finished = open_parent(spec, base, cli_overrides, fresh, out_dir)
    if finished:
        print(
            f"[sweep] sweep {spec.name!r} already finished (MLflow run {tracker.run_id}); its table follows. "
            f"Use --fresh to run it again.",
            flush=True,
        )
        return build_report(tracker, out_dir)

    # Names carry the parent run's id: a --fresh sweep never resumes the old sweep's Ray Train runs.
    instance = tracker.run_id[:8]
    tags = {trial_key(v.name, s): trial_tags(spec, v.name, s) for v in spec.variants for s in spec.seeds}
    try:
        # What the trials' workers get: each trial's driver applies the GPU recipe the same way.
        device = training_device(base)
        workers = apply_gpu_recipe(base, device)
        reserve_worker_group(workers)
        plan = sweep_plan(spec, cli_overrides, tracker)  # the steps every trial trains, fixed once
        trials_cfg = {
            trial_key(v.name, s): plan.trial_config(spec.trial_config(v.name, s, cli_overrides, instance=instance))
            for v in spec.variants
            for s in spec.seeds
        }
        score_untrained_seeds(spec, cli_overrides, tracker)
        if base.run.autoscaling:
            concurrency = max_concurrent or len(trials_cfg)
        else:
            concurrency = max_concurrent or max_concurrent_trials(workers)
        devices = describe_devices(workers, device)
        print(
            f"[sweep] {spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {len(trials_cfg)} "
            f"trials, {concurrency} at a time{': ' + devices if devices else ''}; MLflow {uri}",
            flush=True,
        )

        trainable = tune.with_resources(
            tune.with_parameters(
                trial_fn,
                trials={k: c.to_dict() for k, c in trials_cfg.items()},
                parent_run_id=tracker.run_id,
                tags=tags,
            ),
            TRIAL_DRIVER_RESOURCES,
        )
        scheduler = None
        if spec.asha.enabled:
            # max_t one past the last epoch: ASHA stops every trial that reaches max_t, which would kill the
            # ones that completed while their driver still logs the table and ends the MLflow run.
            scheduler = ASHAScheduler(
                time_attr="epoch",
                metric=spec.asha.metric,
                mode="max",
                max_t=max_epochs(list(trials_cfg.values())) + 1,
                grace_period=spec.asha.grace_epochs,
                reduction_factor=spec.asha.reduction_factor,
            )
        exp_name = f"sweep-{spec.name}-{instance}"
        exp_path = Path(storage_path(base)) / exp_name
        t0 = time.time()
        if tune.Tuner.can_restore(str(exp_path)):
            print(f"[sweep] restoring Tune experiment {exp_path}", flush=True)
            tuner = tune.Tuner.restore(str(exp_path), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(list(trials_cfg))},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, scheduler=scheduler),
                run_config=tune.RunConfig(
                    name=exp_name,
                    storage_path=storage_path(base),
                    verbose=1,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        with noted_interrupts() as interrupted:
            grid = tuner.fit()
        wall = time.time() - t0
    except BaseException as e:
        tracker.end_after_error("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{type(e).__name__}: {e}")
        raise

    if interrupted.is_set() or grid.num_terminated + grid.num_errors < len(trials_cfg):
        # Ctrl-C: Tune stops gracefully and returns; what ran is saved for the resume.
        settle_children(tracker, "sweep interrupted")
        tracker.end("KILLED")
        done = len(child_runs(tracker.client, tracker.run_id, "attributes.status = 'FINISHED'"))
        print(
            f"[sweep] interrupted with {done} of {len(trials_cfg)} trials done; rerun the same "
            f"command to resume (finished trials are kept)",
            file=sys.stderr,
            flush=True,
        )
        raise KeyboardInterrupt
    # Indexed: ResultGrid is a sequence through __len__ and __getitem__, without the __iter__ mypy needs.
    results = [grid[i] for i in range(len(grid))]
    errors = [r for r in results if r.error is not None]
    stopped = settle_children(tracker, "asha" if spec.asha.enabled else "ended early")
    tracker.set_tags(
        {"wall_seconds": f"{wall:.0f}", "trials_errored": str(len(errors)), "trials_stopped_early": str(len(stopped))}
    )
    report = build_report(tracker, out_dir)
    if errors:
        tracker.end("FAILED")
        # Tune gives every trial's result its config; Ray annotates Result.config as optional.
        msgs = "; ".join(f"{(r.config or {}).get('trial')}: {str(r.error).splitlines()[0][:300]}" for r in errors[:5])
        raise UserError(
            f"sweep {spec.name!r}: {len(errors)} of {len(trials_cfg)} trial(s) failed ({msgs}). "
            f"Fix the cause and rerun the same command: finished trials are kept, failed ones rerun."
        )
    tracker.end("FINISHED")
    print(f"[sweep] {spec.name} done in {wall / 60:.1f} min; MLflow parent run {tracker.run_id}", flush=True)
    return report
