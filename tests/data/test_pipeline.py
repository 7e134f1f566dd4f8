"""The streamed folder input (``data/pipeline.py``): the same pixels as the in-memory reader, crops that are
reproducible and independent of the worker count, and a streamed pretraining that resumes exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import folder_cfg
from PIL import Image

from byol_ray.config import AugmentConfig
from byol_ray.data.pipeline import FolderImages, FolderStream, PrecroppedTwoViews
from byol_ray.data.readers import load_split
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession


def test_stream_centre_mode_reads_the_same_pixels_as_the_in_memory_reader(image_folder, tmp_path):
    cfg = folder_cfg(image_folder, tmp_path, "data.stream=false", "data.num_workers=2")
    mem = load_split(cfg.data, "train")
    stream = FolderStream(cfg, "train", torch.device("cpu"), mode="centre")
    assert len(stream) == len(mem) == 36 and stream.classes == mem.classes == ["ant", "bee", "cat"]
    idx = torch.tensor([35, 0, 7, 18, 12, 3])
    ((images, labels),) = next(stream.micro_batches(0, [[idx]]))
    assert images.dtype == torch.uint8 and torch.equal(images, mem.images[idx])
    assert torch.equal(labels, mem.labels[idx])
    # The estimated normalisation covers the whole (small) split: the in-memory statistics.
    from byol_ray.data.readers import channel_stats

    assert stream.mean == pytest.approx(channel_stats(mem.images)[0]) and stream.std == pytest.approx(
        channel_stats(mem.images)[1]
    )


def test_stream_crops_are_reproducible_independent_and_worker_count_free(image_folder, tmp_path):
    cfg = folder_cfg(image_folder, tmp_path)
    ds = FolderStream(cfg, "train", torch.device("cpu")).dataset
    a, _ = ds[(0, 5)]
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, ds[(0, 5)][0])  # same (epoch, index): same crops
    assert not torch.equal(a, ds[(1, 5)][0])  # another epoch: new crops
    assert not torch.equal(a[0], a[1])  # the two views are cropped independently
    # Full-image "crops" are exactly PIL's bicubic resize of the whole image.
    full = AugmentConfig()
    full.view1.crop_scale = full.view2.crop_scale = (1.0, 1.0)
    im = Image.open(ds.paths[2]).convert("RGB")
    full.view1.crop_ratio = full.view2.crop_ratio = (im.width / im.height,) * 2
    whole = FolderImages(list(zip(ds.paths, ds.labels)), 16, full, 0)[(0, 2)][0]
    want = np.asarray(im.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert torch.equal(whole[0], torch.from_numpy(want.copy()))
    # Batches do not depend on how many worker processes decode them.
    idx = [torch.tensor([3, 1, 4, 15]), torch.tensor([9, 2, 6, 5])]
    got = {}
    for workers in (0, 2):
        s = FolderStream(
            folder_cfg(image_folder, tmp_path, f"data.num_workers={workers}"), "train", torch.device("cpu")
        )
        got[workers] = list(s.micro_batches(2, [[i] for i in idx]))
    for [(x0, y0)], [(x2, y2)] in zip(got[0], got[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_precropped_views_apply_the_rest_of_the_augmentation():
    aug = AugmentConfig()
    pv = PrecroppedTwoViews(aug, 16, (0.5,) * 3, (0.25,) * 3)
    assert "crop" not in pv.batched.ops and "blur" in pv.batched.ops
    x = torch.randint(0, 256, (8, 2, 3, 16, 16), dtype=torch.uint8)
    v1, v2 = pv(x, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (8, 3, 16, 16) and v1.dtype == torch.float32
    with pytest.raises(ValueError, match="pre-cropped"):
        pv(x[:, 0], torch.Generator())


def test_streamed_pretraining_runs_and_resumes_exactly(image_folder, tmp_path):
    """The loop on a streamed folder: one epoch trains; a second run from its checkpoint replays epoch 2
    exactly as an uninterrupted 2-epoch run does (crops seeded by epoch and index)."""
    base = ["data.num_workers=1", "optim.steps_per_epoch=2", "optim.warmup_epochs=0"]
    cfg = folder_cfg(image_folder, tmp_path, *base, "optim.epochs=2")
    full = pretrain(cfg, LocalSession(tmp_path / "run"))
    assert full["train"]["step"] == 4 and np.isfinite(full["train"]["loss"])
    # As if it had crashed during epoch 2: only the epoch-1 checkpoint is left.
    shutil.rmtree(tmp_path / "run" / "checkpoint_000002")
    session = LocalSession(tmp_path / "run")
    resumed = pretrain(cfg, session)
    assert len(session.reports) == 1 and resumed["train"]["step"] == 4
    assert resumed["train"]["loss"] == full["train"]["loss"]
    for k, v in full["trainer"].state_dict()["online"].items():
        assert torch.equal(v, resumed["trainer"].state_dict()["online"][k]), k
