"""The BYOL loss: normalised MSE, 2 - 2 cos(q, z'), summed over both directions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||q/|q| - z'/|z'|||^2 = 2 - 2 cos(q, z'); the target side is detached."""
    q = F.normalize(prediction, dim=-1)
    z = F.normalize(target.detach(), dim=-1)
    return (2 - 2 * (q * z).sum(dim=-1)).mean()


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1_target: torch.Tensor, z2_target: torch.Tensor) -> torch.Tensor:
    """Symmetric loss: view 1's prediction regresses view 2's target projection and vice versa.

    Summed, not averaged (the paper's L + L~): halving it changes the effective learning rate.
    """
    return regression_loss(q1, z2_target) + regression_loss(q2, z1_target)
