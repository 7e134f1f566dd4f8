"""The encoder as a served MLflow model, in a real SQLite store: `mlflow.pyfunc.load_model(uri).predict`
on uint8 Fashion-MNIST images returns the evaluator's features, and the model carries its signature, its
input example and its stated pip requirements. And what `byol-ray embed --data` accepts and refuses, before any Ray."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL_MODEL

from byol_ray.config import load_config
from byol_ray.core.model import build_encoder
from byol_ray.data.readers import channel_stats, load_split
from byol_ray.eval.embedding import EmbedInputError, embed_source, example_images, serving_model
from byol_ray.eval.scoring import extract_features
from byol_ray.tracking.models import load_model_weights, model_requirements
from byol_ray.tracking.tracker import Tracker


def test_the_logged_encoder_serves_the_evaluators_features(fmnist_root, tmp_path):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        None,
        SMALL_MODEL
        + [f"data.root={fmnist_root}", "data.train_subset=2000", f"run.output_dir={tmp_path}"]
        + [f"tracking.tracking_uri={db}", "tracking.system_metrics=false"],
    )
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, 1).eval()
    tracker = Tracker.start(cfg, run_name="serve")
    uri = tracker.log_model(serving_model(cfg, encoder), "encoder", input_example=example_images(cfg, 1))
    tracker.end()

    mlflow.set_tracking_uri(db)
    test = load_split(cfg.data, "test").subset(40)
    served = mlflow.pyfunc.load_model(uri).predict(test.images.numpy())
    mean, std = channel_stats(load_split(cfg.data, "train").images)
    want = extract_features(encoder, test.images, 28, mean, std)
    assert served.shape == tuple(want.shape) and np.abs(served - want.numpy()).max() < 1e-5

    info = mlflow.models.get_model_info(uri)
    (spec,) = info.signature.inputs.inputs
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 1, 28, 28)
    assert info.signature.outputs.inputs[0].shape == (-1, want.shape[1])
    assert info.saved_input_example_info is not None
    # Its pip requirements are the ones stated (mlflow adds itself), with no local build label: not inferred.
    reqs = mlflow.pyfunc.get_model_dependencies(uri)
    with open(reqs) as f:
        stated = {line.strip() for line in f if line.strip()}
    assert stated == {f"mlflow=={mlflow.__version__}", *model_requirements()}
    assert all("+" not in r for r in stated)
    # `byol-ray eval` rebuilds the bare encoder from the served model's weights.
    again = build_encoder(cfg.model, 1)
    again.load_state_dict(load_model_weights(uri, db))
    assert torch.equal(extract_features(again.eval(), test.images, 28, mean, std), want)


def test_embed_sources_and_their_refusals(image_folder, fmnist_root, tmp_path):
    val = embed_source(str(image_folder / "val"))
    assert val.kind == "folder" and len(val.paths) == 9 and val.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert embed_source(str(image_folder)).labels == []  # train/<class>/...: no class folder right below
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no image")
    with pytest.raises(EmbedInputError, match="holds no images"):
        embed_source(str(tmp_path / "empty"))
    with pytest.raises(EmbedInputError, match="neither a folder of images nor a YAML config"):
        embed_source(str(tmp_path / "missing"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"root": fmnist_root}}))
    src = embed_source(str(tmp_path / "c.yaml"))
    assert src.kind == "dataset" and src.split == "test" and src.data["dataset"] == "fashion_mnist"
