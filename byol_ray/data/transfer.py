"""Transfer datasets for ``byol-ray eval transfer``: any of readers.py's datasets, plus scikit-learn's digits.

``digits`` is scikit-learn's ``load_digits`` (1,797 real handwritten digits, 8x8, 17 grey levels 0..16,
shipped inside the wheel, so it works offline): scaled to uint8 0..255 and split train/test with a
seeded, stratified 70/30 split (the dataset has no official one).

Every dataset is then adapted to the encoder once, here, so the protocols never see a mismatch:
channels are averaged (3 -> 1, the luma weights of the grayscale augmentation) or repeated (1 -> 3), and
images are resized (shorter side, antialiased bilinear) and centre-cropped to the encoder's input size
with the evaluation transform. Each adaptation is returned as a note that the command prints and logs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DATASETS, DataConfig
from ..errors import UserError
from .augment import LUMA, eval_transform
from .readers import ImageData, load_split

TRANSFER_DATASETS = ("digits", *DATASETS)


def load_digits_splits(seed: int = 0, test_fraction: float = 0.3) -> tuple[ImageData, ImageData]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    classes = [str(c) for c in d.target_names]

    def split(i: np.ndarray, name: str) -> ImageData:
        return ImageData(
            torch.from_numpy(np.ascontiguousarray(images[i])), torch.from_numpy(labels[i]), classes, f"digits/{name}"
        )

    return split(tr, "train"), split(te, "test")


def adapt(data: ImageData, channels: int, size: int) -> tuple[ImageData, list[str]]:
    """`data` with `channels` channels at `size` x `size` pixels (uint8), and what was changed."""
    notes: list[str] = []
    x = data.images
    if x.shape[1] != channels:
        if channels == 1:
            luma = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            notes.append(f"{data.name}: 3-channel images averaged to 1 channel (luma) for a 1-channel encoder")
        else:
            x = x.expand(-1, 3, -1, -1)
            notes.append(f"{data.name}: 1-channel images repeated to 3 channels for a 3-channel encoder")
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        # The evaluation transform without normalisation (mean 0, std 1) gives [0, 1] floats.
        x = (eval_transform(x, size, [0.0], [1.0]) * 255).round().clamp(0, 255).to(torch.uint8)
        notes.append(
            f"{data.name}: {h}x{w} images resized (antialiased bilinear, centre crop) to the encoder's {size}x{size}"
        )
    if not notes:
        return data, notes
    return ImageData(x.contiguous(), data.labels, data.classes, data.name), notes


def load_transfer(
    dataset: str, root: str, channels: int, size: int, seed: int = 0, train_subset: int = 0, test_subset: int = 0
) -> tuple[ImageData, ImageData, list[str]]:
    """Train and test splits of a transfer dataset, adapted to the encoder (notes say how)."""
    if dataset == "digits":
        train, test = load_digits_splits(seed)
        train, test = train.subset(train_subset), test.subset(test_subset)
    elif dataset in DATASETS:
        if not root:
            raise UserError(f"transfer dataset {dataset} needs --data-root (the folder holding its files)")
        cfg = DataConfig(
            dataset=dataset, root=root, image_size=size, train_subset=train_subset, test_subset=test_subset
        )
        train, test = load_split(cfg, "train"), load_split(cfg, "test")
    else:
        raise UserError(f"unknown transfer dataset {dataset!r}; choose one of {', '.join(TRANSFER_DATASETS)}")
    train, notes = adapt(train, channels, size)
    test, _ = adapt(test, channels, size)  # the same changes; noted once
    return train, test, notes
