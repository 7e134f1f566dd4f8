"""The view transforms the rest of the package uses: `TwoViews` (BYOL's T and T' of a batch, as one batch
of 2B rows) and `ViewTransform` (one view distribution), both thin wrappers over `BatchedViews`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...config import AugmentConfig, ViewConfig
from .batched import BatchedViews


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
        first, second = self.both(images, generator).chunk(2)
        return first, second

    def both(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[2B, C, out, out]: the first view's B images, then the second's."""
        return self.batched(images, generator)
