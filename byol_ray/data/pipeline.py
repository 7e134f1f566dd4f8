"""Streaming input for image folders that do not fit in memory (``data.dataset=folder``, ``data.stream``).

The in-memory path (``readers.py``) decodes a whole split into one uint8 tensor before training; for
ImageNet (1.28 M images, about 190 GB at 224 px) that is impossible. Here a torch DataLoader reads each
file in ``data.num_workers`` worker processes, decodes it and cuts BYOL's two random-resized crops from
the full-resolution image (one per view, each resized to ``data.image_size`` with PIL's antialiased
bicubic), so only the crops cross process boundaries, as uint8. Batches are pinned on CUDA and
``data.prefetch_batches`` batches per worker are decoded ahead. The rest of each view (flip, colour
jitter, grayscale, blur, solarize, normalisation) stays batched on the training device
(`PrecroppedTwoViews`, the same `TwoViews` without its crop op).

Randomness: each image's crop boxes come from a generator seeded by (run seed, epoch, image index), so
an epoch's crops do not depend on the number of workers or on batch boundaries, and a resumed run
replays them. The DataLoader keeps its worker processes across epochs.

``mode="centre"`` instead yields the image exactly as the in-memory reader stores it (shorter side resized,
centre crop), one [3, S, S] image per index: the check that both paths read the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..config import AugmentConfig, Config, ViewConfig
from ..seeding import epoch_seed
from .augment import TwoViews, sample_crop_boxes
from .readers import DataError, channel_stats, data_error, decode_image, folder_files

STATS_SAMPLE = 512  # images decoded to estimate the normalisation mean/std


class FolderImages(torch.utils.data.Dataset):
    """Item ``(epoch, index)`` -> (uint8 image(s), label). ``mode="crops"``: [2, 3, S, S], the two views'
    random-resized crops; ``mode="centre"``: [3, S, S] as ``readers.decode_image`` makes it."""

    def __init__(
        self, files: Sequence[tuple[object, int]], size: int, augment: AugmentConfig, seed: int, mode: str = "crops"
    ):
        if mode not in ("crops", "centre"):
            raise ValueError(f"mode must be 'crops' or 'centre', got {mode!r}")
        self.paths = [str(p) for p, _ in files]
        self.labels = [int(lab) for _, lab in files]
        self.size, self.seed, self.mode = size, seed, mode
        self.views = (augment.view1, augment.view2)
        self.crop = "crop" in augment.ops

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = item
        if self.mode == "centre":
            return torch.from_numpy(decode_image(self.paths[i], self.size)), self.labels[i]
        return torch.from_numpy(self.crops(epoch, i)), self.labels[i]

    def crops(self, epoch: int, i: int) -> np.ndarray:
        return crop_views(self.paths[i], self.size, self.views, self.crop, self.seed, epoch, i)


def crop_views(
    path: str, size: int, views: Sequence[ViewConfig], crop: bool, seed: int, epoch: int, index: int
) -> np.ndarray:
    """Both views' random-resized crops of one image file: uint8 [2, 3, size, size].

    The boxes come from a generator seeded by (seed, epoch, index) alone, so whoever calls this (a
    DataLoader worker, a Ray Data task on another node) cuts the same pixels for the same image and epoch.
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, 0, epoch, f"crop/{index}"))
    S = size
    out = np.empty((2, 3, S, S), dtype=np.uint8)
    try:
        with Image.open(path) as f:
            im = f.convert("RGB")
            W, H = im.size
            for v, view in enumerate(views):
                if crop:
                    top, left, h, w = sample_crop_boxes(
                        1, (H, W), view.crop_scale, view.crop_ratio, g, torch.device("cpu")
                    )["crop_box"][0].tolist()
                    box = (left, top, left + w, top + h)
                else:
                    box = (0, 0, W, H)
                resized = im.resize((S, S), Image.Resampling.BICUBIC, box=box)
                out[v] = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise data_error(path, f"cannot be decoded as an image ({e})", "delete or replace this file") from None
    return out


def estimate_stats(paths: Sequence[str], size: int, threads: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Channel mean/std from up to STATS_SAMPLE evenly spaced images (centre-decoded, as evaluated)."""
    n = len(paths)
    idx = np.linspace(0, n - 1, min(n, STATS_SAMPLE)).round().astype(int)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        imgs = list(pool.map(lambda i: decode_image(paths[i], size), idx))
    return channel_stats(torch.from_numpy(np.stack(imgs)))


class _Plan(torch.utils.data.Sampler):
    """The batch sampler: this epoch's micro-batches of (epoch, index) items. Replaced each epoch; the
    DataLoader's persistent workers only ever see the items."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PrecroppedTwoViews(TwoViews):
    """The device half of the views: images [B, 2, C, S, S] already cropped per view -> (T(x), T'(x))."""

    def __init__(self, cfg: AugmentConfig, out_size: int, mean, std) -> None:
        super().__init__(cfg, out_size, mean, std, ops=[o for o in cfg.ops if o != "crop"])

    def both(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(f"expected pre-cropped views [B, 2, C, S, S], got {tuple(images.shape)}")
        return super().both(images, generator)


class FolderStream:
    """The train split of an image folder, streamed: what the loop needs instead of an in-memory split."""

    channels = 3

    def __init__(self, cfg: Config, split: str, device: torch.device, mode: str = "crops"):
        self.cfg, self.device = cfg, device
        files, self.classes = folder_files(cfg.data, split)
        self.dataset = FolderImages(files, cfg.data.image_size, cfg.augment, cfg.run.seed, mode)
        self.mean, self.std = self._estimate_stats()
        self._plan = _Plan()
        self._loader: torch.utils.data.DataLoader | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _estimate_stats(self):
        return estimate_stats(self.dataset.paths, self.cfg.data.image_size, self.cfg.data.num_workers)

    def device_views(self, views: TwoViews) -> PrecroppedTwoViews:
        """The trainer's view maker for these batches (same config, crop already done in the workers)."""
        b = views.batched
        return PrecroppedTwoViews(self.cfg.augment, b.out_size, b.mean, b.std)

    def loader(self, epoch: int, micro_batches: Sequence[torch.Tensor]) -> torch.utils.data.DataLoader:
        """The DataLoader over `micro_batches` (index tensors) of `epoch`; one loader, reused every epoch."""
        self._plan.batches = [[(epoch, int(i)) for i in mb] for mb in micro_batches]
        if self._loader is None:
            workers = self.cfg.data.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self._plan,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=self.cfg.data.prefetch_batches if workers else None,
                persistent_workers=workers > 0,
            )
        return self._loader

    def micro_batches(self, epoch: int, plan: Sequence[Sequence[torch.Tensor]]) -> Iterator[list]:
        """Per optimiser step, its micro-batches [(images, labels), ...], as the in-memory path gives them."""
        flat = [mb for step in plan for mb in step]
        it = iter(self.loader(epoch, flat))
        for step in plan:
            try:
                yield [next(it) for _ in step]
            except StopIteration:  # only if the files changed under us
                raise DataError(f"{self.cfg.data.root}: the image stream ended early") from None
