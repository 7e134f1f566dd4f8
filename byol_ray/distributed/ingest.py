"""The Ray Data ingest (``data.loader=ray_data``): a streamed image folder decoded and cropped by Ray Data
tasks on any node of the cluster, CPU-only ones included, and sharded into the Ray Train workers.

The driver hands `TorchTrainer` a dataset *factory* (`train_dataset`); Ray Train calls it each time it
starts the worker group, so a group restarted after a failure (or a rerun of the driver) gets a stream
that begins at the epoch of the run's latest checkpoint. The stream is one row per (epoch, position) of
every epoch still to train, in each epoch's shuffled order (the DataLoader path's `epoch_permutation`);
a Ray Data task turns a row into the image's two random-resized crops with `data.pipeline.crop_views`,
the function the DataLoader workers call, seeded by (run seed, the row's epoch, image index). Only the
uint8 crops travel to the workers. Each worker takes its shard with `ray.train.get_dataset_shard`
(Ray Train's streaming split: rows go to whichever worker asks next) and iterates torch batches; flip,
jitter, grayscale, blur and solarize stay batched on its device (`pipeline.PrecroppedTwoViews`).

What a resume guarantees here: the stream restarts at the checkpoint's epoch with the same crops per
(epoch, image) as the interrupted run drew, so the views follow the same distribution and every epoch's
crops are new; which worker and which batch an image lands in depends on Ray's scheduling, so unlike
the DataLoader path the resumed run does not retrace the interrupted one bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import torch

from ..config import Config
from ..core.state import CheckpointError, resumable_checkpoint
from ..data.augment import TwoViews
from ..data.pipeline import PrecroppedTwoViews, crop_views, estimate_stats
from ..data.readers import DataError, folder_files
from ..errors import UserError
from ..training.loop import seeded_permutation, steps_per_epoch
from .preflight import storage_path

DATASET = "train"  # the key of the trainer's datasets and of get_dataset_shard
ROWS_PER_TASK = 16  # images one Ray Data task decodes and crops per batch


class IngestResourceError(UserError):
    """The cluster leaves no CPU for the Ray Data tasks beside the training workers."""


# ---- the driver's side --------------------------------------------------------------------------
def uses_ray_data(cfg: Config) -> bool:
    """Whether the run's train split comes through this ingest (validation ties it to a streamed folder)."""
    return cfg.data.stream and cfg.data.loader == "ray_data"


def check_ingest_capacity(cfg: Config) -> None:
    """Connected: the cluster keeps at least one CPU beside the worker group for the decode tasks, which
    would otherwise wait for ever (Ray Train reserves the workers' CPUs away from Ray Data); an elastic
    group at its max."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    workers = cfg.run.max_workers * cfg.run.cpus_per_worker
    if total - workers < 1.0:
        raise IngestResourceError(
            f"data.loader=ray_data decodes and crops in Ray Data tasks, which need at least one CPU beside the "
            f"training workers, but the Ray cluster has {total:g} CPUs and the {cfg.run.max_workers} worker(s) "
            f"take {workers:g}. Lower run.num_workers or run.cpus_per_worker, add a (CPU-only) node, or use "
            f"data.loader=dataloader."
        )


def start_epoch(cfg: Config) -> int:
    """The epoch the run's latest readable checkpoint ends (0 for a new run or remote storage, whose
    workers still resume from their checkpoint: the stream then replays the first epochs' crops)."""
    path = storage_path(cfg)
    if "://" in path:
        return 0
    try:
        found = resumable_checkpoint(f"{path}/{cfg.run.name}")
    except CheckpointError:
        return 0  # the workers report it with their own paragraph
    return 0 if found is None else min(found[0].epoch, cfg.optim.epochs - 1)


def train_dataset(config: dict[str, Any]) -> ray.data.Dataset:
    """Every epoch still to train, as a lazy Ray Dataset of {"views": uint8 [2, 3, S, S], "label", "epoch",
    "index"} rows (Ray Train calls this at each worker-group start)."""
    cfg = Config.from_dict(config)
    files, _ = folder_files(cfg.data, "train")
    n = len(files)
    per_epoch = steps_per_epoch(cfg, n) * cfg.optim.batch_size
    first = start_epoch(cfg)
    rows = (cfg.optim.epochs - first) * per_epoch
    workers = cfg.data.num_workers
    # Ray's stubs type the function as taking the batch alone; the rest comes as fn_kwargs, which Ray puts
    # in its object store once rather than in every task.
    fn: Any = crop_rows
    return ray.data.range(rows).map_batches(
        fn,
        fn_kwargs={
            "paths": [str(p) for p, _ in files],
            "labels": np.array([lab for _, lab in files], dtype=np.int64),
            "config": config,
            "first_epoch": first,
            "per_epoch": per_epoch,
        },
        batch_size=ROWS_PER_TASK,
        batch_format="numpy",
        num_cpus=1,
        concurrency=workers if workers > 0 else None,
    )


@functools.lru_cache(maxsize=2)
def _order(seed: int, n: int, epoch: int) -> np.ndarray:
    """One epoch's shuffled image order, kept while a task works through that epoch's rows."""
    return seeded_permutation(seed, n, epoch).numpy()


def crop_rows(
    batch: dict[str, np.ndarray],
    paths: list[str],
    labels: np.ndarray,
    config: dict,
    first_epoch: int,
    per_epoch: int,
) -> dict[str, np.ndarray]:
    """A Ray Data task's work: stream row ids -> (epoch, image) -> both views' crops, decoded from the file."""
    cfg = Config.from_dict(config)
    ids = batch["id"].astype(np.int64)
    epochs = first_epoch + ids // per_epoch
    index = np.array(
        [_order(cfg.run.seed, len(paths), int(e))[p] for e, p in zip(epochs, ids % per_epoch)], dtype=np.int64
    )
    views = (cfg.augment.view1, cfg.augment.view2)
    crop = "crop" in cfg.augment.ops
    out = np.stack(
        [
            crop_views(paths[i], cfg.data.image_size, views, crop, cfg.run.seed, int(e), int(i))
            for e, i in zip(epochs, index)
        ]
    )
    return {"views": out, "label": labels[index], "epoch": epochs, "index": index}


# ---- each worker's side -------------------------------------------------------------------------
class RayDataStream:
    """This worker's shard of the Ray Data stream, shaped as the loop's `pipeline.FolderStream`: its
    length, channel statistics and view maker, and per optimiser step its micro-batches."""

    channels = 3

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        files, self.classes = folder_files(cfg.data, "train")
        self.n = len(files)
        # The same estimate as the DataLoader path's, so both normalise alike.
        self.mean, self.std = estimate_stats([str(p) for p, _ in files], cfg.data.image_size, 1)
        self.shard = ray.train.get_dataset_shard(DATASET)
        self._batches: Any = None

    def __len__(self) -> int:
        return self.n

    def device_views(self, views: TwoViews) -> PrecroppedTwoViews:
        b = views.batched
        return PrecroppedTwoViews(self.cfg.augment, b.out_size, b.mean, b.std)

    def micro_batches(self, epoch: int, plan):
        """Per optimiser step, its micro-batches [(views [b, 2, 3, S, S], labels), ...]. The stream runs on
        across epochs: `plan` gives only how many steps and images are taken (Ray decides which images)."""
        for step in plan:
            if self._batches is None:
                self._batches = iter(
                    self.shard.iter_torch_batches(
                        batch_size=len(step[0]),
                        drop_last=True,
                        prefetch_batches=self.cfg.data.prefetch_batches,
                        device=self.device,
                        pin_memory=self.device.type == "cuda",
                    )
                )
            out = []
            for _ in step:
                try:
                    b = next(self._batches)
                except StopIteration:
                    raise DataError(
                        f"{self.cfg.data.root}: the Ray Data stream ended early (did the files change?)"
                    ) from None
                out.append((b["views"], b["label"]))
            yield out


def stream_factory(cfg: Config, device: torch.device) -> RayDataStream | None:
    """What `training.loop.pretrain` calls for its streamed split inside a Ray Train worker."""
    return RayDataStream(cfg, device) if cfg.data.loader == "ray_data" else None
