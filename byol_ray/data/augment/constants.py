"""The constants of a `BatchedViews` call: every tensor it builds from Python numbers, once per (batch,
channels, input size, device) and cached by `BatchedViews`, so a call makes no host-to-device copy.

`ViewConstants` holds them (crop space, resample grid and cubic taps, jitter stages, blur taps, per-row
view settings, normalisation); `build_constants` makes them from the views' settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from ...config import ViewConfig
from .blur import MATRIX_BLUR_MAX_SIDE, blur_band
from .boxes import CropSpace
from .colour import HSV_SECTORS, LUMA, active_jitter, noop_ops
from .draws import FLAG_OPS
from .images import channel_stat


@dataclass
class ViewConstants:
    """Everything `BatchedViews` builds from Python numbers once per (batch, channels, size, device):
    creating them each call would be a host-to-device copy per tensor (and not capturable)."""

    crop: CropSpace
    probs: torch.Tensor  # [N, 5] per-row probability of each FLAG_OPS op (0 where it cannot fire)
    factor_lo: torch.Tensor  # [N, 5] FACTORS ranges
    factor_span: torch.Tensor
    full_box: torch.Tensor  # [1, 4] the whole image (no crop op)
    src_a: torch.Tensor  # [4, 4] box (top, left, h, w) -> (start y, start x, step y, step x)
    src_b: torch.Tensor  # [4]
    j: torch.Tensor  # [2, out] output pixel index along y and x
    j_flipped: torch.Tensor  # [2, out] the same with x reversed
    # The 4 taps are the LEADING dimension of the tap tensors ([4, N, 2, out]): with the tap last, every
    # elementwise op ran an inner loop of 4, which a CPU cannot vectorise.
    tap_off: torch.Tensor  # [4, 1, 1, 1] with tap_sign: distances t + 1, t, 1 - t, 2 - t to the 4 taps
    tap_sign: torch.Tensor
    tap_idx: torch.Tensor  # [4, 1, 1, 1] tap offsets -1, 0, 1, 2 from floor(source)
    tap_min: torch.Tensor  # [2, 1] zeros
    tap_max: torch.Tensor  # [2, 1] last pixel index along y and x
    cubic: tuple[torch.Tensor, ...]  # 4 x [4, 1, 1, 1]: per tap, the coefficient of d^0, d^1, d^2, d^3
    resample: torch.Tensor | None  # [2, N, out, max(H, W)] scratch for the computed path's matrices
    tables: tuple[torch.Tensor, torch.Tensor] | None  # small inputs: every box's matrices (resample.resample_tables)
    flip_shift: torch.Tensor  # [2] (0, W + 1): a flipped box's x table block
    table_stride: torch.Tensor  # [2] (H, W)
    jitter_identity: torch.Tensor  # [4] factors that do nothing (delta 0, factor 1)
    stage_a0: torch.Tensor  # [4, 4] jitter op -> stage coefficients (a, c1, c2, d) = a0 + factor * a1
    stage_a1: torch.Tensor
    stage_identity: torch.Tensor  # [4] (1, 0, 0, 0)
    jitter_active: torch.Tensor  # colour.active_jitter(views, ops, C) as an index tensor
    stage_basis: torch.Tensor  # [3, 2 C C]: (a, c1, c2) -> (M = a I + c1 L, K = c2 L), flattened
    gray: torch.Tensor  # [C, C] L = 1 luma^T (every channel becomes the luma)
    eye: torch.Tensor  # [C, C]
    sectors: torch.Tensor  # [1, 3, 1]
    blur_logit: torch.Tensor  # [N, K] -p^2 / 2 per tap offset p; -inf outside a row's own (smaller) kernel
    blur_band: torch.Tensor | None  # [K, out * out]: tap k's 0/1 place in the reflect-padded blur matrix
    solarize_at: torch.Tensor  # [N] each row's view's threshold
    scale: torch.Tensor  # [1, C, 1, 1] 1 / std
    shift: torch.Tensor  # [1, C, 1, 1] -mean / std


class _Float32(TypedDict):
    """Keyword arguments that make a float32 tensor on one device."""

    dtype: torch.dtype
    device: torch.device


def build_constants(
    views: Sequence[ViewConfig],
    ops: Sequence[str],
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    blur_sizes: Sequence[int],
    batch: int,
    channels: int,
    in_size: tuple[int, int],
    device: torch.device,
) -> ViewConstants:
    """The constants for `batch` images per view (rows view-major, as `BatchedViews` lays them out) of
    `channels` channels and size `in_size`, on `device`; `blur_sizes` is each view's kernel side."""
    blur_size = max(blur_sizes)
    H, W = in_size
    C = channels
    if len(mean) not in (1, C) or len(std) not in (1, C):
        # Broadcasting a 3-value mean over 1-channel images would silently triple the channels.
        raise ValueError(f"mean/std have {len(mean)} values for {C}-channel images; give 1 or {C}")
    f32 = _Float32(dtype=torch.float32, device=device)

    def t(v) -> torch.Tensor:
        return torch.tensor(v, **f32)

    def rows(per_view: list) -> torch.Tensor:
        return t(per_view).repeat_interleave(batch, 0)

    def taps(per_tap: list) -> torch.Tensor:
        return t(per_tap).view(4, 1, 1, 1)

    mute = set(noop_ops(C))
    probs, lo, span = [], [], []
    for v in views:
        probs.append([0.0 if (op not in ops or op in mute) else getattr(v, f"{op}_prob") for op in FLAG_OPS])
        b, k, s = v.brightness, v.contrast, 0.0 if "saturation" in mute else v.saturation
        h = 0.0 if "hue" in mute else v.hue
        ranges = [(-b, b), (max(0.0, 1 - k), 1 + k), (max(0.0, 1 - s), 1 + s), (-h, h), v.blur_sigma]
        lo.append([r[0] for r in ranges])
        span.append([r[1] - r[0] for r in ranges])
    luma = t(LUMA if C == 3 else (1.0,))
    gray = luma.expand(C, C).contiguous()  # every row is the luma weights
    eye = torch.eye(C, **f32)
    # Stage coefficients (a, c1, c2, d) per jitter op: y = a x + c1 gray(x) + c2 mean(gray(x)) + d.
    a0 = t([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    a1 = t([[0, 0, 0, 1], [1, 0, -1, 0], [1, -1, 0, 0], [0, 0, 0, 0]])
    basis = torch.stack(
        [
            torch.cat([eye.flatten(), torch.zeros(C * C, **f32)]),
            torch.cat([gray.flatten(), torch.zeros(C * C, **f32)]),
            torch.cat([torch.zeros(C * C, **f32), gray.flatten()]),
        ]
    )
    mean_t = channel_stat(mean, torch.empty(1, C, 1, 1, **f32))
    std_t = channel_stat(std, torch.empty(1, C, 1, 1, **f32))
    A = -0.75
    out = out_size
    j = torch.arange(out, **f32).expand(2, -1)
    r = blur_size // 2
    blur_logit = rows(
        [[-0.5 * (i - r) ** 2 if abs(i - r) <= k // 2 else -math.inf for i in range(blur_size)] for k in blur_sizes]
    )
    return ViewConstants(
        crop=CropSpace.build([v.crop_scale for v in views], [v.crop_ratio for v in views], batch, (H, W), device),
        probs=rows(probs),
        factor_lo=rows(lo),
        factor_span=rows(span),
        full_box=t([[0.0, 0.0, H, W]]),
        src_a=t([[1, 0, 0, 0], [0, 1, 0, 0], [0.5 / out, 0, 1 / out, 0], [0, 0.5 / out, 0, 1 / out]]),
        src_b=t([-0.5, -0.5, 0.0, 0.0]),
        j=j,
        j_flipped=torch.stack([j[0], j[1].flip(0)]),
        tap_off=taps([1.0, 0.0, 1.0, 2.0]),
        tap_sign=taps([1.0, 1.0, -1.0, -1.0]),
        tap_idx=taps([-1.0, 0.0, 1.0, 2.0]),
        tap_min=torch.zeros(2, 1, **f32),
        tap_max=t([[H - 1], [W - 1]]),
        # Keys' cubic with a = -0.75 (torch's bicubic): |d| <= 1 for the inner taps, 1 < |d| < 2 outer.
        cubic=tuple(
            taps(row)
            for row in [
                [-4 * A, 1, 1, -4 * A],
                [8 * A, 0, 0, 8 * A],
                [-5 * A, -(A + 3), -(A + 3), -5 * A],
                [A, A + 2, A + 2, A],
            ]
        ),
        resample=None,
        tables=None,
        flip_shift=t([0.0, W + 1]),
        table_stride=t([H, W]),
        jitter_identity=t([0, 1, 1, 0]),
        stage_a0=a0,
        stage_a1=a1,
        stage_identity=t([1, 0, 0, 0]),
        jitter_active=torch.tensor(active_jitter(views, ops, C), dtype=torch.long, device=device),
        stage_basis=basis,
        gray=gray,
        eye=eye,
        sectors=t(HSV_SECTORS).view(1, 3, 1),
        blur_logit=blur_logit,
        blur_band=blur_band(out, blur_size).to(device) if out <= MATRIX_BLUR_MAX_SIDE else None,
        solarize_at=rows([v.solarize_threshold for v in views]),
        scale=1.0 / std_t,
        shift=-mean_t / std_t,
    )
