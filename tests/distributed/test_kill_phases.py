"""The driver SIGKILLed once in each phase of a short real run, then the same command rerun.

One `ray start --head` cluster serves every run, as a cluster does: the killed driver's Ray job (its
controller and workers) ends with it, the cluster stays. Each case kills `byol-ray train` in one phase:
the warm-up of a time-budgeted plan, the middle of the second epoch, a checkpoint written but not yet
registered by Ray, the final evaluation, and the encoder half-logged to MLflow (its logged model created,
its files not yet written). The rerun takes over the dead driver's claim and must end with one FINISHED
MLflow run holding every artifact and one logged encoder, one metric point per epoch, and final weights
(checkpoint and logged encoder) and evaluation equal to one uninterrupted run of the same command.

Equality holds in every phase here because a rerun retraces the run bit for bit on CPU: each epoch's
randomness is seeded from (seed, rank, epoch), the plan is capped by optim.epochs (the time budget is
far larger), and the evaluation is seeded too. What a rerun cannot restore is kept from the first attempt
and said: the metrics of an epoch trained again (timings aside, the same numbers) and the plan's measured
warm-up speed (a param MLflow will not change).

The console of the uninterrupted run is checked here too: the project's lines, without Ray Train's
per-report dicts or its preemption watcher's E-line, which BYOL_RAY_VERBOSE=1 (what --debug sets) brings
back."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO, kill_cluster, tiny_train

from byol_ray.core.state import encoder_from_state, latest_checkpoint, load_state
from byol_ray.tracking.models import load_model_weights
from byol_ray.tracking.server import free_port

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
NAME = "phase"


@pytest.fixture(scope="module")
def cluster():
    """(address, environment) of a 4-CPU head node on its own ports and temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="rkp", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def command(address: str, out: Path, fmnist_root: str, *extra: str) -> list[str]:
    return tiny_train(
        f"data.root={fmnist_root}",
        "run.num_workers=1",
        "eval.baselines=false",
        "optim.time_budget_minutes=600",  # a warm-up and a plan, capped by optim.epochs: the same every run
        f"run.address={address}",
        f"run.output_dir={out}",
        f"run.name={NAME}",
        *extra,
    )


def run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run: (output folder, console)."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    address, env = cluster
    out = tmp_path_factory.mktemp("reference")
    return out, run(command(address, out, "/usr/share/datasets/fashion-mnist"), env)


def the_run(out: Path):
    """The one MLflow run of the output folder, with its client."""
    uri = f"sqlite:///{out}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("byol-ray")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    return client, runs[0], uri


def final_state(out: Path):
    return load_state(latest_checkpoint(out / "ray_results" / NAME))


def logged_model_status(db: Path) -> str:
    """The status of the encoder's logged model while log_model runs: '' before it is created."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute("SELECT status FROM logged_models").fetchone()
    except sqlite3.Error:
        return ""  # not created yet, or locked by the writer this instant
    return {1: "PENDING", 2: "READY", 3: "FAILED"}.get(row[0], str(row[0])) if row else ""


PHASES = ["warmup", "mid_epoch", "checkpoint", "final_eval", "log_model"]


@pytest.mark.parametrize("phase", PHASES)
def test_a_driver_killed_in_any_phase_is_finished_by_the_rerun(phase, cluster, reference, tmp_path, fmnist_root):
    address, env = cluster
    ref_out, _ = reference
    out = tmp_path / "out"
    pause = [] if phase == "log_model" else [f"debug.pause_at={phase}", "debug.pause_s=300"]
    cmd = command(address, out, fmnist_root, *pause)
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    marker = out / f".paused_{NAME}_{phase}"
    deadline = time.monotonic() + 300
    while (logged_model_status(out / "mlflow.db") != "PENDING") if phase == "log_model" else not marker.exists():
        assert first.poll() is None, f"the driver ended (rc {first.returncode}) before phase {phase}"
        assert time.monotonic() < deadline, f"phase {phase} never came"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    if phase == "log_model":
        assert logged_model_status(out / "mlflow.db") == "PENDING", "the kill came after the encoder was logged"

    said = run(cmd, env)
    assert f"taking over the claim of a driver that is gone (host {os.uname().nodename}, pid {first.pid}" in said

    client, mrun, uri = the_run(out)
    assert mrun.info.status == "FINISHED"
    # One metric point per epoch, the ones the uninterrupted run logged (timings aside).
    ref_client, ref_run, ref_uri = the_run(ref_out)
    for key in ("loss", "repr_std", "lr", "tau", "planned_steps"):
        got = [(m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, key)]
        want = [(m.step, m.value) for m in ref_client.get_metric_history(ref_run.info.run_id, key)]
        assert got == want, f"{key}: {got} vs the uninterrupted {want}"
    for key in ("eval/byol/linear_top1", "eval/byol/knn_top1"):
        assert mrun.data.metrics[key] == ref_run.data.metrics[key], key
    # Every artifact, and one logged encoder, READY.
    assert {"config.json", "eval_table.md", "eval_table.csv"} <= {
        a.path for a in client.list_artifacts(mrun.info.run_id)
    }
    models = client.search_logged_models(
        [mrun.info.experiment_id], filter_string=f"source_run_id = '{mrun.info.run_id}'"
    )
    assert [(m.name, str(m.status)) for m in models] == [("encoder", "READY")], models
    # Final weights equal to the uninterrupted run's, in the checkpoint and in the logged encoder.
    got, want = final_state(out), final_state(ref_out)
    assert got.epoch == want.epoch == 3
    for part in ("online", "target"):
        for k, v in want.trainer[part].items():
            assert torch.equal(got.trainer[part][k], v), f"{part}.{k} differs from the uninterrupted run"
    weights = load_model_weights(f"models:/{models[0].model_id}", uri)
    final = encoder_from_state(want).state_dict()
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)
    assert not (out / NAME / "owner.json").exists()


def test_the_console_shows_the_project_lines_without_rays_report_dicts(reference):
    _, said = reference
    for line in ("[train] 512 images", "[plan] warm-up measured", "[epoch 3]", "[eval] linear probe", "[driver] done"):
        assert line in said, line
    assert "TrainingReport(" not in said and "Reporting training result" not in said
    assert "PreemptionWatcher" not in said


def test_debug_brings_rays_whole_log_back(cluster, tmp_path, fmnist_root):
    address, env = cluster
    cmd = command(address, tmp_path, fmnist_root, "optim.epochs=1", "eval.final=false", "tracking.enabled=false")
    cmd.insert(3, "--debug")
    said = run(cmd, env)
    assert "TrainingReport(" in said and "PreemptionWatcher" in said
