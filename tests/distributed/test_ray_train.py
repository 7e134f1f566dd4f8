"""Data-parallel BYOL on a real local Ray runtime (2 workers on over-subscribed logical CPUs), with a
real SQLite MLflow store: replica sync, a caught divergence, a killed worker resuming bit-exactly, fast
failure on impossible resources, and the logged model loading back."""

from __future__ import annotations

import time

import mlflow
import pytest
import torch
from conftest import TINY

from byol_ray.config import load_config
from byol_ray.core.state import latest_checkpoint, load_state
from byol_ray.distributed.cluster import ResourceError
from byol_ray.distributed.driver import run_training
from byol_ray.errors import UserError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # 4 logical CPUs on a 2-core machine: room for 2 one-CPU workers plus Ray Train's own actors.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny(tmp_path, *extra):
    return load_config(None, TINY + [f"run.output_dir={tmp_path}", *extra])


def search(tmp_path, **kw):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["byol-ray"], **kw)


def final_state(out) -> dict:
    with out["checkpoint"].as_directory() as d:
        return load_state(d)


def test_two_workers_stay_in_sync_and_log_to_mlflow(ray_local, tmp_path):
    cfg = tiny(tmp_path, "run.name=sync")
    out = run_training(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = search(tmp_path, filter_string="tags.`byol_ray.run_name` = 'sync'")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.optim.batch_size"] == "64"
    assert run["params.run.num_workers"] == "2"
    assert run["tags.world_size"] == "2"
    client = mlflow.tracking.MlflowClient(uri)
    # Both workers' target checksums, every epoch, identical.
    r0 = client.get_metric_history(out["run_id"], "target_checksum_rank0")
    r1 = client.get_metric_history(out["run_id"], "target_checksum_rank1")
    assert [m.step for m in r0] == [1, 2, 3]
    assert [m.value for m in r0] == [m.value for m in r1]
    assert len({m.value for m in r0}) == 3  # the target moves between epochs
    assert [m.step for m in client.get_metric_history(out["run_id"], "loss")] == [1, 2, 3]
    assert run["metrics.eval/byol/linear_top1"] > 10.0
    assert {"eval/byol/knn_top1", "eval/raw_pixels/linear_top1", "eval/untrained_encoder/linear_top1"} <= {
        k.removeprefix("metrics.") for k in runs.columns
    }
    # The logged encoder loads back and gives the checkpoint's features.
    from byol_ray.core.model import OnlineNetwork

    state = final_state(out)
    online = OnlineNetwork(cfg.model, 1)
    online.load_state_dict(state.trainer["online"])
    # It serves embeddings: uint8 images in, the encoder's features under the evaluation transform out.
    from byol_ray.eval.embedding import input_stats
    from byol_ray.eval.scoring import extract_features

    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    loaded = mlflow.pytorch.load_model(out["model_uri"])  # saved as torch.export's pt2 (no pickle)
    with torch.no_grad():
        want = extract_features(online.encoder.eval(), x, 28, *input_stats(cfg))
        assert torch.allclose(loaded(x), want, atol=1e-5, rtol=0)
    # Online and target weights are equal on both ranks; the target differs from the online network.
    assert not torch.equal(
        state.trainer["online"]["branch.encoder.conv1.weight"], state.trainer["target"]["encoder.conv1.weight"]
    )


def test_a_diverged_replica_is_caught(ray_local, tmp_path):
    cfg = tiny(tmp_path, "run.name=diverge", "debug.perturb_target_rank=1", "optim.epochs=2")
    with pytest.raises(Exception) as info:
        run_training(cfg)
    text = str(info.value)
    assert "replicas diverged" in text and "rank(s) [1]" in text
    assert "target.encoder.conv1.weight" in text
    runs = search(tmp_path)
    assert list(runs["status"]) == ["FAILED"]


def test_killed_worker_resumes_bit_exactly(ray_local, tmp_path):
    ref = run_training(tiny(tmp_path / "ref", "run.name=ref", "tracking.log_model=false"))
    # Rank 1 SIGKILLs its own process at step 4, in the middle of epoch 2 (3 steps per epoch).
    crashed = run_training(
        tiny(
            tmp_path / "crash",
            "run.name=crash",
            "debug.crash_rank=1",
            "debug.crash_at_step=4",
            "run.max_failures=1",
            "tracking.log_model=false",
        )
    )
    assert (tmp_path / "crash" / ".crashed_crash_1_4").exists()
    a, b = final_state(ref).trainer, final_state(crashed).trainer
    for part in ("online", "target"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after the restart"
    assert crashed["metrics"]["restarts"] == 1 and crashed["metrics"]["epoch"] == 3
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'crash'}/mlflow.db")
    run = client.get_run(crashed["run_id"])
    assert run.data.tags["restarts"] == "1"
    hist = client.get_metric_history(crashed["run_id"], "restarts")
    assert [m.value for m in hist if m.step == 3] == [1.0]


def test_a_torn_latest_checkpoint_resumes_from_the_one_before(ray_local, tmp_path, capsys):
    """A truncated state.pt in the newest checkpoint (a disk that lost its tail): the rerun says so and
    resumes from the checkpoint before it, retracing the lost epoch bit for bit."""
    cfg = tiny(tmp_path, "run.name=torn", "run.num_workers=1", "tracking.enabled=false", "eval.final=false")
    first = final_state(run_training(cfg))
    run_dir = tmp_path / "ray_results" / "torn"
    latest = latest_checkpoint(run_dir)
    state_file = latest / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:1000])

    out = run_training(cfg)
    said = capsys.readouterr().out
    assert f"the checkpoint {latest} cannot be read" in said and "resumes from the one before it" in said
    assert out["metrics"]["epoch"] == 3 and out["metrics"]["restarts"] == 1
    again = final_state(out).trainer
    for part in ("online", "target"):
        for k in first.trainer[part]:
            assert torch.equal(first.trainer[part][k], again[part][k]), f"{part}.{k} differs"


def test_a_user_error_in_a_worker_is_not_retried(ray_local, tmp_path):
    """An error from the user's input raised in a worker (injected on rank 1 in epoch 2) ends the run at
    once: the driver raises that UserError itself, although run.max_failures allows 3 retries."""
    # No checkpoint before the end: each attempt would train (and log) epoch 1 again.
    cfg = tiny(
        tmp_path,
        "run.name=bad",
        "debug.crash_rank=1",
        "debug.crash_at_step=4",
        "debug.crash_kind=user_error",
        "run.max_failures=3",
        "run.checkpoint_every=10",
    )
    with pytest.raises(UserError, match="debug.crash_kind=user_error: rank 1 raised this at step 4"):
        run_training(cfg)
    runs = search(tmp_path)
    assert list(runs["status"]) == ["FAILED"]
    assert runs.iloc[0]["tags.error"].startswith("UserError: debug.crash_kind=user_error")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    epoch1 = [m for m in client.get_metric_history(runs.iloc[0]["run_id"], "loss") if m.step == 1]
    assert len(epoch1) == 1, "the worker group was started again"


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["run.num_workers=8"], "cannot hold 8 worker(s)"),
        (["run.gpus_per_worker=1", "run.num_workers=1"], "GPU"),
    ],
)
def test_impossible_resources_fail_fast(ray_local, tmp_path, extra, needle):
    cfg = tiny(tmp_path, *extra, "tracking.enabled=false")
    t0 = time.monotonic()
    with pytest.raises(ResourceError) as info:
        run_training(cfg)
    assert time.monotonic() - t0 < 30
    assert needle in str(info.value)
