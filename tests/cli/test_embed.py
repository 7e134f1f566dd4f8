"""`byol-ray embed` through its CLI: on the Fashion-MNIST test split its embeddings equal the evaluator's
features (a real checkpoint, a real local Ray, a real Parquet file), and bad inputs fail with one paragraph
before Ray starts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import SMALL_MODEL, write_checkpoint

from byol_ray.cli import embed as embed_cli
from byol_ray.config import load_config
from byol_ray.core.state import encoder_from_state, load_state
from byol_ray.data.readers import channel_stats, load_split
from byol_ray.eval.scoring import extract_features


def tiny_checkpoint(tmp_path, fmnist_root):
    cfg = load_config(None, SMALL_MODEL + [f"data.root={fmnist_root}", "data.train_subset=3000", "run.seed=3"])
    return cfg, write_checkpoint(cfg, tmp_path / "ckpt" / "checkpoint_000001")


@pytest.mark.ray
def test_embeddings_of_the_fmnist_test_split_equal_the_evaluators_features(tmp_path, fmnist_root, capsys):
    cfg, ckpt = tiny_checkpoint(tmp_path, fmnist_root)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": {"root": fmnist_root}}))
    out = tmp_path / "emb.parquet"
    argv = ["--encoder", str(ckpt), "--data", str(tmp_path / "data.yaml"), "--output", str(out)]
    assert embed_cli.main(argv + ["--batch-size", "1000"]) == 0
    assert "[embed] 10000/10000 images (100%)" in capsys.readouterr().out

    table = pq.read_table(out)
    assert table.column_names == ["id", "label", "embedding"]
    test = load_split(cfg.data, "test")
    mean, std = channel_stats(load_split(cfg.data, "train").images)
    want = extract_features(encoder_from_state(load_state(ckpt)), test.images, 28, mean, std).numpy()
    ids = np.asarray(table.column("id").to_pylist())
    assert sorted(ids.tolist()) == list(range(10000))
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert got.shape == want.shape
    assert np.abs(got - want[ids]).max() < 1e-5
    assert np.array_equal(np.asarray(table.column("label").to_pylist()), test.labels.numpy()[ids])


def test_bad_inputs_fail_with_one_paragraph_before_ray(tmp_path, fmnist_root, image_folder, capsys):
    import ray

    _, ckpt = tiny_checkpoint(tmp_path, fmnist_root)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "taken.parquet").write_bytes(b"")
    cases = {
        "no state.pt there": ["--encoder", str(tmp_path / "nowhere"), "--data", str(image_folder / "val")],
        "holds no images": ["--encoder", str(ckpt), "--data", str(tmp_path / "empty")],
        "already exists": [
            "--encoder",
            str(ckpt),
            "--data",
            str(image_folder / "val"),
            "--output",
            str(tmp_path / "taken.parquet"),
        ],  # fmt: skip
    }
    for expected, argv in cases.items():
        if "--output" not in argv:
            argv = argv + ["--output", str(tmp_path / "new.parquet")]
        assert embed_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "Traceback" not in err and "\n" not in err
    assert not ray.is_initialized() and not (tmp_path / "new.parquet").exists()
