"""`ray job submit` against a real `ray start --head` cluster (dashboard on 127.0.0.1), with the run found
afterwards in the MLflow store the job wrote to, whole once the cluster and its session folder are gone.

Each cluster has its own --temp-dir and is ended by its processes only: `ray stop` would end every Ray
on the machine, and a head started in the default temp dir is the one every plain `ray.init()` joins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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


def ray_env() -> dict[str, str]:
    # Ray 2.60's head enables token authentication for the dashboard (token in ~/.ray/auth_token); the
    # `ray job` client sends the token only in RAY_AUTH_MODE=token.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # jobs inherit the head node's environment
    return env


def wait_for_dashboard(address: str, timeout_s: float = 120) -> None:
    """`ray start` returns before the dashboard's job API answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without Ray's auth token, which the `ray job` CLI sends)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def head_node():
    """(job API address, the cluster's temp dir). Its own ports, so that it runs beside other clusters."""
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")  # short: Ray's unix sockets live under it
    dash = free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={free_port()}",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(start, env=ray_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        address = f"http://127.0.0.1:{dash}"
        wait_for_dashboard(address)
        yield address, temp_dir
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(
    address: str, submission_id: str, entry: list[str], wait: bool = True, check: bool = True
) -> subprocess.CompletedProcess:
    """`ray job submit` of this repository as the working dir; waits for the job (unless not `wait`) and
    returns its output."""
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        *([] if wait else ["--no-wait"]),
        "--address",
        address,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        '{"excludes": [".venv", "outputs", ".git", "mlruns", "*.db"]}',
        "--",
        *entry,
    ]
    proc = subprocess.run(submit, env=ray_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_training_submitted_as_a_ray_job_keeps_its_artifacts(head_node, tmp_path):
    """The README's job flow: training, then its evaluation, as jobs. Then the cluster is ended and its
    session folder (where Ray unpacked the job's working dir) deleted: the run's artifacts (config,
    evaluation table, the encoder as an MLflow model) are all in the run's output folder and load back."""
    address, temp_dir = head_node
    out = tmp_path / "out"
    env = ray_env()
    train = tiny_train("optim.epochs=2", f"run.output_dir={out}", "run.name=job", python="python")
    submit_job(address, "byol-job-test", train, wait=False)
    # A retried submission while the job trains: refused by the job's claim on its run, naming it.
    deadline = time.monotonic() + 300
    while not (out / "job" / "owner.json").exists():
        assert time.monotonic() < deadline, "the job never claimed its run"
        time.sleep(0.2)
    twice = submit_job(address, "byol-job-twice", train, check=False)
    said = twice.stdout + twice.stderr
    assert "run.name='job'" in said and "is being trained by another driver" in said, said[-3000:]
    assert "[train]" not in said
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, "--follow", "byol-job-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, "byol-job-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "byol-job-test' succeeded" in (status.stdout + status.stderr).lower()  # status SUCCEEDED
    assert "[driver] done" in proc.stdout
    uri = f"sqlite:///{out}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    assert list(runs["status"]) == ["FINISHED"]
    assert runs.iloc[0]["tags.byol_ray.run_name"] == "job"
    assert runs.iloc[0]["metrics.eval/byol/linear_top1"] > 10
    run_id = runs.iloc[0]["run_id"]

    # The evaluation of that run as a second job, its protocol in a Ray task on the same cluster: a child
    # run of the pretraining run, in the same store.
    proc = submit_job(
        address,
        "byol-eval-test",
        [
            "python",
            "-m",
            "byol_ray.cli",
            "eval",
            "transfer",
            "--ray",
            "--cpus",
            "1",
            "--encoder",
            str(out / "ray_results" / "job"),
            "--dataset",
            "digits",
            "--weight-decays",
            "1e-3,1",
            "--train-subset",
            "300",
            "--test-subset",
            "200",
        ],
    )
    assert "| BYOL - untrained encoder |" in proc.stdout
    children = mlflow.search_runs(
        experiment_names=["byol-ray"], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
    )
    assert len(children) == 1 and children.iloc[0]["status"] == "FINISHED"
    assert children.iloc[0]["params.evaluation.protocol"] == "transfer"
    assert children.iloc[0]["metrics.byol/digits_linear_top_1"] > 30

    kill_cluster(temp_dir)
    sessions = list(Path(temp_dir).glob("session_*"))
    assert sessions and any(Path(temp_dir).rglob("working_dir_files")), "not where Ray unpacks a job's working dir"
    shutil.rmtree(temp_dir)

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("byol-ray")
    assert experiment.artifact_location == str(out / "mlartifacts")
    for rid in [run_id, children.iloc[0]["run_id"]]:
        assert client.get_run(rid).info.artifact_uri.startswith(f"{out}/mlartifacts/"), rid
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run_id
    assert models[0].artifact_location.startswith(f"{out}/mlartifacts/")
    table = Path(client.download_artifacts(run_id, "eval_table.md", str(tmp_path))).read_text()
    assert "| BYOL (online encoder) |" in table
    assert (
        "| BYOL - untrained encoder |"
        in Path(client.download_artifacts(children.iloc[0]["run_id"], "eval_transfer.md", str(tmp_path))).read_text()
    )
    # The logged encoder is the final checkpoint's.
    weights = load_model_weights(f"models:/{models[0].model_id}", uri)
    final = encoder_from_state(load_state(latest_checkpoint(out / "ray_results" / "job"))).state_dict()
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[k], final[k]) for k in final)


def test_rerunning_the_command_resumes_a_run_whose_driver_died(tmp_path):
    """SIGKILL the driver (and the local Ray it started) after the first checkpoint, rerun the same
    command: the run continues from its checkpoint, in the same MLflow run."""
    import signal

    out = tmp_path / "out"
    cmd = tiny_train(
        "optim.epochs=8",
        "run.num_workers=1",
        f"run.output_dir={out}",
        "run.name=phoenix",
        "tracking.log_model=false",
    )
    ray_tmp = tempfile.mkdtemp(prefix="rph", dir="/tmp")  # this test's local Ray, ended by its processes
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    # Ray Train writes this snapshot once its controller has registered a reported checkpoint; a new
    # driver with the same run name restores from it.
    while not (out / "ray_results" / "phoenix" / "checkpoint_manager_snapshot.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the driver ended"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    kill_cluster(ray_tmp)

    try:
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        kill_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[driver] resuming MLflow run" in second.stdout
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    steps = sorted({m.step for m in client.get_metric_history(runs.iloc[0]["run_id"], "loss")})
    assert steps == list(range(1, 9))
    # The second driver's workers resumed from the checkpoint (restart #1), not from scratch.
    restarts = {m.step: m.value for m in client.get_metric_history(runs.iloc[0]["run_id"], "restarts")}
    assert restarts[8] == 1.0
