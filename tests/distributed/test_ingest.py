"""The Ray Data ingest (data.loader=ray_data) on a real local Ray runtime, over image folders the tests
write: its crops are the DataLoader path's, new each epoch and distributed alike; a Ray Train run trains
from it; a resumed run's stream starts at the checkpoint's epoch; bad set-ups fail with one paragraph."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import folder_cfg
from PIL import Image

from byol_ray.data.pipeline import FolderImages
from byol_ray.data.readers import folder_files
from byol_ray.distributed import ingest
from byol_ray.errors import UserError
from byol_ray.training.loop import epoch_permutation, pretrain
from byol_ray.training.session import LocalSession

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_ramps(root, n=16, side=64):
    """Images whose red channel is 4x the column and green 4x the row: a crop's pixels give its box."""
    y, x = np.mgrid[0:side, 0:side]
    ramp = np.stack([x * 4, y * 4, np.zeros_like(x)], -1).astype(np.uint8)
    for split in ("train", "val"):
        d = root / split / "ramp"
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(ramp).save(d / f"{i}.png")
    return root


def crop_fraction(views: np.ndarray) -> np.ndarray:
    """Per view, the estimated crop area as a fraction of the image, from the ramps' spans."""
    r, g = views[:, 0].astype(float), views[:, 1].astype(float)
    w = (np.percentile(r, 99, axis=(1, 2)) - np.percentile(r, 1, axis=(1, 2))) / 252
    h = (np.percentile(g, 99, axis=(1, 2)) - np.percentile(g, 1, axis=(1, 2))) / 252
    return w * h


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_ray_data_crops_are_the_dataloader_paths_new_each_epoch(ray_local, image_folder, tmp_path):
    cfg = folder_cfg(image_folder, tmp_path, "data.loader=ray_data", "optim.epochs=3")
    rows = ingest.train_dataset(cfg.to_dict()).take_all()
    files, _ = folder_files(cfg.data, "train")
    per_epoch = len(files) // 8 * 8  # whole batches of 8
    assert len(rows) == 3 * per_epoch
    ref = FolderImages(files, 16, cfg.augment, cfg.run.seed)
    for e in range(3):
        mine = [r for r in rows if r["epoch"] == e]
        # Each epoch takes the DataLoader path's shuffled images, each once.
        order = epoch_permutation(cfg, len(files), e)[:per_epoch].tolist()
        assert sorted(int(r["index"]) for r in mine) == sorted(order)
        for r in mine:
            assert np.array_equal(r["views"], ref.crops(e, int(r["index"])))
            assert r["label"] == files[int(r["index"])][1]
    # New crops each epoch for the same image.
    first = {int(r["index"]): r["views"] for r in rows if r["epoch"] == 0}
    later = {int(r["index"]): r["views"] for r in rows if r["epoch"] == 1}
    shared = set(first) & set(later)
    assert shared and all(not np.array_equal(first[i], later[i]) for i in shared)


def test_ray_data_views_follow_the_dataloader_distribution(ray_local, tmp_path):
    """Crop areas of the Ray Data stream (seed 0) against the DataLoader path's (seed 1): a two-sample
    Kolmogorov-Smirnov test at a 0.1% level, per view (T and T' share their crop distribution)."""
    root = write_ramps(tmp_path / "ramps")
    cfg = folder_cfg(root, tmp_path, "data.loader=ray_data", "optim.epochs=8", "data.image_size=32")
    rows = ingest.train_dataset(cfg.to_dict()).take_all()
    ray_views = np.stack([r["views"] for r in rows])  # [n, 2, 3, S, S]
    files, _ = folder_files(cfg.data, "train")
    ref = FolderImages(files, 32, cfg.augment, seed=1)
    loader_views = np.stack([ref.crops(e, i) for e in range(8) for i in range(len(files))])
    n = len(ray_views)
    assert n == 128
    critical = 1.95 * np.sqrt(2 / n)
    for v in range(2):
        a, b = crop_fraction(ray_views[:, v]), crop_fraction(loader_views[:, v])
        assert ks_statistic(a, b) < critical
        assert 0.05 < a.min() and a.max() <= 1.05 and 0.4 < a.mean() < 0.7  # RandomResizedCrop's (0.08, 1)


def test_training_from_the_ray_data_stream_and_its_resume_epoch(ray_local, image_folder, tmp_path):
    from byol_ray.distributed.driver import run_training

    cfg = folder_cfg(
        image_folder, tmp_path, "data.loader=ray_data", "optim.epochs=2", "run.num_workers=1", "run.name=rd"
    )
    out = run_training(cfg)
    assert out["metrics"]["epoch"] == 2 and np.isfinite(out["metrics"]["loss"])
    assert out["metrics"]["images_per_s"] > 0
    # A rerun with more epochs streams from the checkpoint's epoch on.
    more = cfg.replace({"optim.epochs": 3})
    assert ingest.start_epoch(more) == 2
    assert {int(r["epoch"]) for r in ingest.train_dataset(more.to_dict()).take_all()} == {2}


def test_ray_data_capacity_and_in_process_use_fail_with_one_paragraph(ray_local, image_folder, tmp_path):
    # The runtime has 3 CPUs: 2 one-CPU workers leave one for the decode tasks, 3 leave none.
    cfg = folder_cfg(image_folder, tmp_path, "data.loader=ray_data", "run.cpus_per_worker=1", "optim.batch_size=12")
    ingest.check_ingest_capacity(cfg.replace({"run.num_workers": 2}))
    with pytest.raises(ingest.IngestResourceError, match="at least one CPU beside"):
        ingest.check_ingest_capacity(cfg.replace({"run.num_workers": 3}))
    with pytest.raises(UserError, match="data.loader=dataloader here"):
        pretrain(folder_cfg(image_folder, tmp_path, "data.loader=ray_data"), LocalSession(tmp_path / "ck"))
