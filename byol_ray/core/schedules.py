"""The one cosine schedule, shared by pretraining (lr and tau), fine-tuning and linear evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence


def cosine_decay(step: float, total: float) -> float:
    """1 at step 0, 0 at `total` (and after), half a cosine in between: 0.5 (1 + cos(pi step / total))."""
    if total <= 0:
        return 1.0
    progress = min(1.0, max(0.0, step / total))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: float, total_steps: float, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return peak
    return peak * cosine_decay(step - warmup_steps, total_steps - warmup_steps)


def schedule_position(step: int, breakpoints: Sequence[tuple[int, float]]) -> float:
    """Where optimiser step `step` is on the schedules: the step itself, unless a time-budgeted run re-planned
    and stretched or squeezed its remaining steps (training.plan.replan). `breakpoints` are increasing
    (step, position) pairs from (0, 0) to (last step, schedule length); positions in between are linear,
    so lr and tau stay continuous through a re-plan and still reach their ends at the last step."""
    for k in range(1, len(breakpoints)):  # at least one segment: (0, 0) to the last step
        (s0, p0), (s1, p1) = breakpoints[k - 1], breakpoints[k]
        if step < s1:
            break
    if s1 - s0 == p1 - p0:  # an unstretched segment: exactly the step (a run never re-planned is unchanged)
        return p0 + (step - s0)
    return p0 + (step - s0) * (p1 - p0) / (s1 - s0)
