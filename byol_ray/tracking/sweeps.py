"""A sweep in MLflow: its parent run (opened, resumed or found finished), its trial runs, and settling the
trials Tune cut short."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..sweep_spec import SweepSpec
from .client import client, get_or_create_experiment
from .runs import ABLATION_TAG, ROLE_TAG, SEED_TAG, SWEEP_TAG, VARIANT_TAG, child_runs, download_json, find_sweep_parent
from .tracker import RUN_NAME_TAG, Tracker, environment_tags
from .uri import artifact_root, resolve_tracking_uri

FINGERPRINT_PARAM = "sweep.fingerprint"
SPEC_ARTIFACT = "sweep.json"
FINAL_METRIC = "eval/byol/linear_top1"  # logged with the last epoch, after the final evaluation


def trial_tags(spec: SweepSpec, variant: str, seed: int) -> dict[str, str]:
    """The tags that make a training run a trial of this sweep (variant, seed) in MLflow."""
    return {
        SWEEP_TAG: spec.name,
        ROLE_TAG: "trial",
        ABLATION_TAG: spec.ablation,
        VARIANT_TAG: variant,
        SEED_TAG: str(seed),
    }


def trial_run_name(variant: str, seed: int) -> str:
    """The name a trial's run shows in the MLflow UI, under its sweep's parent run: `tau=0.99 seed 1`."""
    return f"{variant} seed {seed}"


def finished_trial_metrics(cfg: Config, parent_run_id: str) -> dict[str, float] | None:
    """The metrics of this trial's run if it already FINISHED under this parent, else None."""
    runs = child_runs(
        client(resolve_tracking_uri(cfg)),
        parent_run_id,
        f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}' and attributes.status = 'FINISHED'",
    )
    if not runs:
        return None
    return {**runs[0].data.metrics, "epoch": runs[0].data.metrics.get("step", 0.0)}


def open_parent(
    spec: SweepSpec, base: Config, cli_overrides: list[str], fresh: bool, out_dir: Path
) -> tuple[Tracker, bool]:
    """The sweep's MLflow parent run: the newest one of this sweep if it did not finish (resume), else new.

    Returns (tracker, already_finished)."""
    from mlflow.entities import RunStatus

    uri = resolve_tracking_uri(base)
    c = client(uri)
    exp_id = get_or_create_experiment(c, base.tracking.experiment, artifact_root(uri))
    fingerprint = spec.fingerprint(cli_overrides)
    prev = None if fresh else find_sweep_parent(c, exp_id, spec.name)
    if prev is not None:
        if prev.data.params.get(FINGERPRINT_PARAM) != fingerprint:
            raise UserError(
                f"sweep {spec.name!r} has an earlier run ({prev.info.run_id}) made with a different sweep file, "
                f"base config or overrides, so it cannot be resumed. Rerun with --fresh to start a new sweep "
                f"(the old runs stay in MLflow), or restore the old settings to resume it."
            )
        tracker = Tracker(uri, prev.info.run_id)
        if prev.info.status == "FINISHED":
            return tracker, True
        c.update_run(prev.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        print(f"[sweep] resuming sweep {spec.name!r}: MLflow parent run {prev.info.run_id}", flush=True)
        return tracker, False
    run = c.create_run(
        exp_id,
        run_name=f"sweep-{spec.name}",
        tags={
            SWEEP_TAG: spec.name,
            ROLE_TAG: "sweep",
            ABLATION_TAG: spec.ablation,
            "mlflow.note.content": spec.description or spec.ablation,
            **environment_tags(base.run.describe_workers()),
        },
    )
    tracker = Tracker(uri, run.info.run_id)
    tracker.log_params(
        {
            FINGERPRINT_PARAM: fingerprint,
            "sweep.name": spec.name,
            "sweep.ablation": spec.ablation,
            "sweep.source": spec.source,
            "sweep.baseline": spec.baseline,
            "sweep.seeds": spec.seeds,
            "sweep.variants": [v.name for v in spec.variants],
            "sweep.asha": spec.asha.enabled,
            "sweep.cli_overrides": cli_overrides,
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_ARTIFACT).write_text(json.dumps(spec.to_dict(), indent=2))
    tracker.log_artifact(out_dir / SPEC_ARTIFACT)
    print(f"[sweep] new sweep {spec.name!r}: MLflow parent run {run.info.run_id}", flush=True)
    return tracker, False


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
    c = tracker.client
    stopped = []
    for r in child_runs(c, tracker.run_id, "attributes.status != 'FINISHED'"):
        if r.info.status == "FAILED" and not stopped_on_purpose(r.data.tags.get("error", "")):
            continue  # a real failure: the sweep reports it, and a rerun retries it
        if FINAL_METRIC in r.data.metrics:
            c.set_tag(r.info.run_id, "finish_cut_short", "true")
            c.set_terminated(r.info.run_id, status="FINISHED")
        else:
            c.set_tag(r.info.run_id, "stopped", reason)
            c.set_terminated(r.info.run_id, status="KILLED")
            stopped.append(r.info.run_id)
    return stopped


def spec_of_parent(tracker: Tracker) -> SweepSpec:
    """The sweep file a parent run was made from (its logged sweep.json)."""
    return SweepSpec.from_dict(download_json(tracker.uri, tracker.run_id, SPEC_ARTIFACT))


def parent_record(tracker: Tracker) -> tuple[dict[str, str], dict[str, float]]:
    """The parent run's params and latest metrics as they are now: a resumed sweep reads its plan and the
    scores it already logged back from them."""
    run = tracker.client.get_run(tracker.run_id)
    return dict(run.data.params), dict(run.data.metrics)
