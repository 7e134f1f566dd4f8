"""Image tensors in and out: uint8 or float images to float32 [0, 1], the [N, C, H, W] shape check,
per-channel mean/std normalisation, and per-image values spread over image channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.float()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (x - channel_stat(mean, x)) / channel_stat(std, x)


def check_channels(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with 1 or 3 channels, got shape {tuple(images.shape)}")
    return images


def channel_stat(values: Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    C = x.shape[1]
    if len(values) not in (1, C):
        # Broadcasting a 3-value mean over 1-channel images would silently triple the channels.
        raise ValueError(f"mean/std have {len(values)} values for {C}-channel images; give 1 or {C}")
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def per_channel(t: torch.Tensor, C: int) -> torch.Tensor:
    """[N, ...] per image -> [N * C, ...] per image channel (repeat_interleave's int form made CPU tensors
    in older torch releases, which a CUDA graph cannot record)."""
    return t if C == 1 else t.unsqueeze(1).expand(t.shape[0], C, *t.shape[1:]).reshape(-1, *t.shape[1:])
