"""Two real Ray nodes on this machine (conftest's `two_nodes`), one CPU each, and a
2-worker training connected with `run.address`: one worker lands on each node, checkpoints go to the
shared `run.storage_path`, and the run finishes in MLflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import mlflow
import pytest
from conftest import REPO, tiny_train

pytestmark = pytest.mark.ray


def test_two_workers_train_on_two_nodes(two_nodes, tmp_path):
    address, env = two_nodes.address, two_nodes.env
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    shared = tmp_path / "shared"
    cmd = tiny_train(
        "optim.epochs=2",
        f"run.address={address}",
        f"run.output_dir={tmp_path / 'out'}",
        f"run.storage_path={shared}",
        "run.name=two-nodes",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_model=false",
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    # Each worker prints the node it runs on; the two ranks are on the two different nodes.
    nodes = dict(re.findall(r"\[worker\] rank (\d) of 2 on node ([0-9a-f]+)", out))
    assert set(nodes) == {"0", "1"}, out[-4000:]
    assert nodes["0"] != nodes["1"]
    # ... which are the cluster's two nodes. (Asked from a fresh process: Ray reads RAY_AUTH_MODE at import.)
    query = (
        f"import ray; ray.init(address='{address}', log_to_driver=False); "
        "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    )
    alive = subprocess.run([sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=120)
    assert set(nodes.values()) == set(alive.stdout.split()), alive.stdout + alive.stderr[-2000:]

    # Checkpoints in the shared storage path, one per epoch (keep_checkpoints=2).
    ckpts = sorted(p.name for p in (shared / "two-nodes").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2, list((shared / "two-nodes").iterdir())
    for c in ckpts:
        assert (shared / "two-nodes" / c / "state.pt").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    assert list(runs["status"]) == ["FINISHED"] and runs.iloc[0]["tags.world_size"] == "2"
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_embed_runs_on_two_nodes(two_nodes, tmp_path, fmnist_root):
    """`byol-ray embed --address`: with one CPU per node, the encoder actor holds one node's CPU, so the
    read tasks decode on the other; the embeddings are those computed here in-process."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from conftest import SMALL_MODEL, write_checkpoint, write_image_folder

    from byol_ray.config import load_config
    from byol_ray.core.state import encoder_from_state, load_state
    from byol_ray.data.readers import decode_image
    from byol_ray.eval.embedding import fit_channels, input_stats
    from byol_ray.eval.scoring import extract_features

    address, env = two_nodes.address, two_nodes.env
    cfg = load_config(None, SMALL_MODEL + [f"data.root={fmnist_root}", "data.train_subset=3000"])
    ckpt = write_checkpoint(cfg, tmp_path / "ckpt" / "checkpoint_000001")
    val = write_image_folder(tmp_path / "imgs") / "val"
    out = tmp_path / "emb.parquet"
    cmd = [sys.executable, "-m", "byol_ray.cli", "embed", "--address", address, "--encoder", str(ckpt)]
    cmd += ["--data", str(val), "--output", str(out), "--batch-size", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[embed] 9/9 images (100%)" in proc.stdout

    table = pq.read_table(out)
    assert table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    paths = table.column("id").to_pylist()
    images = fit_channels(torch.from_numpy(np.stack([decode_image(p, 28) for p in paths])), 1)
    want = extract_features(encoder_from_state(load_state(ckpt)), images, 28, *input_stats(cfg)).numpy()
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(got - want).max() < 1e-5
