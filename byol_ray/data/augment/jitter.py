"""Colour jitter: brightness, contrast, saturation and hue in a random order drawn per image, clamped to
[0, 1] after each, for a whole batch without a branch per permutation.

Brightness is ADDITIVE (x + delta, delta ~ U(-b, b)) as in the authors' code, not torchvision's
multiplicative one. Contrast blends with the per-image mean of the grayscale image, saturation with the
grayscale image (factors ~ U(max(0, 1-s), 1+s)). Hue rotates H in HSV by delta ~ U(-h, h) (the HSV route
of torchvision and ``tf.image.adjust_hue``, not the YIQ rotation).

How the per-image order runs without a branch per permutation: brightness, contrast and saturation are
each a per-image affine colour map, y = M x + K mean(x) + d (M, K 3x3 or 1x1, d a constant), so "the op at
position k of this image's order" is one batched `baddbmm` whose per-image matrices are gathered from the
image's order. Hue (an HSV rotation, not affine) runs once: the affine stages before it in an image's
order run in a first chain, those after it in a second, with identity stages where an image has nothing
to do. Four ops in any order cost 3 + 1 + 3 stages, not 4 x 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .colour import JITTER_OPS, hue_shift
from .constants import ViewConstants


def apply_jitter(x: torch.Tensor, p: dict[str, torch.Tensor], c: ViewConstants, active: Sequence[int]) -> torch.Tensor:
    """The jitter ops in each image's own order (`jitter_order[i, k]` = op index at position k); `active`
    lists the ops that can change an image (`colour.active_jitter`)."""
    N, C = x.shape[:2]
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
            xf = _hue(xf, p, c)
        mean = xf.mean(2, keepdim=True)
        if C == 1:
            a, _, k, d = ms[s].unbind(0)
            # In place (x is this call's own by now); not one addcmul: see BatchedViews.apply's last line.
            xf = xf.mul_(a).add_(torch.addcmul(d, k, mean)).clamp_(0.0, 1.0)
        else:  # M x + (K mean(x) + d)
            xf = torch.baddbmm(torch.baddbmm(ds[s], ks[s], mean), ms[s], xf).clamp_(0.0, 1.0)
    if hue and S == 0:  # hue is the only active jitter op
        xf = _hue(xf, p, c)
    return xf.view_as(x)


def _hue(xf: torch.Tensor, p: dict[str, torch.Tensor], c: ViewConstants) -> torch.Tensor:
    N = xf.shape[0]
    shifted = hue_shift(xf, 6.0 * p["hue"].view(N, 1, 1), c.sectors).clamp_(0.0, 1.0)
    # Not bit-exact at delta 0 (rounding), so images without jitter are selected back.
    return torch.where(p["jitter"].view(N, 1, 1), shifted, xf)
