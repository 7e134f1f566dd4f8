"""Paired comparisons over seeds, for the sweep report: pure functions, no MLflow and no pandas.

Every row of a sweep trains the same seeds, so two rows (or a row and the untrained encoder of the same
seed) are compared seed by seed: the differences d_1..d_n of the shared seeds, their mean and sample sd,
the 95% confidence interval mean ± t(0.975, n-1) · sd / √n, and the two-sided paired t-test's p-value.
A difference is *resolved* when its interval excludes 0 (equivalently, p < 0.05). The seed's random
initialisation is shared by both sides, so pairing removes it from the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """The mean of n paired differences, its confidence interval and the paired t-test."""

    n: int
    mean: float  # nan when n == 0
    sd: float  # sample sd (n - 1 in the denominator); nan when n < 2
    half_width: float  # t(1/2 + LEVEL/2, n - 1) · sd / √n; nan when n < 2
    p_value: float  # two-sided; nan when n < 2

    @property
    def lo(self) -> float:
        return self.mean - self.half_width

    @property
    def hi(self) -> float:
        return self.mean + self.half_width

    @property
    def resolved(self) -> bool | None:
        """Whether the interval excludes 0; None (not testable) with fewer than 2 pairs."""
        if self.n < 2:
            return None
        return self.lo > 0 or self.hi < 0


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided `level` quantile of Student's t with n - 1 degrees of freedom."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def paired(diffs: Iterable[float], level: float = LEVEL) -> Paired:
    """The paired statistics of per-seed differences (NaNs are not differences and are left out)."""
    d = [float(x) for x in diffs if not math.isnan(x)]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(d) / n
    if n == 1:
        return Paired(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        # Identical differences on every seed: the t statistic is ±inf (p = 0) unless the difference is
        # 0 itself, which is no evidence of a difference at all (p = 1). Identical configs give this.
        return Paired(n, mean, 0.0, 0.0, 1.0 if mean == 0.0 else 0.0)
    t_stat = mean / (sd / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t_stat), n - 1))
    return Paired(n, mean, sd, t_quantile(n, level) * sd / math.sqrt(n), p)


def differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """a[s] - b[s] for every seed s both hold a number for, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b)) if not (math.isnan(a[s]) or math.isnan(b[s]))]


def pooled_sd(samples: Iterable[Paired]) -> float:
    """The pooled sd of several sets of paired differences, √(Σ (n_i - 1) sd_i² / Σ (n_i - 1)), over the
    sets with 2+ pairs; nan when there is none."""
    testable = [s for s in samples if s.n >= 2]
    dof = sum(s.n - 1 for s in testable)
    if dof == 0:
        return math.nan
    return math.sqrt(sum((s.n - 1) * s.sd**2 for s in testable) / dof)


def resolvable_difference(sd: float, n: int, level: float = LEVEL) -> float:
    """The half-width of the interval a difference over n seeds would have at sd: the smallest mean
    difference that interval can exclude 0 for. nan with fewer than 2 seeds or no sd."""
    if n < 2 or math.isnan(sd):
        return math.nan
    return t_quantile(n, level) * sd / math.sqrt(n)
