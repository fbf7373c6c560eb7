"""Paired statistics: two models on the same test points, and N models read side by side.

- ``compare_paired``: the exact McNemar test with the interval that inverts it and a
  verdict; ``smallest_resolvable_difference`` says what the test set can resolve.
- ``union_hoeffding_epsilon`` / ``bonferroni_clopper_pearson``: simultaneous bounds, valid for all
  N test errors at once (picking the best of N on one set is optimistic: Cawley & Talbot 2010).
- ``tied_set``: with K training seeds per configuration, which configurations the selected one
  cannot be told apart from (Welch's t per trial, Holm-corrected over the trials);
  ``seed_paired_difference``: two configurations' test errors paired by seed, a t-interval over K.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from pipeline import bounds


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same test points: model A (selected) against model B (runner-up)."""

    table: np.ndarray  # 2×2 counts; rows A wrong / right, columns B wrong / right
    p_value: float  # exact two-sided McNemar
    difference: float  # error(A) − error(B); negative means A makes fewer errors
    low: float  # exact interval for the difference (inverts the McNemar test)
    high: float
    confidence: float
    verdict: str  # "better" | "worse" | "indistinguishable at this test size"

    @property
    def m(self) -> int:
        return int(self.table.sum())

    @property
    def n_discordant(self) -> int:
        return int(self.table[0, 1] + self.table[1, 0])


def paired_table(errors_a: np.ndarray, errors_b: np.ndarray) -> np.ndarray:
    """2×2 counts of two 0/1 error vectors on the same points: rows A wrong/right, columns B wrong/right."""
    a = np.asarray(errors_a).astype(bool)
    b = np.asarray(errors_b).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired errors must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    return np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)


def paired_difference_interval(table: np.ndarray, confidence: float) -> tuple[float, float]:
    """Newcombe's (1998, method 10) square-and-add interval for p1 − p2 from a paired 2×2 table.

    p1 = (t00 + t01)/n and p2 = (t00 + t10)/n, so p1 − p2 = (t01 − t10)/n. Wilson score limits for
    each proportion are combined with the phi correlation of the pairs (its numerator shrunk by
    n/2 when positive, as Newcombe does). Approximate, not guaranteed; unlike the Wald interval it
    does not collapse to zero width when the two models rarely disagree.
    """
    t = np.asarray(table, dtype=float)
    n = t.sum()
    if t.shape != (2, 2) or n <= 0:
        raise ValueError(f"need a 2×2 table with a positive total, got {t.tolist()}")
    a, b, c, d = t.ravel()
    alpha = 1 - confidence
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = proportion_confint(a + b, n, alpha=alpha, method="wilson")
    l2, u2 = proportion_confint(a + c, n, alpha=alpha, method="wilson")
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    shrunk = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = shrunk / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, low), min(1.0, high)


def exact_difference_interval(table: np.ndarray, confidence: float) -> tuple[float, float]:
    """The interval that inverts the exact McNemar test: for error(A) − error(B) given the n_d
    test points on which the two disagree.

    Given n_d, the b points where only A errs are Binomial(n_d, π) and the difference is
    n_d (2π − 1) / m; the Clopper–Pearson interval for π (each tail δ/2) maps to the difference.
    It excludes 0 exactly when the two-sided McNemar p-value (doubled tail) is at most δ, so the
    verdict and the interval shown can never disagree (they can with Newcombe's interval).
    """
    t = np.asarray(table, dtype=np.int64)
    m, b, c = int(t.sum()), int(t[0, 1]), int(t[1, 0])
    n_d = b + c
    if n_d == 0:
        return 0.0, 0.0
    low, high = stats.binomtest(b, n_d).proportion_ci(confidence, method="exact")
    return n_d * (2 * float(low) - 1) / m, n_d * (2 * float(high) - 1) / m


def compare_paired(errors_a: np.ndarray, errors_b: np.ndarray, confidence: float) -> PairedComparison:
    """Exact McNemar test, the interval that inverts it, and the verdict that interval gives."""
    table = paired_table(errors_a, errors_b)
    p_value = float(mcnemar(table, exact=True).pvalue)
    low, high = exact_difference_interval(table, confidence)
    difference = float(table[0, 1] - table[1, 0]) / table.sum()
    if high < 0:
        verdict = "better"
    elif low > 0:
        verdict = "worse"
    else:
        verdict = "indistinguishable at this test size"
    return PairedComparison(table, p_value, difference, low, high, confidence, verdict)


def smallest_resolvable_difference(n_discordant: int, m: int, delta: float) -> float:
    """Smallest |error(A) − error(B)| the exact two-sided McNemar test rejects at level δ.

    Given the n_d test points on which the two models disagree, a split (b, n_d − b) of those
    points gives p = 2·P(Binomial(n_d, ½) ≤ b); the answer is (n_d − 2b)/m for the largest b with
    p ≤ δ. NaN when even a one-sided split of all n_d points is not significant.
    """
    if n_discordant <= 0:
        return math.nan
    b = np.arange(n_discordant // 2 + 1)
    significant = np.nonzero(2 * stats.binom.cdf(b, n_discordant, 0.5) <= delta)[0]
    if not significant.size:
        return math.nan
    return (n_discordant - 2 * int(b[significant[-1]])) / m


def union_hoeffding_epsilon(m: int, delta: float, n_trials: int) -> float:
    """Half-width ε = sqrt(ln(2N/δ)/(2m)) holding for all N test errors at once (union bound)."""
    return bounds.hoeffding_epsilon(m, delta / n_trials)


def bonferroni_clopper_pearson(k: int, m: int, delta: float, n_trials: int) -> tuple[float, float]:
    """Clopper–Pearson interval at confidence 1 − δ/N: N of them hold together with probability ≥ 1 − δ."""
    low, high = stats.binomtest(k, m).proportion_ci(1 - delta / n_trials, method="exact")
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Seed replicates: K training seeds per configuration

TIE = 1e-12  # means closer than this are equal: the selection rule's tolerance (storage.TIE)


@dataclass(frozen=True)
class TiedRow:
    """One other trial against the selected one, on their per-seed validation objectives."""

    number: int
    mean: float  # of its objective over its seeds
    sd: float  # sample standard deviation (ddof = 1) over its seeds
    p_value: float  # two-sided Welch's t against the selected trial's seeds
    p_adjusted: float  # Holm-corrected over all the trials in the set
    tied: bool  # p_adjusted > δ: the test cannot tell it from the selected trial


@dataclass(frozen=True)
class SeedComparison:
    """Two configurations' test errors paired by seed index: A (selected) against B (runner-up)."""

    differences: tuple[float, ...]  # error_i(A) − error_i(B), replicate i of both from one seed
    difference: float  # their mean; negative means A makes fewer errors
    low: float  # Student's t interval over the K differences (approximate, not guaranteed)
    high: float
    confidence: float
    verdict: str  # "better" | "worse" | "indistinguishable across these seeds"

    @property
    def k(self) -> int:
        return len(self.differences)

    @property
    def label(self) -> str:
        return f"approximate: t over {self.k} seeds"


def _seeds(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"{what}: need at least 2 seeds to estimate seed noise, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: non-finite per-seed values {x.tolist()}")
    return x


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch's t-test of two samples (unequal variances), never NaN.

    scipy's ``ttest_ind(equal_var=False)``; when both samples are constant (spread within ``TIE``)
    the statistic is 0/0, so the answer is decided exactly: p = 1 if the means agree within ``TIE``,
    else 0 (two constant samples that differ differ with certainty).
    """
    x, y = _seeds(a, "first sample"), _seeds(b, "second sample")
    if np.ptp(x) <= TIE and np.ptp(y) <= TIE:
        return 1.0 if abs(x.mean() - y.mean()) <= TIE else 0.0
    with warnings.catch_warnings():
        if np.ptp(x) <= TIE or np.ptp(y) <= TIE:  # scipy warns of cancellation in a variance that is 0
            warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def tied_set(selected: Sequence[float], others: Mapping[int, Sequence[float]], delta: float) -> list[TiedRow]:
    """Each other trial against the selected one: Welch's p-value, Holm-adjusted over the trials.

    ``selected`` and each ``others[number]`` are per-seed validation objectives (K ≥ 2 each; K may
    differ between trials). Holm (statsmodels ``multipletests``) controls the chance of calling
    any configuration separated when it is not at δ over the whole set; a trial whose adjusted p
    exceeds δ is *tied*: the seeds cannot tell it from the selected one. Rows in ``others``' order.
    """
    _seeds(selected, "the selected trial")
    numbers = list(others)
    if not numbers:
        return []
    p = [welch_p_value(selected, _seeds(others[n], f"trial {n}")) for n in numbers]
    adjusted = multipletests(p, alpha=delta, method="holm")[1]
    rows = []
    for n, p_value, p_adj in zip(numbers, p, adjusted, strict=True):
        x = np.asarray(others[n], dtype=float)
        tied = bool(p_adj > delta)
        rows.append(TiedRow(n, float(x.mean()), float(x.std(ddof=1)), p_value, float(p_adj), tied))
    return rows


def seed_paired_difference(a: Sequence[float], b: Sequence[float], confidence: float) -> SeedComparison:
    """Mean of error_i(a) − error_i(b) over seeds i and its t-interval, with the verdict it gives.

    Replicate i of both configurations trained from the same seed, so pairing removes the part of
    seed noise they share. The interval mean ± t_{K−1, 1−δ/2}·sd/√K assumes the K differences are
    roughly normal: approximate, and with K of 3–5 wide. The verdict is read off the interval.
    """
    x, y = _seeds(a, "the selected trial's test errors"), _seeds(b, "the runner-up's test errors")
    if x.size != y.size:
        raise ValueError(f"seed pairing needs equal numbers of seeds, got {x.size} and {y.size}")
    d = x - y
    mean = float(d.mean())
    half = float(stats.t.ppf(1 - (1 - confidence) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    low, high = mean - half, mean + half
    if high < 0:
        verdict = "better"
    elif low > 0:
        verdict = "worse"
    else:
        verdict = "indistinguishable across these seeds"
    return SeedComparison(tuple(float(v) for v in d), mean, low, high, confidence, verdict)
