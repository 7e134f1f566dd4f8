"""A per-image torchvision pipeline with the same view parameters as `ViewTransform`, for speed and
distribution comparisons (the benchmark and the tests); training never uses it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...config import ViewConfig
from .blur import blur_kernel_size


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
    # torchvision ships no type information; unused-ignore: pyproject may come to ignore it project-wide.
    from torchvision.transforms import InterpolationMode, v2  # type: ignore[import-untyped,unused-ignore]

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
