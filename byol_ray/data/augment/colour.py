"""Colour maths shared by the colour ops: the luma weights, the jitter ops and which of them can change
an image, the ops that do nothing to 1-channel images, and the HSV hue rotation.

For 1-channel images saturation, hue and grayscale do nothing (``noop_ops(1)``); their draws are still
made so the random stream, and hence every other op's draw, is the same as for 3 channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...config import ViewConfig

LUMA = (0.2989, 0.5870, 0.1140)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# Sector offsets of HSV -> RGB per output channel: c = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6.
HSV_SECTORS = (5.0, 3.0, 1.0)


def noop_ops(channels: int) -> list[str]:
    """Names of the ops (jitter parts included) that leave a `channels`-channel image unchanged."""
    return ["saturation", "hue", "grayscale"] if channels == 1 else []


def active_jitter(views: Sequence[ViewConfig], ops: Sequence[str], channels: int) -> list[int]:
    """Indices (into JITTER_OPS) of the jitter ops that can change an image: listed with a non-zero
    strength in some view, and not a no-op on `channels` channels."""
    if "jitter" not in ops:
        return []
    return [
        i
        for i, name in enumerate(JITTER_OPS)
        if name not in noop_ops(channels) and any(getattr(v, name) > 0 for v in views)
    ]


def hue_shift(x: torch.Tensor, delta6: torch.Tensor, sectors: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [N, 3, P] pixels by delta6 / 6 turns ([N, 1, 1]), in one pass.

    RGB -> H as torchvision's ``_rgb2hsv`` (the first maximal channel picks the formula), then the closed
    form c_n = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6 H') mod 6, n = 5, 3, 1 for R, G, B, which
    equals ``_hsv2rgb`` without building H, S, V. Grey pixels (V S = 0) come out unchanged.
    """
    vmax, arg = x.max(1, keepdim=True)
    span = vmax - x.amin(1, keepdim=True)  # V S
    diff = torch.roll(x, -1, 1) - torch.roll(x, -2, 1)  # g - b, b - r, r - g
    # 6 H: (g - b) / span, 2 + (b - r) / span or 4 + (r - g) / span; the safe divisor only keeps NaNs
    # out of grey pixels, whose hue is irrelevant.
    h6 = diff.gather(1, arg) / torch.where(span > 0, span, 1.0) + 2 * arg
    k = torch.remainder(h6 + delta6 + sectors, 6.0)
    return torch.addcmul(vmax, span, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0)
