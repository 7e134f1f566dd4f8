"""The one cosine schedule, shared by pretraining (lr and tau), fine-tuning and linear evaluation."""

from __future__ import annotations

import math


def cosine_decay(step: float, total: float) -> float:
    """1 at step 0, 0 at `total` (and after), half a cosine in between: 0.5 (1 + cos(pi step / total))."""
    if total <= 0:
        return 1.0
    progress = min(1.0, max(0.0, step / total))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return peak
    return peak * cosine_decay(step - warmup_steps, total_steps - warmup_steps)
