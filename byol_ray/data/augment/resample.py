"""Resampling to the output size: the crop (each row's box resampled with grid_sample's bicubic kernel,
as two matmuls with per-row crop matrices, mirrored where flipped), the no-crop resize, and the tables of
every whole-pixel box's crop matrices that small inputs read instead of computing them.

The crop's box is drawn in whole pixels (boxes.py), so for inputs up to ~32 px `crop_flip` reads the
matrices of its box from `resample_tables` (two index_selects), and larger inputs compute them per call
(`resample_matrices`); both give the same matrices bit for bit. The resample does not antialias, which
only matters when a box is much larger than the output (large ImageNet-style inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import ViewConstants
from .images import per_channel

# The crop reads its matrices from tables of every box while they take at most this many floats (16 MiB).
# The tables grow as the cube of the input side times the output side: inputs up to ~32 px fit, and
# ImageNet-style inputs would need many times this memory, so they compute the matrices per call instead.
RESAMPLE_TABLE_FLOATS = 4 * 1024 * 1024


def resize_flip(x: torch.Tensor, flip: torch.Tensor, out_size: int) -> torch.Tensor:
    """The no-crop path: the whole image resized (antialiased bicubic), mirrored where `flip`."""
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def crop_flip(
    x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, c: ViewConstants, out_size: int, views: int = 1
) -> torch.Tensor:
    """Resample each row's box to out_size x out_size, mirrored where `flip`: exactly grid_sample's
    bicubic (a = -0.75, border padding, align_corners=False), computed as batched matmuls.

    Output pixel j of a box [left, left + w) samples the source at left + (j + 0.5) w / out - 0.5 (j
    counted from the box's right edge when flipped). That grid is axis-aligned, so the 2-D bicubic
    is a product of 1-D ones: y = R_y x R_x^T with per-row [out, H] and [out, W] matrices of 4
    cubic weights per row (taps past the border weigh on the edge pixel). On a CPU, matmuls are far
    cheaper than affine_grid + grid_sample's per-pixel gathers at small sizes; on a GPU they are a few GEMMs.

    With `views` > 1, `x` holds B source images and row v * B + b of `box` is view v of image b: the
    x pass multiplies each source image once by all its views' R_x stacked, and the y pass runs
    once per view, so the batch is never copied per view (a copy that is pure memory traffic).
    """
    _, C, H, W = x.shape
    N = box.shape[0]
    out = out_size
    n_img = N // views
    if c.tables is not None:
        ry, rx = table_matrices(box, flip, c, views)
    else:
        assert c.resample is not None  # BatchedViews makes the buffer wherever it makes no tables
        mats = resample_matrices(box, flip, c, c.resample.zero_(), views, (H, W))
        ry, rx = mats[0, ..., :H].transpose(0, 1), mats[1, ..., :W].reshape(n_img, views * out, W)
    # ry: [views, img, out, H]; rx: [img, views * out, W], each image's views' R_x stacked.
    y = torch.bmm(x.reshape(n_img, C * H, W), rx.transpose(1, 2))  # along x: [img, C H, views out]
    y = y.view(n_img * C, H, views, out)
    z = x.new_empty(views, n_img * C, out, out)
    for v in range(views):  # along y
        torch.bmm(per_channel(ry[v], C), y[:, :, v], out=z[v])
    return z.view(N, C, out, out).clamp_(0.0, 1.0)


def resample_matrices(
    box: torch.Tensor, flip: torch.Tensor, c: ViewConstants, buffer: torch.Tensor, views: int, in_size: tuple[int, int]
) -> torch.Tensor:
    """The [2 (y, x), img, views, out, P] bicubic matrices of the boxes, scattered into `buffer` (zeros,
    [2, N, out, P], P >= H, W). Rows of `box` are view-major; the buffer is laid out so that each
    image's views' matrices are one [views * out, P] block."""
    N = box.shape[0]
    H, W = in_size
    out = buffer.shape[2]
    # Per axis (y, x): the source coordinate of output pixel 0, top + h / (2 out) - 1/2, and the step
    # between output pixels, h / out; one small matmul for all boxes.
    start, step = torch.addmm(c.src_b, box.to(buffer.dtype), c.src_a).view(N, 2, 2, 1).unbind(1)
    j = torch.where(flip.view(N, 1, 1), c.j_flipped, c.j)  # [N, 2, out] output index per axis
    src = torch.addcmul(start, step, j)  # source coordinates
    base = torch.floor(src)
    d = torch.addcmul(c.tap_off, src - base, c.tap_sign)  # [4, N, 2, out] distance to each tap
    c0, c1, c2, c3 = c.cubic
    weight = torch.addcmul(c0, torch.addcmul(c1, torch.addcmul(c2, c3, d), d), d)
    taps = base + c.tap_idx
    # Scalar bounds where they are the same on both axes: a clamp to tensor bounds is slower on a CPU.
    taps = (taps.clamp_(0, H - 1) if H == W else torch.clamp(taps, min=c.tap_min, max=c.tap_max)).long()
    n_img = N // views
    mats = buffer.view(2, n_img, views, out, -1)
    rows = (views, n_img, 2, out)
    mats.permute(2, 1, 0, 3, 4).scatter_add_(
        4, taps.view(4, *rows).permute(1, 2, 3, 4, 0), weight.view(4, *rows).permute(1, 2, 3, 4, 0)
    )
    return mats


def table_matrices(
    box: torch.Tensor, flip: torch.Tensor, c: ViewConstants, views: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`resample_matrices` read from tables of every whole-pixel box (`resample_tables`): two
    index_selects instead of a dozen ops and a scatter, a large part of the crop's cost on a CPU.
    Returns (ry [views, img, out, H], rx [img, views * out, W])."""
    N = box.shape[0]
    assert c.tables is not None  # only called where BatchedViews made the tables
    ry_table, rx_table = c.tables
    size = box[:, 2:]
    # Table rows: top + H h along y, left + W (w + (W + 1) flip) along x (exact in float32).
    idx = torch.addcmul(box[:, :2], torch.where(flip.view(N, 1), size + c.flip_shift, size), c.table_stride)
    iy, ix = idx.long().unbind(1)
    ry = ry_table.index_select(0, iy).view(views, N // views, *ry_table.shape[1:])
    rx = rx_table.index_select(0, ix.view(views, -1).t().reshape(-1))  # image-major: [img * views, ...]
    return ry, rx.view(N // views, views * rx_table.shape[1], rx_table.shape[2])


def resample_tables(
    c: ViewConstants, in_size: tuple[int, int], out_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The crop's matrices for every whole-pixel box of an input size: R_y of (top, h) at row top + H h,
    [(H + 1) H, out, H], and R_x of (left, w, flip) at row left + W (w + (W + 1) flip), [2 (W + 1) W,
    out, W], made by `resample_matrices` itself, so reading them is exact. None when they would
    exceed RESAMPLE_TABLE_FLOATS (inputs above ~32 px)."""
    H, W = in_size
    out = out_size
    n_y, n_x = (H + 1) * H, 2 * (W + 1) * W
    if (n_y * H + n_x * W) * out > RESAMPLE_TABLE_FLOATS:
        return None
    n = max(n_y, n_x)
    i = torch.arange(n, device=c.j.device, dtype=torch.float32)
    box = torch.stack([i % H, i % W, (i // H) % (H + 1), (i // W) % (W + 1)], 1)
    mats = resample_matrices(box, i >= (W + 1) * W, c, c.j.new_zeros(2, n, out, max(H, W)), 1, in_size)
    return mats[0, :n_y, 0, :, :H].contiguous(), mats[1, :n_x, 0, :, :W].contiguous()
