"""`ray job submit` against a real `ray start --head` cluster (dashboard on 127.0.0.1), with the run found
afterwards in the MLflow store the job wrote to."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from byol_ray.tracking.server import free_port
from helpers import TINY

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
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
def head_node(tmp_path):
    port, dash = free_port(), free_port()
    env = ray_env()
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(address)
        yield address
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit_job(address: str, submission_id: str, entry: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit` of this repository as the working dir; waits for the job and returns its output."""
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
              "--working-dir", str(REPO),
              "--runtime-env-json", '{"excludes": [".venv", "outputs", ".git", "*.db"]}', "--", *entry]
    proc = subprocess.run(submit, env=ray_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_training_submitted_as_a_ray_job(head_node, tmp_path):
    out = tmp_path / "out"
    env = ray_env()
    proc = submit_job(head_node, "byol-job-test", ["python", "-m", "byol_ray.train", *TINY, "optim.epochs=2",
                                                   f"run.output_dir={out}", "run.name=job", "tracking.log_model=false"])
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", head_node, "byol-job-test"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "byol-job-test' succeeded" in (status.stdout + status.stderr).lower()  # status SUCCEEDED
    assert "[driver] done" in proc.stdout
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    assert list(runs["status"]) == ["FINISHED"]
    assert runs.iloc[0]["tags.byol_ray.run_name"] == "job"
    assert runs.iloc[0]["metrics.eval/byol/linear_top1"] > 10

    # The evaluation of that run as a second job, its protocol in a Ray task on the same cluster: a child
    # run of the pretraining run, in the same store.
    proc = submit_job(head_node, "byol-eval-test", [
        "python", "-m", "byol_ray.cli", "eval", "transfer", "--ray", "--cpus", "1", "--encoder",
        str(out / "ray_results" / "job"), "--dataset", "digits", "--weight-decays", "1e-3,1",
        "--train-subset", "300", "--test-subset", "200"])
    assert "| BYOL - untrained encoder |" in proc.stdout
    children = mlflow.search_runs(experiment_names=["byol-ray"],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{runs.iloc[0]['run_id']}'")
    assert len(children) == 1 and children.iloc[0]["status"] == "FINISHED"
    assert children.iloc[0]["params.evaluation.protocol"] == "transfer"
    assert children.iloc[0]["metrics.byol/digits_linear_top_1"] > 30


def test_rerunning_the_command_resumes_a_run_whose_driver_died(tmp_path):
    """SIGKILL the driver (and the local Ray it started) after the first checkpoint, rerun the same
    command: the run continues from its checkpoint, in the same MLflow run."""
    import signal

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "byol_ray.train", *TINY, "optim.epochs=8", "run.num_workers=1",
           f"run.output_dir={out}", "run.name=phoenix", "tracking.log_model=false"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    # Ray Train writes this snapshot once its controller has registered a reported checkpoint; a new
    # driver with the same run name restores from it.
    while not (out / "ray_results" / "phoenix" / "checkpoint_manager_snapshot.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the driver ended"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
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
