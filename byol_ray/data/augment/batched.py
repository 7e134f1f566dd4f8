"""`BatchedViews`: one or more view distributions applied to a whole batch at once, in two halves, so
that the cost on a GPU is a fixed, small number of kernels:

1. `BatchedViews.sample_params` draws every random number of every view of the batch in ONE generator
   call (`N_DRAWS` uniforms per image and view, draws.py) and turns them into per-image parameters with a
   fixed number of tensor ops.
2. `BatchedViews.apply` applies them with a pure tensor function: no Python loop over images, no Python
   branch on a tensor's value, no host sync, and a number of ops that does not grow with the batch. An
   image that does not take an op gets that op's identity parameters (factor 1, delta 0, an impulse blur
   kernel, an identity colour matrix) or is selected back with `torch.where`.

Crop and flip come first (resample.py), then the listed ops in order: jitter (jitter.py), grayscale (luma
0.2989 R + 0.5870 G + 0.1140 B copied to the 3 channels), blur (a Gaussian kernel per image from its
sigma, blur.py), solarize (x -> 1 - x where x >= threshold); normalisation by mean/std comes last. The
tensors each call needs are built once per input shape (constants.py) and cached here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...config import AUG_OPS, ViewConfig
from .blur import NO_BLUR_SIGMA, blur_kernel_size, gaussian_blur, matrix_blur
from .boxes import crop_boxes
from .colour import active_jitter
from .constants import ViewConstants, build_constants
from .draws import FACTOR_DRAWS, FACTORS, FLAG_DRAWS, FLAG_OPS, N_DRAWS, ORDER_DRAWS
from .images import check_channels, to_float
from .jitter import apply_jitter
from .resample import crop_flip, resample_tables, resize_flip


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
        self._consts: dict[tuple, ViewConstants] = {}
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
        check_channels(x)
        batch = x.shape[0] if shared else x.shape[0] // V
        params = self.sample_params(batch, x.shape[1], (x.shape[-2], x.shape[-1]), generator, x.device)
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
            "jitter_order": torch.argsort(u[:, ORDER_DRAWS], dim=1),
        }
        p.update(zip(FLAG_OPS, (u[:, FLAG_DRAWS] < c.probs).unbind(1)))
        p.update(zip(FACTORS, torch.addcmul(c.factor_lo, u[:, FACTOR_DRAWS], c.factor_span).unbind(1)))
        return p

    # -- the second half: a pure function of the parameters ----------------------------------------
    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor], shared: bool = False) -> torch.Tensor:
        """The views for given parameters (no randomness): float32 [N, C, out, out], normalised. `images`
        holds one source image per row (N = V * batch), or with `shared` one per image of the batch, which
        every view reads (N = V * images; no copy of the batch per view)."""
        x = to_float(check_channels(images))
        V = len(self.views)
        B, C, H, W = x.shape
        N = V * B if shared else B
        c = self._constants(N // V, C, (H, W), x.device)
        if "crop" in self.ops:
            x = crop_flip(x, params["crop_box"], params["flip"], c, self.out_size, V if shared else 1)
        else:
            if shared and V > 1:
                x = x.expand(V, *x.shape).reshape(N, C, H, W)
            x = resize_flip(x, params["flip"], self.out_size)
        for op in self.ops:
            if op == "jitter":
                x = apply_jitter(x, params, c, active_jitter(self.views, self.ops, C))
            elif op == "grayscale" and C == 3:
                gray = torch.where(params["grayscale"].view(N, 1, 1), c.gray, c.eye)
                x = torch.bmm(gray, x.view(N, C, -1)).view_as(x)
            elif op == "blur":
                sigma = torch.where(params["blur"], params["blur_sigma"], NO_BLUR_SIGMA)
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

    def _constants(
        self, batch: int, channels: int, in_size: tuple[int, int], device: torch.device | str
    ) -> ViewConstants:
        key = (batch, channels, tuple(in_size), str(device))
        if key not in self._consts:
            c = build_constants(
                self.views,
                self.ops,
                self.out_size,
                self.mean,
                self.std,
                self.blur_sizes,
                batch,
                channels,
                in_size,
                torch.device(device),
            )
            if "crop" in self.ops:
                # Batch-independent, so shared by every batch size of an input size.
                tables = (tuple(in_size), str(device))
                if tables not in self._tables:
                    self._tables[tables] = resample_tables(c, in_size, self.out_size)
                c.tables = self._tables[tables]
                if c.tables is None:
                    # The computed path scatters into a buffer kept between calls: a fresh tensor each call
                    # costs the CPU page faults when its memory is first touched, more than the zeroing.
                    c.resample = c.j.new_zeros(2, batch * len(self.views), self.out_size, max(in_size))
            self._consts[key] = c
        return self._consts[key]
