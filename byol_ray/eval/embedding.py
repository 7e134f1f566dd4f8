"""Embeddings of a trained encoder: the evaluator's features as a product, with nothing of Ray or MLflow.

`input_stats` is the normalisation the evaluator uses for an encoder (the channel statistics of its
pretraining train split), `EmbeddingModel` is the encoder with the evaluation transform in front (uint8
images in, features out: what the logged MLflow model serves), and `EmbedSource` is what
``byol-ray embed --data`` reads: a config's dataset split, or an image folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError, load_config
from ..data.augment import eval_transform
from ..data.pipeline import estimate_stats
from ..data.readers import IMAGE_EXTENSIONS, channel_stats, check_data, folder_files, load_split
from ..data.transfer import adapt
from ..errors import UserError


class EmbedInputError(UserError):
    """What `byol-ray embed` was asked to read cannot be read; the message names the fix."""


def input_stats(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean/std the evaluator normalises this encoder's inputs with: its pretraining train
    split's (estimated from a sample for a streamed folder, as the streamed training does)."""
    if cfg.data.stream:
        files, _ = folder_files(cfg.data, "train")
        return estimate_stats([str(p) for p, _ in files], cfg.data.image_size, cfg.data.num_workers)
    return channel_stats(load_split(cfg.data, "train").images)


def fit_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images with the encoder's input channels (grey repeated to RGB, RGB to luma)."""
    if images.shape[1] == channels:
        return images
    from ..data.readers import ImageData

    data = ImageData(images.contiguous(), torch.zeros(len(images), dtype=torch.int64), [], "embed")
    return adapt(data, channels, images.shape[-1])[0].images


class EmbeddingModel(nn.Module):
    """uint8 (or [0, 1] float) images [N, C, H, W] -> the encoder's features under the evaluation
    transform: `extract_features` as one module, so that a served model needs no other code."""

    def __init__(self, encoder: nn.Module, size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.encoder = encoder.eval()
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(eval_transform(images, self.size, self.mean, self.std)).float()


@dataclass
class EmbedSource:
    """What to embed, as plain data (it travels to Ray tasks): a config's split or an image folder."""

    kind: str  # "dataset" | "folder"
    description: str
    data: dict = field(default_factory=dict)  # kind=dataset: the DataConfig fields
    split: str = "test"
    paths: list[str] = field(default_factory=list)  # kind=folder
    labels: list[int] = field(default_factory=list)  # kind=folder, empty when not in class folders
    classes: list[str] = field(default_factory=list)


def embed_source(spec: str, split: str = "test") -> EmbedSource:
    """A YAML config (its dataset's `split`) or a folder of images; fails on anything unreadable."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            cfg = load_config(path)
        except ConfigError as e:
            raise EmbedInputError(f"--data {spec}: {e}") from None
        check_data(cfg.data)
        if split not in ("train", "test", "unlabeled"):
            raise EmbedInputError(f"--split must be train, test or unlabeled, got {split!r}")
        return EmbedSource("dataset", f"{cfg.data.dataset}/{split} ({cfg.data.root})", cfg.to_dict()["data"], split)
    raise EmbedInputError(
        f"--data {spec}: neither a folder of images nor a YAML config file. Pass a folder (images anywhere "
        f"below it; class subfolders give labels) or a config such as experiments/fmnist.yaml (its dataset)."
    )


def _folder_source(root: Path) -> EmbedSource:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise EmbedInputError(
            f"--data {root}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth. Pass the "
            f"folder that holds them (for a dataset folder, e.g. its val/ or train/ split)."
        )
    # Labels only when every image sits directly in a class folder below the root (ImageNet's layout).
    classes = sorted({p.parent.name for p in files})
    labelled = all(p.parent.parent == root for p in files) and len(classes) > 1
    labels = [classes.index(p.parent.name) for p in files] if labelled else []
    return EmbedSource(
        "folder", f"{len(files)} images under {root}", paths=[str(p) for p in files], labels=labels,
        classes=classes if labelled else [],
    )  # fmt: skip


def dataset_images(source: EmbedSource, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, C, H, W] with the encoder's channels, int64 labels) of a config's split."""
    # Read into memory whatever the config streams: only the split's images are embedded.
    fields = {**{f"data.{k}": v for k, v in source.data.items()}, "data.stream": False, "data.loader": "dataloader"}
    cfg = Config().replace(fields)
    split = load_split(cfg.data, source.split)
    return fit_channels(split.images, channels).numpy(), split.labels.numpy()


def example_images(cfg: Config, channels: int, n: int = 2) -> np.ndarray:
    """The first `n` test images of the pretraining data (uint8, the encoder's channels): the served
    model's input example, from which MLflow infers and shows its signature."""
    first = cfg.replace({"data.test_subset": n, "data.stream": False, "data.loader": "dataloader"})
    return fit_channels(load_split(first.data, "test").images, channels).numpy()


def serving_model(cfg: Config, encoder: nn.Module) -> EmbeddingModel:
    """The encoder as it is served: the evaluation transform of its pretraining data in front."""
    mean, std = input_stats(cfg)
    return EmbeddingModel(encoder, cfg.data.image_size, mean, std)
