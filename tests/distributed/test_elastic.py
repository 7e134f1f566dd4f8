"""An elastic worker group (`run.num_workers=[1,2]`) on conftest's two one-CPU nodes: the second node is
taken away mid-run and brought back, and the run ends as one FINISHED MLflow run close to a fixed
two-worker run of the same config.

The moments are set by `debug.pause_at`, not by sleeps: rank 0 holds in the middle of the second epoch
(the test kills the second node's raylet and everything it started), and again after the first checkpoint
of the group that Ray restarted smaller (the test starts the second node again). So the run trains epoch
1 on two workers, epoch 2 on one (from the epoch-1 checkpoint) and epoch 3 on two again (Ray grows the
group after `run.resize_interval_s`, from the epoch-2 checkpoint). Ray learns of the lost node from
missed health checks, made short here, and stops waiting for a group that cannot be placed after
RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, TwoNodes, tiny_train, two_node_cluster

pytestmark = pytest.mark.ray

# Ray's own settings, for both nodes: the head's GCS calls a node dead after ~3 missed 1-second health
# checks (default ~30 s), and Ray Train gives up on placing a group after 10 s (default 60 s): its
# resource view lags a lost node by up to 20 s, so it first tries the old size again.
FAST_FAILOVER = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
}


@pytest.fixture
def elastic_nodes():
    with two_node_cluster(FAST_FAILOVER) as nodes:
        yield nodes


def command(nodes: TwoNodes, tmp_path: Path, fmnist_root: str, name: str, *extra: str) -> list[str]:
    return tiny_train(
        # Splits large enough for a steady linear probe (trained to convergence): on TINY's 512 / 256 images
        # two encoders a few steps apart differ by 1-2 points. Training still takes 3 steps per epoch.
        "data.train_subset=4000",
        "data.test_subset=2000",
        "eval.linear_epochs=100",
        "eval.baselines=false",
        f"data.root={fmnist_root}",
        f"run.address={nodes.address}",
        f"run.output_dir={tmp_path / 'out'}",
        f"run.storage_path={tmp_path / 'shared'}",
        f"run.name={name}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_model=false",
        "tracking.system_metrics=false",
        *extra,
    )


def registered_epochs(run_dir: Path) -> set[int]:
    """The epochs of the checkpoints Ray Train has registered (its snapshot in the run's storage folder)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return set()
    return {int(r["metrics"]["epoch"]) for r in snapshot["checkpoint_results"]}


def wait_for(done: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not done():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.1)


def test_elastic_group_shrinks_on_a_lost_node_and_grows_back(elastic_nodes, tmp_path, fmnist_root):
    nodes = elastic_nodes
    env = {k: v for k, v in nodes.env.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)

    fixed = subprocess.run(
        command(nodes, tmp_path, fmnist_root, "fixed"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert fixed.returncode == 0, (fixed.stdout + fixed.stderr)[-4000:]

    elastic_cmd = command(
        nodes,
        tmp_path,
        fmnist_root,
        "elastic",
        "run.num_workers=[1,2]",
        "run.max_failures=5",
        "run.resize_interval_s=2",
        "debug.pause_at=mid_epoch,resized",
        "debug.pause_s=600",
    )
    log, err = tmp_path / "elastic.log", tmp_path / "elastic.err"
    with log.open("w") as out, err.open("w") as errors:
        proc = subprocess.Popen(elastic_cmd, cwd=REPO, env=env, stdout=out, stderr=errors, start_new_session=True)
    out_dir, run_dir = tmp_path / "out", tmp_path / "shared" / "elastic"
    try:
        # Rank 0 holds in epoch 2; once Ray has registered the epoch-1 checkpoint, take the node away.
        wait_for(lambda: (out_dir / ".paused_elastic_mid_epoch").exists(), proc, "the pause in epoch 2")
        wait_for(lambda: 1 in registered_epochs(run_dir), proc, "the epoch-1 checkpoint")
        nodes.stop_second()
        # The one-worker group holds after its epoch-2 checkpoint: bring the node back.
        wait_for(lambda: (out_dir / ".paused_elastic_resized").exists(), proc, "the one-worker group's checkpoint")
        wait_for(lambda: 2 in registered_epochs(run_dir), proc, "the epoch-2 checkpoint")
        nodes.start_second()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = log.read_text()
    assert proc.returncode == 0, said[-3000:] + err.read_text()[-3000:]

    # One line per resize, on rank 0's console; the one-worker group trained epoch 2 from checkpoint 1.
    # (The two nodes share this machine's session folder and each node's log monitor prints the worker logs
    # in it, so here a worker line can reach the console more than once; in-process, test_resume.py checks
    # that a resize prints exactly one line.)
    assert list(dict.fromkeys(re.findall(r"\[elastic\] group resized .*", said))) == [
        "[elastic] group resized 2 -> 1 worker(s) at epoch 2 (step 3); per-worker batch 32 -> 64",
        "[elastic] group resized 1 -> 2 worker(s) at epoch 3 (step 6); per-worker batch 64 -> 32",
    ], said[-4000:]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["byol-ray"], filter_string="attributes.run_name = 'elastic'")
    assert list(runs["status"]) == ["FINISHED"], runs[["run_id", "status"]]
    assert runs.iloc[0]["tags.world_size"] == "[1, 2]" and runs.iloc[0]["params.run.num_workers"] == "[1, 2]"
    client = mlflow.MlflowClient()
    run_id = runs.iloc[0]["run_id"]

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    assert history("workers") == {1: 2.0, 2: 1.0, 3: 2.0}
    # The step count, and with it the lr and tau schedules, as the fixed run's.
    fixed_id = mlflow.search_runs(experiment_names=["byol-ray"], filter_string="attributes.run_name = 'fixed'").iloc[0][
        "run_id"
    ]
    for key in ("step", "lr", "tau"):
        assert history(key) == {m.step: m.value for m in client.get_metric_history(fixed_id, key)}, key
    # Every epoch's replicas were compared: each rank's target checksum logged and equal to rank 0's.
    assert history("replicas_in_sync") == {1: 1.0, 2: 1.0, 3: 1.0}
    rank0, rank1 = history("target_checksum_rank0"), history("target_checksum_rank1")
    assert sorted(rank1) == [1, 3] and all(rank1[e] == rank0[e] for e in rank1)

    fixed_acc = client.get_run(fixed_id).data.metrics["eval/byol/linear_top1"]
    elastic_acc = runs.iloc[0]["metrics.eval/byol/linear_top1"]
    assert abs(elastic_acc - fixed_acc) <= 1.0, (elastic_acc, fixed_acc)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
