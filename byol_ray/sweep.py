"""`byol-ray sweep <preset or file>`: one of the paper's ablations as a Ray Tune sweep.

    byol-ray sweep tau                         # experiments/sweeps/tau.yaml, 3 seeds per row
    byol-ray sweep my_sweep.yaml optim.epochs=2 run.output_dir=/data/out
    byol-ray sweep tau --fresh                 # start over instead of resuming

Every trial is a full Ray Train run (the same `train.run_training` as `byol-ray train`), started from a
Tune function trainable: the pattern Ray 2.60 supports (``Tuner(trainer)`` is deprecated). Each trial is
an MLflow child run of one parent run per sweep. Rerunning the same command resumes the sweep: Tune
restores its experiment, finished trials are not rerun, and an interrupted trial resumes its Ray Train
run from its last checkpoint and continues its MLflow run. At the end the ablation table is built
(`report.py`), printed, and logged to the parent run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import UserError, run_cli
from .sweep_spec import SweepSpec, load_sweep
from .tracking import RUN_NAME_TAG, Tracker, environment_tags, resolve_tracking_uri

SWEEP_TAG = "byol_ray.sweep"
ROLE_TAG = "byol_ray.role"
VARIANT_TAG = "byol_ray.variant"
SEED_TAG = "byol_ray.seed"
FINGERPRINT_PARAM = "sweep.fingerprint"
SPEC_ARTIFACT = "sweep.json"
FINAL_METRIC = "eval/byol/linear_top1"  # logged with the last epoch, after the final evaluation


# The trial function only waits on its Ray Train run. Tune cannot schedule it on nothing, and any CPU
# share (even the 0.01 often suggested) leaves a 2-CPU node 1.98 CPUs: one 1-CPU worker group fewer than
# the trials Tune starts, which then wait. Memory is a resource too, and reserving 64 MiB of it costs no CPU.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


def trial_key(variant: str, seed: int) -> str:
    return json.dumps([variant, seed])


def trial_fn(config: dict[str, Any], trials: dict[str, dict[str, Any]], parent_run_id: str,
             tags: dict[str, dict[str, str]]) -> None:
    """One Tune trial: a Ray Train run of one (variant, seed), its metrics forwarded to Tune each epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import run_training

    key = config["trial"]
    cfg = Config.from_dict(trials[key])
    done = finished_trial_metrics(cfg, parent_run_id)
    if done is not None:
        # Finished before an interruption that Tune's own state did not record yet: never train it twice.
        print(f"[sweep] {cfg.run.name} already finished in MLflow; not rerun", flush=True)
        tune.report(done)
        return
    run_training(cfg, tags=tags[key], parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])


def finished_trial_metrics(cfg: Config, parent_run_id: str) -> dict[str, float] | None:
    from .tracking import _client

    client = _client(resolve_tracking_uri(cfg))
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}' and tags.`mlflow.parentRunId` = '{parent_run_id}' "
                      f"and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if not runs:
        return None
    return {**runs[0].data.metrics, "epoch": runs[0].data.metrics.get("step", 0.0)}


def find_parent(client, experiment_id: str, sweep_name: str) -> Any | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and "
                              f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def open_parent(spec: SweepSpec, base: Config, cli_overrides: list[str], fresh: bool, out_dir: Path) -> tuple[Tracker, bool]:
    """The sweep's MLflow parent run: the newest one of this sweep if it did not finish (resume), else new.

    Returns (tracker, already_finished)."""
    from mlflow.entities import RunStatus

    tracker_probe = Tracker(resolve_tracking_uri(base), "")
    client = tracker_probe.client
    exp = client.get_experiment_by_name(base.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(base.tracking.experiment)
    fingerprint = spec.fingerprint(cli_overrides)
    prev = None if fresh else find_parent(client, exp_id, spec.name)
    if prev is not None:
        if prev.data.params.get(FINGERPRINT_PARAM) != fingerprint:
            raise UserError(
                f"sweep {spec.name!r} has an earlier run ({prev.info.run_id}) made with a different sweep file, "
                f"base config or overrides, so it cannot be resumed. Rerun with --fresh to start a new sweep "
                f"(the old runs stay in MLflow), or restore the old settings to resume it."
            )
        tracker = Tracker(tracker_probe.uri, prev.info.run_id)
        if prev.info.status == "FINISHED":
            return tracker, True
        client.update_run(prev.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        print(f"[sweep] resuming sweep {spec.name!r}: MLflow parent run {prev.info.run_id}", flush=True)
        return tracker, False
    run = client.create_run(exp_id, run_name=f"sweep-{spec.name}", tags={
        SWEEP_TAG: spec.name, ROLE_TAG: "sweep", "byol_ray.ablation": spec.ablation,
        "mlflow.note.content": spec.description or spec.ablation, **environment_tags(base.run.num_workers)})
    tracker = Tracker(tracker_probe.uri, run.info.run_id)
    tracker.log_params({
        FINGERPRINT_PARAM: fingerprint, "sweep.name": spec.name, "sweep.ablation": spec.ablation,
        "sweep.source": spec.source, "sweep.baseline": spec.baseline, "sweep.seeds": spec.seeds,
        "sweep.variants": [v.name for v in spec.variants], "sweep.asha": spec.asha.enabled,
        "sweep.cli_overrides": cli_overrides,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_ARTIFACT).write_text(json.dumps(spec.to_dict(), indent=2))
    tracker.log_artifact(out_dir / SPEC_ARTIFACT)
    print(f"[sweep] new sweep {spec.name!r}: MLflow parent run {run.info.run_id}", flush=True)
    return tracker, False


def max_concurrent_trials(cfg: Config) -> int:
    """As many trials as the cluster holds worker groups at once (at least 1)."""
    from .train import worker_capacity

    return max(1, worker_capacity(cfg) // cfg.run.num_workers)


def stopped_on_purpose(error: str) -> bool:
    """The error a trial's driver saw when Tune stopped the trial: Ray's SIGTERM, or its Ray Train
    controller actor ended on purpose first (Ray says "exit type: INTENDED")."""
    return error.startswith("SystemExit") or (error.startswith("ActorDiedError") and "exit type: INTENDED" in error)


def settle_children(tracker: Tracker, reason: str) -> list[str]:
    """End the child runs Tune cut short, once it has returned.

    Tune stops a trial by killing its actor (ASHA, an interrupted sweep), which can land after the run's
    last epoch and evaluation were logged but before the driver ended the run: such a run completed and
    is marked FINISHED. One without the final evaluation was stopped for good: KILLED, tagged `stopped`.
    Returns the ids of the latter."""
    client = tracker.client
    exp_id = client.get_run(tracker.run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.run_id}' and "
                              f"attributes.status != 'FINISHED'")
    stopped = []
    for r in runs:
        if r.info.status == "FAILED" and not stopped_on_purpose(r.data.tags.get("error", "")):
            continue  # a real failure: the sweep reports it, and a rerun retries it
        if FINAL_METRIC in r.data.metrics:
            client.set_tag(r.info.run_id, "finish_cut_short", "true")
            client.set_terminated(r.info.run_id, status="FINISHED")
        else:
            client.set_tag(r.info.run_id, "stopped", reason)
            client.set_terminated(r.info.run_id, status="KILLED")
            stopped.append(r.info.run_id)
    return stopped


def run_sweep(spec: SweepSpec, cli_overrides: list[str], fresh: bool = False,
              max_concurrent: int = 0) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .report import build_report
    from .train import check_resources, connect_ray, preflight, storage_path

    # Every trial's config was validated by load_sweep; the first one stands for the sweep's storage,
    # tracking and resources until the parent run (and so the trials' names) exists.
    base = spec.trial_config(spec.variants[0].name, spec.seeds[0], cli_overrides)
    if not base.tracking.enabled:
        raise UserError("a sweep records its trials as MLflow runs and builds its table from them: "
                        "remove tracking.enabled=false")
    uri = preflight(base)
    out_dir = base.output_dir / f"sweep-{spec.name}"
    tracker, finished = open_parent(spec, base, cli_overrides, fresh, out_dir)
    if finished:
        print(f"[sweep] sweep {spec.name!r} already finished (MLflow run {tracker.run_id}); its table follows. "
              f"Use --fresh to run it again.", flush=True)
        return build_report(tracker, out_dir)

    # Names carry the parent run's id: a --fresh sweep never resumes the old sweep's Ray Train runs.
    instance = tracker.run_id[:8]
    trials_cfg = {trial_key(v.name, s): spec.trial_config(v.name, s, cli_overrides, instance=instance)
                  for v in spec.variants for s in spec.seeds}
    tags = {trial_key(v.name, s): {SWEEP_TAG: spec.name, ROLE_TAG: "trial", "byol_ray.ablation": spec.ablation,
                                   VARIANT_TAG: v.name, SEED_TAG: str(s)}
            for v in spec.variants for s in spec.seeds}
    try:
        connect_ray(base)
        if base.run.autoscaling:
            concurrency = max_concurrent or len(trials_cfg)
        else:
            check_resources(base)
            concurrency = max_concurrent or max_concurrent_trials(base)
        print(f"[sweep] {spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {len(trials_cfg)} "
              f"trials, {concurrency} at a time; MLflow {uri}", flush=True)

        trainable = tune.with_resources(
            tune.with_parameters(trial_fn, trials={k: c.to_dict() for k, c in trials_cfg.items()},
                                 parent_run_id=tracker.run_id, tags=tags),
            TRIAL_DRIVER_RESOURCES,
        )
        scheduler = None
        if spec.asha.enabled:
            # max_t one past the last epoch: ASHA stops every trial that reaches max_t, which would kill the
            # ones that completed while their driver still logs the table and ends the MLflow run.
            scheduler = ASHAScheduler(time_attr="epoch", metric=spec.asha.metric, mode="max",
                                      max_t=base.optim.epochs + 1, grace_period=spec.asha.grace_epochs,
                                      reduction_factor=spec.asha.reduction_factor)
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
                run_config=tune.RunConfig(name=exp_name, storage_path=storage_path(base), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
        wall = time.time() - t0
    except BaseException as e:
        tracker.end_after_error("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{type(e).__name__}: {e}")
        raise

    if grid.num_terminated + grid.num_errors < len(trials_cfg):
        # Ctrl-C: Tune stops gracefully and returns; what ran is saved for the resume.
        settle_children(tracker, "sweep interrupted")
        tracker.end("KILLED")
        print(f"[sweep] interrupted with {grid.num_terminated} of {len(trials_cfg)} trials done; rerun the same "
              f"command to resume (finished trials are kept)", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    errors = [r for r in grid if r.error is not None]
    stopped = settle_children(tracker, "asha" if spec.asha.enabled else "ended early")
    tracker.set_tags({"wall_seconds": f"{wall:.0f}", "trials_errored": str(len(errors)),
                      "trials_stopped_early": str(len(stopped))})
    report = build_report(tracker, out_dir)
    if errors:
        tracker.end("FAILED")
        msgs = "; ".join(f"{r.config.get('trial')}: {str(r.error).splitlines()[0][:300]}" for r in errors[:5])
        raise UserError(f"sweep {spec.name!r}: {len(errors)} of {len(trials_cfg)} trial(s) failed ({msgs}). "
                        f"Fix the cause and rerun the same command: finished trials are kept, failed ones rerun.")
    tracker.end("FINISHED")
    print(f"[sweep] {spec.name} done in {wall / 60:.1f} min; MLflow parent run {tracker.run_id}", flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray sweep", description="a Ray Tune ablation sweep of BYOL")
    p.add_argument("sweep", help="a preset name (tau, batch, transforms, predictor, ...) or a sweep YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every trial")
    p.add_argument("--fresh", action="store_true", help="start a new sweep instead of resuming the last one")
    p.add_argument("--resume", action="store_true", help="resume the last sweep (the default; kept for clarity)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: what the cluster holds)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)

    def go() -> int:
        if args.fresh and args.resume:
            raise UserError("--fresh and --resume contradict each other: pick one")
        spec = load_sweep(args.sweep, args.overrides)
        run_sweep(spec, args.overrides, fresh=args.fresh, max_concurrent=args.max_concurrent)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
