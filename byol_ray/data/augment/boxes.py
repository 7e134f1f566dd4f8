"""Crop boxes: torchvision's RandomResizedCrop box (area fraction U(scale), log-aspect U(log ratio),
`CROP_TRIES` tries, then a centre crop) drawn for every image at once from uniforms, as whole pixels.

`CROP_DRAWS` are the first columns of an image's uniforms for one view (see draws.py) and the only ones
`crop_boxes` reads, so the streamed pipeline's workers (`sample_crop_boxes`) draw just those columns and
get the same box distribution as `BatchedViews`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CROP_TRIES = 10
# Columns of one image's uniform draws for one view that the crop reads: areas and aspects (one per try),
# then top/left.
_AREA = slice(0, CROP_TRIES)
_RATIO = slice(CROP_TRIES, 2 * CROP_TRIES)
_TOP_LEFT = slice(2 * CROP_TRIES, 2 * CROP_TRIES + 2)
CROP_DRAWS = slice(0, 2 * CROP_TRIES + 2)


@dataclass
class CropSpace:
    """Per-row constants of torchvision's RandomResizedCrop for inputs of one size (rows = images)."""

    area_lo: torch.Tensor  # [N, 1] area fraction: lo + u * span
    area_span: torch.Tensor
    ratio_lo: torch.Tensor  # [N, 1] log aspect (w / h): lo + u * span
    ratio_span: torch.Tensor
    pixels: float  # H * W
    hw_hi: torch.Tensor  # [2]: H + 1, W + 1
    hw_lim: torch.Tensor  # [2]: H, W
    fallback: torch.Tensor  # [N, 4]: h, w, area fraction, log aspect of the centre crop
    fallback_tl: torch.Tensor  # [N, 2]: its top, left
    in_size: tuple[int, int]

    @classmethod
    def build(
        cls,
        scales: Sequence[tuple[float, float]],
        ratios: Sequence[tuple[float, float]],
        repeat: int,
        in_size: tuple[int, int],
        device: torch.device | str,
    ) -> CropSpace:
        """`scales`/`ratios` per view; each view's constants repeated for its `repeat` rows."""
        H, W = in_size
        area, ratio, fb, fb_tl = [], [], [], []
        for (s0, s1), (r0, r1) in zip(scales, ratios):
            l0, l1 = math.log(r0), math.log(r1)
            area.append([s0, s1 - s0])
            ratio.append([l0, l1 - l0])
            fw, fh = _fallback_size(H, W, (r0, r1))
            fb.append([fh, fw, fh * fw / (H * W), math.log(fw / fh)])
            fb_tl.append([(H - fh) // 2, (W - fw) // 2])

        def rows(v: list) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32, device=device).repeat_interleave(repeat, 0)

        area_t, ratio_t = rows(area), rows(ratio)
        return cls(
            area_lo=area_t[:, :1],
            area_span=area_t[:, 1:],
            ratio_lo=ratio_t[:, :1],
            ratio_span=ratio_t[:, 1:],
            pixels=float(H * W),
            hw_hi=torch.tensor([H + 1, W + 1], dtype=torch.float32, device=device),
            hw_lim=torch.tensor([H, W], dtype=torch.float32, device=device),
            fallback=rows(fb),
            fallback_tl=rows(fb_tl),
            in_size=(H, W),
        )


def crop_boxes(u: torch.Tensor, c: CropSpace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop.get_params for every row at once, from its uniforms u[:, CROP_DRAWS].

    All `CROP_TRIES` candidates are evaluated; each row keeps its first valid one, and rows with none fall
    back to the centre crop torchvision uses. Returns (box [N, 4] as top, left, height, width in input
    pixels, the kept candidate's drawn area fraction, its log-aspect; the box's own for fallbacks).
    Every op is on 2-D [N, tries] tensors: on a CPU, the same ops on strided [N, 2, tries] views are slower.
    """
    N = u.shape[0]
    H, W = c.in_size
    frac = torch.addcmul(c.area_lo, u[:, _AREA], c.area_span)  # [N, tries]
    log_r = torch.addcmul(c.ratio_lo, u[:, _RATIO], c.ratio_span)
    pixels = frac * c.pixels
    aspect = log_r.exp()
    w = (pixels * aspect).sqrt_().round_()  # w = sqrt(A r), h = sqrt(A / r)
    h = (pixels / aspect).sqrt_().round_()
    valid = (torch.minimum(h, w) > 0) & (h <= H) & (w <= W)
    found, first = valid.max(1, keepdim=True)  # whether any try is valid, and the first valid one
    kept = torch.stack([h, w, frac, log_r], 1).gather(2, first.unsqueeze(1).expand(N, 4, 1)).squeeze(2)
    kept = torch.where(found, kept, c.fallback)
    hw = kept[:, :2]
    # Uniform integer offsets in [0, H - h]; the minimum guards against u * n rounding up to n in float32.
    tl = torch.minimum(torch.floor(u[:, _TOP_LEFT] * (c.hw_hi - hw)), c.hw_lim - hw)
    tl = torch.where(found, tl, c.fallback_tl)
    return torch.cat([tl, hw], 1), kept[:, 2], kept[:, 3]


def sample_crop_boxes(
    batch: int,
    in_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Crop boxes of one view for `batch` images, from their own draws (the streamed pipeline's workers)."""
    u = torch.rand(batch, CROP_DRAWS.stop, generator=generator, device=device)
    box, frac, log_r = crop_boxes(u, CropSpace.build([scale], [ratio], batch, in_size, device))
    return {"crop_box": box, "crop_scale": frac, "crop_log_ratio": log_r}


def _fallback_size(H: int, W: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = W / H
    if in_ratio < min(ratio):
        w = W
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = H
        w = int(round(h * max(ratio)))
    else:
        w, h = W, H
    return w, h
