"""The Gaussian blur: the kernel side, and two ways to apply per-image [N, size] kernels with reflect
padding: grouped convolutions (`gaussian_blur`), and for small square views blur matrices, y = K x K^T
(`matrix_blur`, up to `MATRIX_BLUR_MAX_SIDE`).

The kernel side is ``blur_kernel_frac`` of the output side made odd as in the authors' code (224 -> 23,
96 -> 9), at least 3; the kernels themselves (sigma ~ U(blur_sigma) per image) are made in batched.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .images import per_channel

NO_BLUR_SIGMA = 1e-10  # p^2 / sigma^2 is ~1e20 for every tap but the centre: exp gives an exact impulse
SINGLE_PASS_BLUR_TAPS = 5  # see gaussian_blur
# Above this output side the blur runs as convolutions. A matrix blur costs ~side / kernel times the
# multiply-adds (about 7x at the paper's kernel of a tenth of the side), which small views hide behind the
# grouped convolution's per-image cost and larger ones do not; the bound is where the two cross on a CPU.
MATRIX_BLUR_MAX_SIDE = 24


def blur_kernel_size(side: int, frac: float) -> int:
    """Odd kernel side for a `side`-pixel image: the authors' radius = int(frac * side) // 2, side 2r + 1."""
    return max(3, 2 * (int(frac * side) // 2) + 1)


def gaussian_blur(x: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """Separable per-image blur with [N, size] kernels as grouped convolutions (one group per image
    channel), reflect padding. Kernels of up to SINGLE_PASS_BLUR_TAPS taps run as ONE 2-D convolution
    with the outer-product kernel: 9 multiply-adds a pixel instead of 6 at 3 taps, but one pass of a
    common depthwise kernel instead of two, which at these sizes saves more than the extra arithmetic
    costs. Wider kernels (224 px views: 23 taps) run as two 1-D convolutions."""
    N, C, H, W = x.shape
    size = kern.shape[1]
    r = size // 2
    _check_blur_fits(size, H, W)
    kern = per_channel(kern, C)  # one group per image channel
    y = F.pad(x.reshape(1, N * C, H, W), (r, r, r, r), mode="reflect")
    if size <= SINGLE_PASS_BLUR_TAPS:
        y = F.conv2d(y, (kern.unsqueeze(2) * kern.unsqueeze(1)).view(N * C, 1, size, size), groups=N * C)
    else:
        y = F.conv2d(y, kern.view(N * C, 1, 1, size), groups=N * C)
        y = F.conv2d(y, kern.view(N * C, 1, size, 1), groups=N * C)
    return y.view(N, C, H, W)


def _check_blur_fits(size: int, H: int, W: int) -> None:
    if size // 2 >= min(H, W):
        raise ValueError(f"blur kernel {size} is too large for {H}x{W} images (reflect padding)")


def blur_band(side: int, size: int) -> torch.Tensor:
    """[size, side * side] 0/1: where tap k of a `size`-tap kernel lands in the [side, side] matrix that
    blurs one axis with reflect padding (row i reads pixel reflect(i + k - size // 2))."""
    r = size // 2
    _check_blur_fits(size, side, side)
    band = torch.zeros(size, side, side)
    for k in range(size):
        for i in range(side):
            j = i + k - r
            j = -j if j < 0 else (2 * (side - 1) - j if j >= side else j)
            band[k, i, j] += 1.0
    return band.view(size, side * side)


def matrix_blur(x: torch.Tensor, kern: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """`gaussian_blur` of square images as y = K x K^T, K = the per-image [side, side] blur matrix.

    Three matmuls instead of a reflect pad and two grouped convolutions with one group per image
    channel, which a CPU runs slowly at small sizes (MATRIX_BLUR_MAX_SIDE). An impulse kernel gives K = I,
    so an image that is not blurred passes through exactly.
    """
    N, C, S, _ = x.shape
    k = torch.mm(kern, band).view(N, S, S)
    y = torch.bmm(x.reshape(N, C * S, S), k.transpose(1, 2))  # along x, every channel at once
    return torch.bmm(per_channel(k, C), y.view(N * C, S, S)).view(N, C, S, S)  # along y
