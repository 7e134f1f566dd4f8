"""The paired statistics of the sweep report on hand-computed values (Student's t in closed form for 1
and 2 degrees of freedom) and against scipy's paired t-test."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from byol_ray.tracking.paired import Paired, differences, paired, pooled_sd, resolvable_difference, t_quantile

# Student's t in closed form: with 1 degree of freedom it is Cauchy, with 2 its cdf is
# 1/2 + t / (2 √(t² + 2)), so its quantile is (2q - 1) / √(2 q (1 - q)).
T1 = math.tan(math.pi * (0.975 - 0.5))  # 12.7062...
T2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # 4.302652...


# ---- the paired statistics -----------------------------------------------------------------------------
def test_paired_on_three_seeds_by_hand():
    p = paired([1.0, 2.0, 3.0])
    # mean 2; sd √(((1-2)² + 0 + (3-2)²) / 2) = 1; half-width t(0.975, 2) · 1 / √3.
    assert (p.n, p.mean, p.sd) == (3, 2.0, 1.0)
    assert t_quantile(3) == pytest.approx(T2, rel=1e-12) and T2 == pytest.approx(4.302652729749, rel=1e-12)
    assert p.half_width == pytest.approx(T2 / math.sqrt(3), rel=1e-12)  # 2.48414...
    assert (p.lo, p.hi) == pytest.approx((2 - 2.484137, 2 + 2.484137), abs=1e-6)
    # t = 2 / (1 / √3) = 2√3; two-sided p with 2 df = 1 - t / √(t² + 2) = 1 - 2√3 / √14.
    assert p.p_value == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-12)  # 0.07418
    assert p.resolved is False  # [-0.48, 4.48] holds 0


def test_paired_on_two_seeds_by_hand():
    p = paired([1.0, 3.0])
    # mean 2, sd √2, half-width t(0.975, 1) · √2 / √2 = 12.706; t = 2 / (√2 / √2) = 2, p = 1 - 2 atan(2) / π.
    assert (p.n, p.mean) == (2, 2.0) and p.sd == pytest.approx(math.sqrt(2), rel=1e-12)
    assert p.half_width == pytest.approx(T1, rel=1e-12) and T1 == pytest.approx(12.7062047, rel=1e-8)
    assert p.p_value == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-12)  # 0.29517
    assert p.resolved is False


def test_paired_without_variance_and_without_pairs():
    same = paired([0.5, 0.5, 0.5])  # the same difference on every seed: an interval of width 0 at 0.5
    assert (same.sd, same.half_width, same.lo, same.hi, same.p_value, same.resolved) == (0.0, 0.0, 0.5, 0.5, 0.0, True)
    none = paired([0.0, 0.0])  # identical rows: no difference at all
    assert (none.p_value, none.resolved) == (1.0, False)
    one = paired([4.0, math.nan])  # a NaN is not a pair
    assert (one.n, one.mean, one.resolved) == (1, 4.0, None) and math.isnan(one.half_width)
    assert paired([]).n == 0 and math.isnan(paired([]).mean)


def test_interval_and_t_test_agree_with_scipy_on_random_pairs():
    """The interval excludes 0 exactly when scipy's paired t-test gives p < 0.05, on 300 random samples."""
    rng = random.Random(0)
    resolved = 0
    for _ in range(300):
        n = rng.randint(2, 6)
        a = [rng.gauss(0, 1) for _ in range(n)]
        b = [x + rng.gauss(0.8, 1) for x in a]
        p = paired(differences(dict(enumerate(b)), dict(enumerate(a))))
        ref = stats.ttest_rel(b, a)
        assert p.p_value == pytest.approx(ref.pvalue, rel=1e-9)
        assert p.resolved == (ref.pvalue < 0.05)
        resolved += bool(p.resolved)
    assert 0 < resolved < 300  # both outcomes were exercised


def test_differences_pair_by_seed_and_pool():
    assert differences({0: 80.0, 1: 81.0, 2: 82.0}, {1: 70.0, 2: 71.5, 3: 72.0}) == [11.0, 10.5]
    assert differences({0: 1.0, 1: math.nan}, {0: 0.5, 1: 0.0}) == [0.5]
    # Pooled over (n=3, sd=1) and (n=3, sd=2): √((2·1 + 2·4) / 4) = √2.5; a set under 2 pairs is left out.
    sets = [Paired(3, 0.0, 1.0, 0.0, 1.0), Paired(3, 0.0, 2.0, 0.0, 1.0), Paired(1, 5.0, math.nan, math.nan, math.nan)]
    assert pooled_sd(sets) == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert resolvable_difference(math.sqrt(2.5), 3) == pytest.approx(T2 * math.sqrt(2.5) / math.sqrt(3), rel=1e-12)
    assert math.isnan(pooled_sd(sets[2:])) and math.isnan(resolvable_difference(1.0, 1))
