"""The BYOL loss: 2 - 2cos(q, z') per direction, both directions summed, no gradient into the target.

Expected values are computed independently (plain arithmetic), never copied from the code's output.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen

from byol_ray.core.loss import byol_loss, regression_loss


# ---- loss ---------------------------------------------------------------------------------------
def _two_minus_two_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 2.0 - 2.0 * dot / (na * nb)


P = [[1.0, 2.0, 2.0], [0.5, -1.0, 3.0]]
Z = [[2.0, 0.0, 1.0], [-1.0, 4.0, 0.5]]


def test_regression_loss_hand_computed():
    expected = (_two_minus_two_cos(P[0], Z[0]) + _two_minus_two_cos(P[1], Z[1])) / 2
    # Row 0 by hand: cos = (2 + 0 + 2) / (3 * sqrt(5)).
    assert _two_minus_two_cos(P[0], Z[0]) == pytest.approx(2 - 8 / (3 * math.sqrt(5)), abs=1e-12)
    got = regression_loss(torch.tensor(P, dtype=torch.float64), torch.tensor(Z, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # It is also ||q/|q| - z/|z|||^2 (the paper's form), computed with plain arithmetic.
    sq = []
    for p, z in zip(P, Z):
        np_, nz = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(x * x for x in z))
        sq.append(sum((x / np_ - y / nz) ** 2 for x, y in zip(p, z)))
    assert got.item() == pytest.approx(sum(sq) / 2, abs=1e-12)


def test_byol_loss_is_the_sum_of_both_directions():
    g = gen(1)
    q1, q2, z1, z2 = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    expected = 0.0
    for q, z in ((q1, z2), (q2, z1)):  # view 1's prediction regresses view 2's target, and vice versa
        expected += sum(_two_minus_two_cos(a, b) for a, b in zip(q.tolist(), z.tolist())) / 5
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(expected, abs=1e-12)
    # The pairing matters: q1 matches z2 exactly and q2 opposes z1 -> 0 + 4.
    assert byol_loss(q1, -z1, z1, 3 * q1).item() == pytest.approx(4.0, abs=1e-9)
    assert byol_loss(q1, q2, q2, q1).item() == pytest.approx(
        regression_loss(q1, q1).item() + regression_loss(q2, q2).item(), abs=1e-12
    )


def test_loss_is_scale_invariant_and_bounded():
    p = torch.tensor(P, dtype=torch.float64)
    z = torch.tensor(Z, dtype=torch.float64)
    ref = regression_loss(p, z).item()
    assert regression_loss(7.5 * p, 0.01 * z).item() == pytest.approx(ref, abs=1e-12)
    assert regression_loss(p * torch.tensor([[3.0], [0.2]], dtype=torch.float64), z).item() == pytest.approx(
        ref, abs=1e-12
    )  # per-row scales too
    assert regression_loss(p, p * 4).item() == pytest.approx(0.0, abs=1e-12)  # identical directions
    assert regression_loss(p, -0.5 * p).item() == pytest.approx(4.0, abs=1e-12)  # opposite directions
    orth = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert regression_loss(*orth).item() == pytest.approx(2.0, abs=1e-7)


def test_no_gradient_into_the_target():
    p = torch.tensor([P[0]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([Z[0]], dtype=torch.float64, requires_grad=True)
    regression_loss(p, z).backward()
    assert z.grad is None
    assert p.grad is not None
    # d/dp (2 - 2 p.zh/|p|) = -2 (zh/|p| - (p.zh) p/|p|^3), zh = z/|z|, by hand.
    pv, zv = P[0], Z[0]
    npv, nzv = math.sqrt(sum(x * x for x in pv)), math.sqrt(sum(x * x for x in zv))
    zh = [y / nzv for y in zv]
    dot = sum(x * y for x, y in zip(pv, zh))
    grad = [-2 * (zh[i] / npv - dot * pv[i] / npv**3) for i in range(3)]
    assert p.grad[0].tolist() == pytest.approx(grad, abs=1e-12)

    q1 = torch.randn(4, 6, generator=gen(2), requires_grad=True)
    q2 = torch.randn(4, 6, generator=gen(3), requires_grad=True)
    t1 = torch.randn(4, 6, generator=gen(4), requires_grad=True)
    t2 = torch.randn(4, 6, generator=gen(5), requires_grad=True)
    byol_loss(q1, q2, t1, t2).backward()
    assert q1.grad is not None and q2.grad is not None
    assert t1.grad is None and t2.grad is None
