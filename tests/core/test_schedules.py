"""The cosine schedules: tau from tau_base to 1, the learning rate's linear scaling, warm-up and decay."""

from __future__ import annotations

import math

import pytest

from byol_ray.config import OptimConfig
from byol_ray.core.ema import tau_at
from byol_ray.core.optim import peak_lr
from byol_ray.core.schedules import warmup_cosine


# ---- tau schedule -------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [0.996, 0.99, 0.9, 0.0])
def test_tau_cosine_schedule(base):
    K = 1000
    assert tau_at(0, K, base) == pytest.approx(base, abs=1e-15)
    assert tau_at(K, K, base) == pytest.approx(1.0, abs=1e-15)
    assert tau_at(K // 2, K, base) == pytest.approx((1 + base) / 2, abs=1e-12)
    for k in (1, 137, 250, 999):
        assert tau_at(k, K, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2, abs=1e-15)
    taus = [tau_at(k, K, base) for k in range(K + 1)]
    assert all(b >= a for a, b in zip(taus, taus[1:]))
    assert tau_at(K + 50, K, base) == pytest.approx(1.0)  # clamped after the end


def test_tau_constant_schedule():
    assert all(tau_at(k, 100, 0.97, "constant") == 0.97 for k in (0, 1, 50, 99, 100, 200))


# ---- lr schedule --------------------------------------------------------------------------------
def test_peak_lr_linear_scaling():
    assert peak_lr(OptimConfig(base_lr=0.2, batch_size=4096)) == pytest.approx(3.2)
    assert peak_lr(OptimConfig(base_lr=0.3, batch_size=128)) == pytest.approx(0.15)
    assert peak_lr(OptimConfig(base_lr=0.2, batch_size=256)) == pytest.approx(0.2)


def test_lr_warmup_then_cosine():
    T, W, peak = 100, 10, 2.0
    warm = [warmup_cosine(s, T, W, peak) for s in range(W)]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(peak / W) for d in steps)  # linear
    assert 0 <= warm[0] <= peak / W + 1e-12  # starts at (or one step above) 0 ...
    assert peak * (W - 1) / W - 1e-12 <= warm[-1] <= peak + 1e-12  # ... and ends at (or one step below) peak
    for s in range(W, T + 1):
        p = (s - W) / (T - W)
        assert warmup_cosine(s, T, W, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert warmup_cosine(W, T, W, peak) == pytest.approx(peak)
    assert warmup_cosine(T, T, W, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(T + 5, T, W, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine((T + W) // 2, T, W, peak) == pytest.approx(peak / 2)
    # No warm-up: cosine from the first step.
    assert warmup_cosine(0, 50, 0, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(25, 50, 0, 1.0) == pytest.approx(0.5)
