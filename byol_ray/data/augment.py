"""BYOL's two view distributions T and T', applied to a whole batch at once on the batch's device.

Each image draws its own crop box, flip, colour-jitter factors and order, grayscale, blur sigma and
solarize decision, independently, from a `torch.Generator` the caller passes in (on the batch's device),
so a run is reproducible and, by saving the generator state, resumable.

The work is split in two halves, so that its cost on a GPU is a fixed, small number of kernels:

1. `BatchedViews.sample_params` draws every random number of every view of the batch in ONE generator
   call (`N_DRAWS` uniforms per image and view) and turns them into per-image parameters with a fixed
   number of tensor ops.
2. `BatchedViews.apply` applies them with a pure tensor function: no Python loop over images, no Python
   branch on a tensor's value, no host sync, and a number of ops that does not grow with the batch. An
   image that does not take an op gets that op's identity parameters (factor 1, delta 0, an impulse blur
   kernel, an identity colour matrix) or is selected back with `torch.where`.

Both views of `TwoViews` are one batch of 2B images through the same ops (each row with its own view's
probabilities and strengths), reading the B source images without copying them per view, so a step's
augmentation is a fixed number of dispatched ops however large the batch (tests/test_augment.py bounds
it).

At Fashion-MNIST sizes a CPU call is mostly per-op overhead and small matmuls, so the CPU paths avoid the
ops that are slow there: a comparison or `where` over every pixel, an addcmul whose first argument is
broadcast, ops on tensors whose last dimension is tiny, grouped convolutions on small images
(MATRIX_BLUR_MAX_SIDE), and rebuilding the crop matrices of small inputs (RESAMPLE_TABLE_FLOATS).

The ops (``AugmentConfig.ops``, a subset of ``AUG_OPS``) and what they do, on images in [0, 1]:

- ``crop``: torchvision's RandomResizedCrop box (area fraction U(scale), log-aspect U(log ratio), 10 tries
  then a centre crop), resampled with ``grid_sample``'s bicubic kernel (computed as two matmuls) and
  clamped to [0, 1]. Boxes are whole pixels like torchvision's (inputs up to ~32 px read their matrices
  from a table of every box, so `apply` reads a box's values as whole pixels). Without ``crop`` the image
  is only resized to ``out_size``. The resample does not antialias, which only matters when a box is much
  larger than ``out_size`` (large ImageNet-style inputs).
- ``flip``: horizontal flip, folded into the crop's affine matrix (one resample for both).
- ``jitter``: brightness, contrast, saturation and hue in a random order drawn per image, clamped to
  [0, 1] after each. Brightness is ADDITIVE (x + delta, delta ~ U(-b, b)) as in the authors' code, not
  torchvision's multiplicative one. Contrast blends with the per-image mean of the grayscale image,
  saturation with the grayscale image (factors ~ U(max(0, 1-s), 1+s)). Hue rotates H in HSV by
  delta ~ U(-h, h) (the HSV route of torchvision and ``tf.image.adjust_hue``, not the YIQ rotation).
- ``grayscale``: luma 0.2989 R + 0.5870 G + 0.1140 B, copied to the 3 channels.
- ``blur``: Gaussian, sigma ~ U(blur_sigma), separable, reflect padding; the kernel side is
  ``blur_kernel_frac`` of the output side made odd as in the authors' code (224 -> 23, 96 -> 9), at least 3.
  Views up to MATRIX_BLUR_MAX_SIDE are blurred as K x K^T with per-image blur matrices, larger ones by
  grouped convolutions.
- ``solarize``: x -> 1 - x where x >= threshold.

How the per-image jitter order runs without a branch per permutation: brightness, contrast and
saturation are each a per-image affine colour map, y = M x + K mean(x) + d (M, K 3x3 or 1x1, d a
constant), so "the op at position k of this image's order" is one batched `baddbmm` whose per-image
matrices are gathered from the image's order. Hue (an HSV rotation, not affine) runs once: the affine
stages before it in an image's order run in a first chain, those after it in a second, with identity
stages where an image has nothing to do. Four ops in any order cost 3 + 1 + 3 stages, not 4 x 4.

Crop and flip always come first (they set the output size); the other ops follow in the order listed.
An op that is not listed never fires in either view; that is how the paper's ablations are written.
For 1-channel images saturation, hue and grayscale do nothing (``noop_ops(1)``); their draws are still
made so the random stream, and hence every other op's draw, is the same as for 3 channels.

Normalisation by mean/std comes last. ``eval_transform`` is the deterministic evaluation transform
(resize the shorter side, centre crop, normalise). ``reference_view_transform`` is a per-image
torchvision pipeline with the same parameters, kept for speed and distribution comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AUG_OPS, AugmentConfig, ViewConfig

LUMA = (0.2989, 0.5870, 0.1140)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
CROP_TRIES = 10
FLAG_OPS = ("flip", "jitter", "grayscale", "blur", "solarize")  # per-image on/off draws
FACTORS = ("brightness", "contrast", "saturation", "hue", "blur_sigma")  # per-image strengths
# Columns of one image's uniform draws for one view: crop areas and aspects (one per try), crop top/left,
# the on/off flags, the strengths, and the jitter order (argsort of 4 uniforms: a uniform permutation).
_AREA = slice(0, CROP_TRIES)
_RATIO = slice(CROP_TRIES, 2 * CROP_TRIES)
_TOP_LEFT = slice(2 * CROP_TRIES, 2 * CROP_TRIES + 2)
_CROP = slice(0, 2 * CROP_TRIES + 2)
_FLAGS = slice(_CROP.stop, _CROP.stop + len(FLAG_OPS))
_FACTORS = slice(_FLAGS.stop, _FLAGS.stop + len(FACTORS))
_ORDER = slice(_FACTORS.stop, _FACTORS.stop + len(JITTER_OPS))
N_DRAWS = _ORDER.stop
# Sector offsets of HSV -> RGB per output channel: c = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6.
_HSV_SECTORS = (5.0, 3.0, 1.0)
_NO_BLUR_SIGMA = 1e-10  # p^2 / sigma^2 is ~1e20 for every tap but the centre: exp gives an exact impulse


def noop_ops(channels: int) -> list[str]:
    """Names of the ops (jitter parts included) that leave a `channels`-channel image unchanged."""
    return ["saturation", "hue", "grayscale"] if channels == 1 else []


def blur_kernel_size(side: int, frac: float) -> int:
    """Odd kernel side for a `side`-pixel image: the authors' radius = int(frac * side) // 2, side 2r + 1."""
    return max(3, 2 * (int(frac * side) // 2) + 1)


# ---- input / output -----------------------------------------------------------------------------
def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.float()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (x - _channel_stat(mean, x)) / _channel_stat(std, x)


def _check_channels(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with 1 or 3 channels, got shape {tuple(images.shape)}")
    return images


def _channel_stat(values: Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    C = x.shape[1]
    if len(values) not in (1, C):
        # Broadcasting a 3-value mean over 1-channel images would silently triple the channels.
        raise ValueError(f"mean/std have {len(values)} values for {C}-channel images; give 1 or {C}")
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


# ---- crop boxes ---------------------------------------------------------------------------------
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

        f32 = dict(dtype=torch.float32, device=device)
        area_t, ratio_t = rows(area), rows(ratio)
        return cls(
            area_lo=area_t[:, :1],
            area_span=area_t[:, 1:],
            ratio_lo=ratio_t[:, :1],
            ratio_span=ratio_t[:, 1:],
            pixels=float(H * W),
            hw_hi=torch.tensor([H + 1, W + 1], **f32),
            hw_lim=torch.tensor([H, W], **f32),
            fallback=rows(fb),
            fallback_tl=rows(fb_tl),
            in_size=(H, W),
        )


def crop_boxes(u: torch.Tensor, c: CropSpace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop.get_params for every row at once, from its uniforms u[:, _CROP].

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
    u = torch.rand(batch, _CROP.stop, generator=generator, device=device)
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


# ---- pixel ops ----------------------------------------------------------------------------------
def resize_flip(x: torch.Tensor, flip: torch.Tensor, out_size: int) -> torch.Tensor:
    """The no-crop path: the whole image resized (antialiased bicubic), mirrored where `flip`."""
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


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


def _per_channel(t: torch.Tensor, C: int) -> torch.Tensor:
    """[N, ...] per image -> [N * C, ...] per image channel (repeat_interleave's int form made CPU tensors
    in older torch releases, which a CUDA graph cannot record)."""
    return t if C == 1 else t.unsqueeze(1).expand(t.shape[0], C, *t.shape[1:]).reshape(-1, *t.shape[1:])


SINGLE_PASS_BLUR_TAPS = 5  # see gaussian_blur


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
    kern = _per_channel(kern, C)  # one group per image channel
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
    return torch.bmm(_per_channel(k, C), y.view(N * C, S, S)).view(N, C, S, S)  # along y


# Above this output side the blur runs as convolutions. A matrix blur costs ~side / kernel times the
# multiply-adds (about 7x at the paper's kernel of a tenth of the side), which small views hide behind the
# grouped convolution's per-image cost and larger ones do not; the bound is where the two cross on a CPU.
MATRIX_BLUR_MAX_SIDE = 24
# The crop reads its matrices from tables of every box while they take at most this many floats (16 MiB).
# The tables grow as the cube of the input side times the output side: inputs up to ~32 px fit, and
# ImageNet-style inputs would need many times this memory, so they compute the matrices per call instead.
RESAMPLE_TABLE_FLOATS = 4 * 1024 * 1024


# ---- the view distributions ---------------------------------------------------------------------
@dataclass
class _Consts:
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
    tables: tuple[torch.Tensor, torch.Tensor] | None  # small inputs: every box's matrices (_resample_tables)
    flip_shift: torch.Tensor  # [2] (0, W + 1): a flipped box's x table block
    table_stride: torch.Tensor  # [2] (H, W)
    jitter_identity: torch.Tensor  # [4] factors that do nothing (delta 0, factor 1)
    stage_a0: torch.Tensor  # [4, 4] jitter op -> stage coefficients (a, c1, c2, d) = a0 + factor * a1
    stage_a1: torch.Tensor
    stage_identity: torch.Tensor  # [4] (1, 0, 0, 0)
    jitter_active: torch.Tensor  # BatchedViews._active_jitter(C) as an index tensor
    stage_basis: torch.Tensor  # [3, 2 C C]: (a, c1, c2) -> (M = a I + c1 L, K = c2 L), flattened
    gray: torch.Tensor  # [C, C] L = 1 luma^T (every channel becomes the luma)
    eye: torch.Tensor  # [C, C]
    sectors: torch.Tensor  # [1, 3, 1]
    blur_logit: torch.Tensor  # [N, K] -p^2 / 2 per tap offset p; -inf outside a row's own (smaller) kernel
    blur_band: torch.Tensor | None  # [K, out * out]: tap k's 0/1 place in the reflect-padded blur matrix
    solarize_at: torch.Tensor  # [N] each row's view's threshold
    scale: torch.Tensor  # [1, C, 1, 1] 1 / std
    shift: torch.Tensor  # [1, C, 1, 1] -mean / std


class BatchedViews:
    """One or more view distributions applied to a batch together: rows are view-major (all images of
    the first view, then of the second, ...), each row with its own view's probabilities and strengths."""

    def __init__(
        self,
        views: Sequence[ViewConfig],
        ops: Sequence[str],
        out_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        unknown = [o for o in ops if o not in AUG_OPS]
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {unknown}; choose from {', '.join(AUG_OPS)}")
        self.views = tuple(views)
        self.ops = list(ops)
        self.out_size = int(out_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.blur_sizes = [blur_kernel_size(self.out_size, v.blur_kernel_frac) for v in self.views]
        self.blur_size = max(self.blur_sizes)
        self._consts: dict[tuple, _Consts] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def __getstate__(self) -> dict:
        # Cached device tensors stay behind when the transform is shipped to another process (Ray).
        return {**self.__dict__, "_consts": {}, "_tables": {}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ops={self.ops}, out_size={self.out_size}, views={self.views})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, C, H, W] (one source image for every view) or [B, V, C, H, W] (one per view, e.g. crops
        made elsewhere) -> [V * B, C, out, out] views, view-major."""
        V = len(self.views)
        if generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but images are on {images.device}; "
                "create it with torch.Generator(device=images.device)"
            )
        if images.dim() == 5:
            if images.shape[1] != V:
                raise ValueError(f"expected pre-cropped views [B, {V}, C, S, S], got {tuple(images.shape)}")
            x = to_float(images).transpose(0, 1).reshape(-1, *images.shape[2:])
            shared = False
        else:
            x = to_float(images)
            shared = True
        _check_channels(x)
        batch = x.shape[0] if shared else x.shape[0] // V
        params = self.sample_params(batch, x.shape[1], tuple(x.shape[-2:]), generator, x.device)
        return self.apply(x, params, shared=shared)

    # -- the first half: every random draw ---------------------------------------------------------
    def sample_params(
        self,
        batch: int,
        channels: int,
        in_size: tuple[int, int],
        generator: torch.Generator,
        device: torch.device | str,
    ) -> dict[str, torch.Tensor]:
        """Every per-image random draw of every view, as [V * batch] (or [V * batch, k]) tensors, from one
        generator call.

        The same numbers are drawn whatever the ops, strengths and channel count, so the random stream
        (and each op's draws) does not shift between ablations; ops that are not listed, or that do
        nothing on `channels` channels, are reported as not firing / identity factors.
        """
        c = self._constants(batch, channels, in_size, device)
        u = torch.rand(len(self.views) * batch, N_DRAWS, generator=generator, device=device)
        if "crop" in self.ops:
            box, frac, log_r = crop_boxes(u, c.crop)
        else:
            n = u.shape[0]
            box = c.full_box.expand(n, 4)
            frac = c.full_box.new_ones(()).expand(n)
            log_r = c.full_box.new_full((), math.log(in_size[1] / in_size[0])).expand(n)
        p = {
            "crop_box": box,
            "crop_scale": frac,
            "crop_log_ratio": log_r,
            "jitter_order": torch.argsort(u[:, _ORDER], dim=1),
        }
        p.update(zip(FLAG_OPS, (u[:, _FLAGS] < c.probs).unbind(1)))
        p.update(zip(FACTORS, torch.addcmul(c.factor_lo, u[:, _FACTORS], c.factor_span).unbind(1)))
        return p

    # -- the second half: a pure function of the parameters ----------------------------------------
    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor], shared: bool = False) -> torch.Tensor:
        """The views for given parameters (no randomness): float32 [N, C, out, out], normalised. `images`
        holds one source image per row (N = V * batch), or with `shared` one per image of the batch, which
        every view reads (N = V * images; no copy of the batch per view)."""
        x = to_float(_check_channels(images))
        V = len(self.views)
        B, C, H, W = x.shape
        N = V * B if shared else B
        c = self._constants(N // V, C, (H, W), x.device)
        if "crop" in self.ops:
            x = self._crop_flip(x, params["crop_box"], params["flip"], c, V if shared else 1)
        else:
            if shared and V > 1:
                x = x.expand(V, *x.shape).reshape(N, C, H, W)
            x = resize_flip(x, params["flip"], self.out_size)
        for op in self.ops:
            if op == "jitter":
                x = self._jitter(x, params, c)
            elif op == "grayscale" and C == 3:
                gray = torch.where(params["grayscale"].view(N, 1, 1), c.gray, c.eye)
                x = torch.bmm(gray, x.view(N, C, -1)).view_as(x)
            elif op == "blur":
                sigma = torch.where(params["blur"], params["blur_sigma"], _NO_BLUR_SIGMA)
                # exp(-p^2 / (2 sigma^2)) normalised; its largest tap is the centre's exp(0), so softmax
                # (which subtracts the maximum) computes exactly that.
                kern = torch.softmax(c.blur_logit / sigma.square().unsqueeze(1), dim=1)
                x = gaussian_blur(x, kern) if c.blur_band is None else matrix_blur(x, kern, c.blur_band)
            elif op == "solarize":
                at = torch.where(params["solarize"], c.solarize_at, 2.0).view(N, 1, 1, 1)  # 2: never
                # where(x >= t, 1 - x, x) in float ops only (a comparison plus a where over every pixel
                # is slower on a CPU than float ops): s = clamp(floor(x - t), -1, 0) + 1 is exactly 1 where
                # x >= t (a rounded x - t keeps its sign), and |s - x| is then exactly 1 - x or x.
                x = (x - at).floor_().clamp_(-1.0, 0.0).add_(1.0).sub_(x).abs_()
        # (x - mean) / std, in place: every branch above made x anew. Not addcmul(shift, x, scale), whose
        # broadcast first argument runs unvectorised on a CPU (slower than these two).
        return x.mul_(c.scale).add_(c.shift)

    def _crop_flip(
        self, x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, c: _Consts, views: int = 1
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
        out = self.out_size
        n_img = N // views
        if c.tables is not None:
            ry, rx = self._table_matrices(box, flip, c, views)
        else:
            mats = self._resample_matrices(box, flip, c, c.resample.zero_(), views, (H, W))
            ry, rx = mats[0, ..., :H].transpose(0, 1), mats[1, ..., :W].reshape(n_img, views * out, W)
        # ry: [views, img, out, H]; rx: [img, views * out, W], each image's views' R_x stacked.
        y = torch.bmm(x.reshape(n_img, C * H, W), rx.transpose(1, 2))  # along x: [img, C H, views out]
        y = y.view(n_img * C, H, views, out)
        z = x.new_empty(views, n_img * C, out, out)
        for v in range(views):  # along y
            torch.bmm(_per_channel(ry[v], C), y[:, :, v], out=z[v])
        return z.view(N, C, out, out).clamp_(0.0, 1.0)

    @staticmethod
    def _resample_matrices(
        box: torch.Tensor, flip: torch.Tensor, c: _Consts, buffer: torch.Tensor, views: int, in_size: tuple[int, int]
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

    @staticmethod
    def _table_matrices(
        box: torch.Tensor, flip: torch.Tensor, c: _Consts, views: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_resample_matrices` read from tables of every whole-pixel box (`_resample_tables`): two
        index_selects instead of a dozen ops and a scatter, a large part of the crop's cost on a CPU.
        Returns (ry [views, img, out, H], rx [img, views * out, W])."""
        N = box.shape[0]
        ry_table, rx_table = c.tables
        size = box[:, 2:]
        # Table rows: top + H h along y, left + W (w + (W + 1) flip) along x (exact in float32).
        idx = torch.addcmul(box[:, :2], torch.where(flip.view(N, 1), size + c.flip_shift, size), c.table_stride)
        iy, ix = idx.long().unbind(1)
        ry = ry_table.index_select(0, iy).view(views, N // views, *ry_table.shape[1:])
        rx = rx_table.index_select(0, ix.view(views, -1).t().reshape(-1))  # image-major: [img * views, ...]
        return ry, rx.view(N // views, views * rx_table.shape[1], rx_table.shape[2])

    def _jitter(self, x: torch.Tensor, p: dict[str, torch.Tensor], c: _Consts) -> torch.Tensor:
        """The jitter ops in each image's own order (`jitter_order[i, k]` = op index at position k)."""
        N, C = x.shape[:2]
        active = self._active_jitter(C)
        if not active:
            return x
        n = len(active)
        factors = torch.stack([p[name] for name in JITTER_OPS], 1)
        factors = torch.where(p["jitter"].unsqueeze(1), factors, c.jitter_identity)
        coef = torch.addcmul(c.stage_a0, factors.unsqueeze(2), c.stage_a1)  # [N, op, (a, c1, c2, d)]
        order = p["jitter_order"]
        if n < len(JITTER_OPS):  # the active ops' relative order (an index into `active`)
            order = torch.argsort(torch.argsort(order, dim=1).index_select(1, c.jitter_active), dim=1)
            coef = coef.index_select(1, c.jitter_active)
        stages = coef.gather(1, order.unsqueeze(2).expand(N, n, 4))  # [N, position, coefficients]
        hue = JITTER_OPS.index("hue") in active
        if hue:
            # Affine stages before the hue (first chain) and after it (second chain); elsewhere identity.
            before = ((order == n - 1).cumsum(1) == 0).unsqueeze(2)
            stages = torch.cat(
                [
                    torch.where(before, stages, c.stage_identity)[:, : n - 1],
                    torch.where(before, c.stage_identity, stages)[:, 1:],
                ],
                1,
            )
        S = stages.shape[1]
        if C == 1:
            # 1 x 1 "matrices": y = a x + c2 mean(x) + d elementwise (c1, the saturation's, is never
            # active on one channel). Per stage [4, N, 1, 1]: a, c1, c2, d.
            ms = stages.permute(1, 2, 0).reshape(S, 4, N, 1, 1).unbind(0)
        else:
            # Per stage: M (colour matrix), K (mean matrix), d (offset), each [N, ...], stage-major.
            mk = (stages[..., :3] @ c.stage_basis).transpose(0, 1).reshape(S, N, 2, C, C)
            ms, ks = mk[:, :, 0].unbind(0), mk[:, :, 1].unbind(0)
            ds = stages[..., 3].t().reshape(S, N, 1, 1).unbind(0)
        xf = x.reshape(N, C, -1)
        for s in range(S):
            if hue and s == n - 1:
                xf = self._hue(xf, p, c)
            mean = xf.mean(2, keepdim=True)
            if C == 1:
                a, _, k, d = ms[s].unbind(0)
                # In place (x is this call's own by now); not one addcmul: see apply's last line.
                xf = xf.mul_(a).add_(torch.addcmul(d, k, mean)).clamp_(0.0, 1.0)
            else:  # M x + (K mean(x) + d)
                xf = torch.baddbmm(torch.baddbmm(ds[s], ks[s], mean), ms[s], xf).clamp_(0.0, 1.0)
        if hue and S == 0:  # hue is the only active jitter op
            xf = self._hue(xf, p, c)
        return xf.view_as(x)

    @staticmethod
    def _hue(xf: torch.Tensor, p: dict[str, torch.Tensor], c: _Consts) -> torch.Tensor:
        N = xf.shape[0]
        shifted = hue_shift(xf, 6.0 * p["hue"].view(N, 1, 1), c.sectors).clamp_(0.0, 1.0)
        # Not bit-exact at delta 0 (rounding), so images without jitter are selected back.
        return torch.where(p["jitter"].view(N, 1, 1), shifted, xf)

    def _active_jitter(self, channels: int) -> list[int]:
        """Indices (into JITTER_OPS) of the jitter ops that can change an image: listed with a non-zero
        strength in some view, and not a no-op on `channels` channels."""
        if "jitter" not in self.ops:
            return []
        return [
            i
            for i, name in enumerate(JITTER_OPS)
            if name not in noop_ops(channels) and any(getattr(v, name) > 0 for v in self.views)
        ]

    def _constants(self, batch: int, channels: int, in_size: tuple[int, int], device: torch.device | str) -> _Consts:
        key = (batch, channels, tuple(in_size), str(device))
        if key not in self._consts:
            c = self._build_constants(batch, channels, in_size, torch.device(device))
            if "crop" in self.ops:
                # Batch-independent, so shared by every batch size of an input size.
                tables = (tuple(in_size), str(device))
                if tables not in self._tables:
                    self._tables[tables] = self._resample_tables(c, tuple(in_size))
                c.tables = self._tables[tables]
                if c.tables is None:
                    # The computed path scatters into a buffer kept between calls: a fresh tensor each call
                    # costs the CPU page faults when its memory is first touched, more than the zeroing.
                    c.resample = c.j.new_zeros(2, batch * len(self.views), self.out_size, max(in_size))
            self._consts[key] = c
        return self._consts[key]

    def _resample_tables(self, c: _Consts, in_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The crop's matrices for every whole-pixel box of an input size: R_y of (top, h) at row top + H h,
        [(H + 1) H, out, H], and R_x of (left, w, flip) at row left + W (w + (W + 1) flip), [2 (W + 1) W,
        out, W], made by `_resample_matrices` itself, so reading them is exact. None when they would
        exceed RESAMPLE_TABLE_FLOATS (inputs above ~32 px)."""
        H, W = in_size
        out = self.out_size
        n_y, n_x = (H + 1) * H, 2 * (W + 1) * W
        if (n_y * H + n_x * W) * out > RESAMPLE_TABLE_FLOATS:
            return None
        n = max(n_y, n_x)
        i = torch.arange(n, device=c.j.device, dtype=torch.float32)
        box = torch.stack([i % H, i % W, (i // H) % (H + 1), (i // W) % (W + 1)], 1)
        mats = self._resample_matrices(box, i >= (W + 1) * W, c, c.j.new_zeros(2, n, out, max(H, W)), 1, in_size)
        return mats[0, :n_y, 0, :, :H].contiguous(), mats[1, :n_x, 0, :, :W].contiguous()

    def _build_constants(self, batch: int, channels: int, in_size: tuple[int, int], device: torch.device) -> _Consts:
        H, W = in_size
        C = channels
        if len(self.mean) not in (1, C) or len(self.std) not in (1, C):
            # Broadcasting a 3-value mean over 1-channel images would silently triple the channels.
            raise ValueError(f"mean/std have {len(self.mean)} values for {C}-channel images; give 1 or {C}")
        f32 = dict(dtype=torch.float32, device=device)

        def t(v) -> torch.Tensor:
            return torch.tensor(v, **f32)

        def rows(per_view: list) -> torch.Tensor:
            return t(per_view).repeat_interleave(batch, 0)

        def taps(per_tap: list) -> torch.Tensor:
            return t(per_tap).view(4, 1, 1, 1)

        mute = set(noop_ops(C))
        probs, lo, span = [], [], []
        for v in self.views:
            probs.append([0.0 if (op not in self.ops or op in mute) else getattr(v, f"{op}_prob") for op in FLAG_OPS])
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
        mean = _channel_stat(self.mean, torch.empty(1, C, 1, 1, **f32))
        std = _channel_stat(self.std, torch.empty(1, C, 1, 1, **f32))
        A = -0.75
        out = self.out_size
        j = torch.arange(out, **f32).expand(2, -1)
        r = self.blur_size // 2
        blur_logit = rows(
            [
                [-0.5 * (i - r) ** 2 if abs(i - r) <= k // 2 else -math.inf for i in range(self.blur_size)]
                for k in self.blur_sizes
            ]
        )
        return _Consts(
            crop=CropSpace.build(
                [v.crop_scale for v in self.views], [v.crop_ratio for v in self.views], batch, (H, W), device
            ),
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
            jitter_active=torch.tensor(self._active_jitter(C), dtype=torch.long, device=device),
            stage_basis=basis,
            gray=gray,
            eye=eye,
            sectors=t(_HSV_SECTORS).view(1, 3, 1),
            blur_logit=blur_logit,
            blur_band=blur_band(out, self.blur_size).to(device) if out <= MATRIX_BLUR_MAX_SIDE else None,
            solarize_at=rows([v.solarize_threshold for v in self.views]),
            scale=1.0 / std,
            shift=-mean / std,
        )


class ViewTransform(BatchedViews):
    """One view distribution (T or T'): [B, C, H, W] -> [B, C, out, out]."""

    def __init__(
        self, view: ViewConfig, ops: Sequence[str], out_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__([view], ops, out_size, mean, std)
        self.view = view


class TwoViews:
    """(T(x), T'(x)) for a batch: both views as one batch of 2B rows, each with its own independent draws
    from one generator call."""

    def __init__(
        self,
        cfg: AugmentConfig,
        out_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        ops: Sequence[str] | None = None,
    ) -> None:
        self.batched = BatchedViews([cfg.view1, cfg.view2], cfg.ops if ops is None else ops, out_size, mean, std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.both(images, generator).chunk(2)

    def both(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[2B, C, out, out]: the first view's B images, then the second's."""
        return self.batched(images, generator)


# ---- evaluation ---------------------------------------------------------------------------------
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


# ---- per-image torchvision reference ------------------------------------------------------------
def reference_view_transform(
    view: ViewConfig,
    ops: Sequence[str],
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same view distribution as a per-image torchvision.transforms.v2 pipeline (one CHW uint8 image).

    For speed comparisons and rough distribution checks only. It differs from `ViewTransform` in that
    torchvision's ColorJitter brightness is multiplicative (factor U(1-b, 1+b)), not additive, and its
    crop antialiases when shrinking. Crop and flip come first, then the other listed ops in order.
    """
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    steps: list[Callable] = []
    if "crop" in ops:
        crop = v2.RandomResizedCrop(out_size, scale=view.crop_scale, ratio=view.crop_ratio, interpolation=bicubic)
        steps.append(crop)
    else:
        steps.append(v2.Resize((out_size, out_size), interpolation=bicubic))
    if "flip" in ops:
        steps.append(v2.RandomHorizontalFlip(view.flip_prob))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    for op in ops:
        if op == "jitter":
            jitter = v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
            steps.append(v2.RandomApply([jitter], p=view.jitter_prob))
        elif op == "grayscale":
            steps.append(v2.RandomGrayscale(view.grayscale_prob))
        elif op == "blur":
            blur = v2.GaussianBlur(blur_kernel_size(out_size, view.blur_kernel_frac), sigma=view.blur_sigma)
            steps.append(v2.RandomApply([blur], p=view.blur_prob))
        elif op == "solarize":
            steps.append(v2.RandomSolarize(view.solarize_threshold, p=view.solarize_prob))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)
