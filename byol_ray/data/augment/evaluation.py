"""The deterministic evaluation transform: resize the shorter side, centre crop, normalise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .images import normalize, to_float


def eval_transform(images: torch.Tensor, out_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize the shorter side to out_size (bilinear, antialiased), centre crop, normalise."""
    x = to_float(images)
    H, W = x.shape[-2:]
    if min(H, W) != out_size:
        # torchvision's Resize: the longer side is scaled and truncated.
        if H <= W:
            size = (out_size, int(out_size * W / H))
        else:
            size = (int(out_size * H / W), out_size)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
        H, W = size
    top = int(round((H - out_size) / 2.0))
    left = int(round((W - out_size) / 2.0))
    x = x[..., top : top + out_size, left : left + out_size]
    return normalize(x, mean, std)
