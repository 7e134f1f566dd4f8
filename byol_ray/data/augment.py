"""BYOL's two view distributions T and T', applied to a whole batch at once on the batch's device.

Each image draws its own crop box, flip, colour-jitter factors and order, grayscale, blur sigma and
solarize decision, independently, from a `torch.Generator` the caller passes in (on the batch's device),
so a run is reproducible and, by saving the generator state, resumable. There is no Python loop over
images: every op is a batched tensor op and the per-image choices are masks or per-image factors.

The ops (``AugmentConfig.ops``, a subset of ``AUG_OPS``) and what they do, on images in [0, 1]:

- ``crop``: torchvision's RandomResizedCrop box (area fraction U(scale), log-aspect U(log ratio), 10 tries
  then a centre crop), resampled with bicubic ``grid_sample`` and clamped to [0, 1]. Boxes are whole pixels
  like torchvision's. Without ``crop`` the image is only resized to ``out_size``. The resample does not
  antialias, which only matters when a box is much larger than ``out_size`` (large ImageNet-style inputs).
- ``flip``: horizontal flip, folded into the crop's affine matrix (one resample for both).
- ``jitter``: brightness, contrast, saturation and hue in a random order drawn per image, clamped to
  [0, 1] after each. Brightness is ADDITIVE (x + delta, delta ~ U(-b, b)) as in the authors' code, not
  torchvision's multiplicative one. Contrast blends with the per-image mean of the grayscale image,
  saturation with the grayscale image (factors ~ U(max(0, 1-s), 1+s)). Hue rotates H in RGB -> HSV -> RGB
  by delta ~ U(-h, h) (the HSV route of torchvision and ``tf.image.adjust_hue``, not the YIQ rotation).
- ``grayscale``: luma 0.2989 R + 0.5870 G + 0.1140 B, copied to the 3 channels.
- ``blur``: Gaussian, sigma ~ U(blur_sigma), separable, reflect padding; the kernel side is
  ``blur_kernel_frac`` of the output side made odd as in the authors' code (224 -> 23, 96 -> 9), at least 3.
- ``solarize``: x -> 1 - x where x >= threshold.

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

import torch
import torch.nn.functional as F

from ..config import AUG_OPS, AugmentConfig, ViewConfig

LUMA = (0.2989, 0.5870, 0.1140)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
CROP_TRIES = 10


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


def _channel_stat(values: Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    C = x.shape[1]
    if len(values) not in (1, C):
        # Broadcasting a 3-value mean over 1-channel images would silently triple the channels.
        raise ValueError(f"mean/std have {len(values)} values for {C}-channel images; give 1 or {C}")
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# ---- crop + flip --------------------------------------------------------------------------------
def sample_crop_boxes(
    batch: int,
    in_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """torchvision's RandomResizedCrop.get_params for every image at once.

    All `CROP_TRIES` candidates are drawn up front; each image keeps its first valid one, and images with
    none fall back to the centre crop torchvision uses. Returns (top, left, height, width) in input pixels,
    plus the drawn area fraction and log-aspect of the kept candidate (the box's own for fallbacks).
    """
    H, W = in_size
    area = float(H * W)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u_area = torch.rand(batch, CROP_TRIES, generator=generator, device=device)
    u_ratio = torch.rand(batch, CROP_TRIES, generator=generator, device=device)
    u_top = torch.rand(batch, generator=generator, device=device)
    u_left = torch.rand(batch, generator=generator, device=device)

    frac = scale[0] + (scale[1] - scale[0]) * u_area
    log_r = log_lo + (log_hi - log_lo) * u_ratio
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(frac * area * aspect))
    h = torch.round(torch.sqrt(frac * area / aspect))
    valid = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = valid.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = valid.any(dim=1)

    fw, fh = _fallback_size(H, W, ratio)
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full_like(u_top, fw))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full_like(u_top, fh))
    # Uniform integer offsets in [0, H - h]; the clamp guards against u * n rounding up to n in float32.
    top = torch.minimum(torch.floor(u_top * (H - h + 1)), H - h)
    left = torch.minimum(torch.floor(u_left * (W - w + 1)), W - w)
    top = torch.where(found, top, torch.full_like(top, (H - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (W - fw) // 2))

    kept_frac = torch.where(found, frac.gather(1, first).squeeze(1), h * w / area)
    kept_log_r = torch.where(found, log_r.gather(1, first).squeeze(1), torch.log(w / h))
    return {
        "crop_box": torch.stack([top, left, h, w], dim=1),
        "crop_scale": kept_frac,
        "crop_log_ratio": kept_log_r,
    }


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


def crop_flip(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, out_size: int) -> torch.Tensor:
    """Resample each image's box to out_size x out_size (bicubic), mirrored where `flip`.

    With align_corners=False, normalised coordinate -1 / +1 is the outer edge of the first / last pixel,
    so a box [left, left + w) maps to centre (2 left + w) / W - 1 and half-width w / W. Negating the
    half-width mirrors the box, which is the flip at no extra cost.
    """
    B, C, H, W = x.shape
    top, left, h, w = box.to(x.dtype).unbind(1)
    sx = torch.where(flip, -w / W, w / W)
    sy = h / H
    cx = (2 * left + w) / W - 1
    cy = (2 * top + h) / H - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [B, C, out_size, out_size], align_corners=False)
    # "border" repeats edge pixels for the bicubic taps that fall outside the image.
    y = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return y.clamp_(0.0, 1.0)


def resize_flip(x: torch.Tensor, flip: torch.Tensor, out_size: int) -> torch.Tensor:
    """The no-crop path: the whole image resized (antialiased bicubic), mirrored where `flip`."""
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return torch.where(_per_image(flip), x.flip(-1), x)


# ---- colour -------------------------------------------------------------------------------------
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> luma [B, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (x + _per_image(delta)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(x) if x.shape[1] == 3 else x
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    h, s, v = rgb_to_hsv(x).unbind(1)
    h = torch.remainder(h + delta.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([h, s, v], 1)).clamp_(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    span = maxc - minc
    grey = span == 0
    # Grey pixels have no hue; the safe divisors only keep NaNs out of the discarded branch.
    s = span / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(grey, torch.ones_like(span), span)
    h = torch.where(
        maxc == r,
        (g - b) / d,
        torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d),
    )
    h = torch.where(grey, torch.zeros_like(h), torch.remainder(h / 6.0, 1.0))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6).unsqueeze(1)
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    # Row k holds (r, g, b) for hue sector k.
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i)
    return torch.cat([r, g, b], 1)


def color_jitter(x: torch.Tensor, p: dict[str, torch.Tensor], view: ViewConfig) -> torch.Tensor:
    """The four jitter ops in each image's own order (`jitter_order[b, k]` = op index at position k).

    At each position every op runs on the whole batch with identity factors for the images that do not
    take it there, so no image is gathered or scattered and nothing waits on the device.
    """
    on = p["jitter"]
    rgb = x.shape[1] == 3
    active = {
        "brightness": view.brightness > 0,
        "contrast": view.contrast > 0,
        "saturation": view.saturation > 0 and rgb,
        "hue": view.hue > 0 and rgb,
    }
    for k in range(len(JITTER_OPS)):
        for idx, name in enumerate(JITTER_OPS):
            if not active[name]:
                continue
            here = on & (p["jitter_order"][:, k] == idx)
            if name == "brightness":
                x = adjust_brightness(x, torch.where(here, p["brightness"], 0.0))
            elif name == "contrast":
                x = adjust_contrast(x, torch.where(here, p["contrast"], 1.0))
            elif name == "saturation":
                x = adjust_saturation(x, torch.where(here, p["saturation"], 1.0))
            else:
                # The HSV round trip is not bit-exact at delta 0, so untouched images are selected back.
                x = torch.where(_per_image(here), adjust_hue(x, p["hue"]), x)
    return x


def random_grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    return torch.where(_per_image(on), grayscale(x).expand_as(x), x)


# ---- blur, solarize -----------------------------------------------------------------------------
def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[B] sigmas -> [B, size] normalised 1-D Gaussian kernels."""
    r = size // 2
    pos = torch.arange(-r, r + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (pos / sigma.unsqueeze(1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor, size: int) -> torch.Tensor:
    """Separable per-image blur as two grouped convolutions (one group per image channel).

    Images not selected get a unit impulse kernel, which passes them through exactly.
    """
    B, C, H, W = x.shape
    r = size // 2
    if r >= min(H, W):
        raise ValueError(f"blur kernel {size} is too large for {H}x{W} images (reflect padding)")
    kern = gaussian_kernels(sigma.to(x.dtype), size)
    impulse = torch.zeros_like(kern)
    impulse[:, r] = 1.0
    kern = torch.where(on.unsqueeze(1), kern, impulse).repeat_interleave(C, dim=0)  # [B*C, size]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kern.view(B * C, 1, 1, size), groups=B * C)
    y = F.conv2d(y, kern.view(B * C, 1, size, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x: torch.Tensor, on: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(_per_image(on) & (x >= threshold), 1.0 - x, x)


# ---- the view distribution ----------------------------------------------------------------------
class ViewTransform:
    """One view distribution (T or T'): per-image random parameters, then batched ops."""

    def __init__(
        self,
        view: ViewConfig,
        ops: Sequence[str],
        out_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        unknown = [o for o in ops if o not in AUG_OPS]
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {unknown}; choose from {', '.join(AUG_OPS)}")
        self.view = view
        self.ops = list(ops)
        self.out_size = int(out_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.blur_size = blur_kernel_size(self.out_size, view.blur_kernel_frac)
        self._stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        # Cached device tensors stay behind when the transform is shipped to another process (Ray).
        return {**self.__dict__, "_stats": {}}

    def __repr__(self) -> str:
        return f"ViewTransform(ops={self.ops}, out_size={self.out_size}, view={self.view})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B, C, H, W = images.shape
        if generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but images are on {images.device}; "
                "create it with torch.Generator(device=images.device)"
            )
        params = self.sample_params(B, C, (H, W), generator, images.device)
        return self.apply(images, params)

    def sample_params(
        self,
        batch: int,
        channels: int,
        in_size: tuple[int, int],
        generator: torch.Generator,
        device: torch.device | str,
    ) -> dict[str, torch.Tensor]:
        """Every per-image random draw, as [batch] (or [batch, k]) tensors.

        The same numbers are drawn whatever the ops, strengths and channel count, so the random stream
        (and each op's draws) does not shift between ablations; ops that are not listed, or that do
        nothing on `channels` channels, are then reported as not firing / identity factors.
        """
        v, ops, B = self.view, self.ops, batch
        H, W = in_size

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        def between(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * u(B)

        p = sample_crop_boxes(B, (H, W), v.crop_scale, v.crop_ratio, generator, device)
        if "crop" not in ops:
            zero = torch.zeros(B, device=device)
            p["crop_box"] = torch.stack([zero, zero, zero + H, zero + W], dim=1)
            p["crop_scale"] = torch.ones(B, device=device)
            p["crop_log_ratio"] = torch.full((B,), math.log(W / H), device=device)
        p["flip"] = (u(B) < v.flip_prob) & ("flip" in ops)
        p["jitter"] = (u(B) < v.jitter_prob) & ("jitter" in ops)
        p["brightness"] = between(-v.brightness, v.brightness)
        p["contrast"] = between(max(0.0, 1 - v.contrast), 1 + v.contrast)
        p["saturation"] = between(max(0.0, 1 - v.saturation), 1 + v.saturation)
        p["hue"] = between(-v.hue, v.hue)
        p["jitter_order"] = torch.argsort(u(B, len(JITTER_OPS)), dim=1)
        p["grayscale"] = (u(B) < v.grayscale_prob) & ("grayscale" in ops)
        p["blur"] = (u(B) < v.blur_prob) & ("blur" in ops)
        p["blur_sigma"] = between(*v.blur_sigma)
        p["solarize"] = (u(B) < v.solarize_prob) & ("solarize" in ops)
        if channels == 1:
            p["saturation"] = torch.ones_like(p["saturation"])
            p["hue"] = torch.zeros_like(p["hue"])
            p["grayscale"] = torch.zeros_like(p["grayscale"])
        return p

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The view for given parameters (no randomness): float32 [B, C, out, out], normalised."""
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
        x = to_float(images)
        if "crop" in self.ops:
            x = crop_flip(x, params["crop_box"], params["flip"], self.out_size)
        else:
            x = resize_flip(x, params["flip"], self.out_size)
        for op in self.ops:
            if op == "jitter":
                x = color_jitter(x, params, self.view)
            elif op == "grayscale":
                x = random_grayscale(x, params["grayscale"])
            elif op == "blur":
                x = gaussian_blur(x, params["blur_sigma"], params["blur"], self.blur_size)
            elif op == "solarize":
                x = solarize(x, params["solarize"], self.view.solarize_threshold)
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Cached per device: building them from Python floats each batch would be a blocking host copy.
        key = (x.device, x.dtype, x.shape[1])
        if key not in self._stats:
            self._stats[key] = (_channel_stat(self.mean, x), _channel_stat(self.std, x))
        mean, std = self._stats[key]
        return (x - mean) / std


class TwoViews:
    """(T(x), T'(x)) for a batch, each view with its own independent draws from one generator."""

    def __init__(self, cfg: AugmentConfig, out_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.view1 = ViewTransform(cfg.view1, cfg.ops, out_size, mean, std)
        self.view2 = ViewTransform(cfg.view2, cfg.ops, out_size, mean, std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(images)  # convert once for both views
        return self.view1(x, generator), self.view2(x, generator)


# ---- evaluation ---------------------------------------------------------------------------------
def eval_transform(
    images: torch.Tensor, out_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
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
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

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
