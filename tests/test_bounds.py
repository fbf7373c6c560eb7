"""Tests for pipeline.bounds and pipeline.bounds_plots; each test names the oracle it compares to."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from pipeline import bounds
from pipeline.report import figures as bounds_plots

CASES = [(0, 50, 0.9), (50, 50, 0.9), (1, 50, 0.95), (7, 40, 0.8), (300, 2000, 0.9), (1999, 2000, 0.99)]


def _errors(k: int, m: int) -> np.ndarray:
    e = np.zeros(m, dtype=np.uint8)
    e[:k] = 1
    return e


def _by_method(intervals) -> dict[str, bounds.Interval]:
    return {iv.method: iv for iv in intervals}


def _oracle_half_widths(k: int, m: int, confidence: float) -> dict[str, float]:
    """Oracle: the lab's / Maurer–Pontil closed forms written out independently with math."""
    delta = 1 - confidence
    mean = k / m
    var = sum((x - mean) ** 2 for x in [1.0] * k + [0.0] * (m - k)) / (m - 1)
    big_l = math.log(2 / delta)
    a, b, c = m, -2 * big_l / 3, -2 * var * big_l  # m t² − (2L/3) t − 2σ²L = 0
    return {
        "hoeffding": math.sqrt(math.log(2 / delta) / (2 * m)),
        "chebyshev": math.sqrt(var / (m * delta)),
        "bernstein": (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a),
        "empirical_bernstein": math.sqrt(2 * var * math.log(4 / delta) / m)
        + 7 * math.log(4 / delta) / (3 * (m - 1)),
    }


@pytest.mark.parametrize(("k", "m", "confidence"), CASES)
def test_closed_form_intervals_match_oracles(k: int, m: int, confidence: float) -> None:
    """Oracles: statsmodels proportion_confint (beta, wilson) and the closed forms above."""
    got = _by_method(bounds.test_error_intervals(_errors(k, m), confidence, np.random.default_rng(0), 999))
    delta = 1 - confidence
    for method, sm_name in [("clopper_pearson", "beta"), ("wilson", "wilson")]:
        low, high = proportion_confint(k, m, alpha=delta, method=sm_name)
        assert got[method].low == pytest.approx(low, abs=1e-12)
        assert got[method].high == pytest.approx(high, abs=1e-12)
    for method, half in _oracle_half_widths(k, m, confidence).items():
        assert got[method].low == pytest.approx(max(k / m - half, 0.0), abs=1e-12)
        assert got[method].high == pytest.approx(min(k / m + half, 1.0), abs=1e-12)


@pytest.mark.parametrize(("k", "m", "confidence"), [c for c in CASES if 0 < c[0] < c[1]])
def test_bca_matches_scipy_bootstrap_with_same_seed(k: int, m: int, confidence: float) -> None:
    """Oracle: scipy.stats.bootstrap called here directly with the same seed."""
    e = _errors(k, m)
    result = bounds.analyse_errors(e, confidence, np.random.default_rng(7), 999)
    expected = stats.bootstrap(
        (e.astype(float),),
        np.mean,
        confidence_level=confidence,
        method="BCa",
        n_resamples=999,
        rng=np.random.default_rng(7),
    )
    bca = _by_method(result.intervals)["bca"]
    assert bca.available and not bca.guaranteed
    assert bca.low == pytest.approx(expected.confidence_interval.low, abs=1e-12)
    assert bca.high == pytest.approx(expected.confidence_interval.high, abs=1e-12)
    np.testing.assert_allclose(np.sort(result.distribution), np.sort(expected.bootstrap_distribution))


@pytest.mark.parametrize("k", [0, 30])
def test_bca_unavailable_when_all_errors_equal(k: int) -> None:
    """Oracle: the definition (one-point bootstrap distribution); no warning may escape."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bounds.analyse_errors(_errors(k, 30), 0.9, np.random.default_rng(0))
    bca = _by_method(result.intervals)["bca"]
    assert not bca.available and math.isnan(bca.low) and math.isnan(bca.high) and math.isnan(bca.width)
    assert "single point" in bca.note
    assert result.distribution is None
    assert all(iv.available for iv in result.intervals if iv.method != "bca")


def test_methods_order_names_and_guarantees() -> None:
    """Oracle: the brief's method list and which methods hold for every true error."""
    got = bounds.test_error_intervals(_errors(5, 40), 0.9, np.random.default_rng(0), 999)
    assert (
        tuple(iv.method for iv in got)
        == bounds.METHODS
        == (
            "clopper_pearson",
            "wilson",
            "hoeffding",
            "chebyshev",
            "bernstein",
            "empirical_bernstein",
            "bca",
        )
    )
    guaranteed = {"clopper_pearson", "hoeffding", "empirical_bernstein"}
    assert {iv.method for iv in got if iv.guaranteed} == guaranteed
    assert {name for name, g in bounds.GUARANTEED.items() if g} == guaranteed
    assert "sample variance" in _by_method(got)["chebyshev"].note
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].low = 0.0  # type: ignore[misc]


def test_intervals_clipped_to_unit_interval_and_input_untouched() -> None:
    """Oracle: [0, 1] is the range of an error rate; the input array must come back unchanged."""
    e = _errors(1, 20)
    before = e.copy()
    for iv in bounds.test_error_intervals(e, 0.99, np.random.default_rng(0), 999):
        assert 0.0 <= iv.low <= iv.high <= 1.0
        assert iv.width == pytest.approx(iv.high - iv.low)
    assert (
        _by_method(bounds.test_error_intervals(e, 0.99, np.random.default_rng(0), 999))["hoeffding"].low
        == 0.0
    )
    np.testing.assert_array_equal(e, before)


@pytest.mark.parametrize(("k", "m", "confidence"), [(7, 40, 0.8), (300, 2000, 0.9), (1, 50, 0.95)])
def test_bernstein_root_makes_the_bound_equal_delta(k: int, m: int, confidence: float) -> None:
    """Oracle: Bernstein's inequality 2·exp(−m t²/(2σ² + 2t/3)) evaluated at the returned t."""
    got = _by_method(bounds.test_error_intervals(_errors(k, m), confidence, np.random.default_rng(0), 999))
    t = got["bernstein"].high - k / m
    var = k * (m - k) / (m * (m - 1))
    bound = 2 * math.exp(-m * t * t / (2 * var + 2 * t / 3))
    assert bound == pytest.approx(1 - confidence, rel=1e-12)


def test_invalid_inputs_rejected() -> None:
    """Oracle: the input contract (0/1 vector, m ≥ 2, confidence in (0, 1))."""
    with pytest.raises(ValueError):
        bounds.test_error_intervals([0, 2, 1])
    with pytest.raises(ValueError):
        bounds.test_error_intervals([1])
    with pytest.raises(ValueError):
        bounds.test_error_intervals([0, 1], confidence=1.0)


def test_hoeffding_test_size_and_epsilon() -> None:
    """Oracle: NOTES.md figures, ceil(ln 200 / 2e-4) = 26 492 and ε = 0.0274 at m = 2000, δ = 0.1."""
    assert bounds.hoeffding_test_size(0.01, 0.01) == 26492
    assert bounds.hoeffding_epsilon(2000, 0.1) == pytest.approx(0.0274, abs=5e-5)
    assert bounds.hoeffding_epsilon(26492, 0.01) <= 0.01 < bounds.hoeffding_epsilon(26491, 0.01)


@pytest.mark.parametrize(("p", "approx"), [(0.5, 16650), (0.15, 8544)])
def test_exact_test_size_near_notes_and_minimal(p: float, approx: int) -> None:
    """Oracles: NOTES.md figures (±1 %) and statsmodels Clopper–Pearson (high − low)/2 at m and m − 1."""
    m = bounds.exact_test_size(0.01, 0.01, p)
    assert m == pytest.approx(approx, rel=0.01)

    def half_width(n: int) -> float:
        low, high = proportion_confint(round(p * n), n, alpha=0.01, method="beta")
        return (high - low) / 2

    assert half_width(m) <= 0.01 < half_width(m - 1)
    assert all(half_width(n) <= 0.01 for n in range(m, m + 200))


@pytest.mark.parametrize("p", [0.5, 0.45, 0.17, 0.05, 0.01, 0.001, 0.8, 0.999])
def test_exact_test_size_equals_a_brute_force_scan_from_hoeffdings_size(p: float) -> None:
    """Oracle: statsmodels' Clopper–Pearson at every m up to Hoeffding's size (beyond which every
    half-width is ≤ ε): the answer is one past the largest m whose half-width exceeds ε; the faster
    scan's starting point is never below it."""
    epsilon, delta = 0.03, 0.05
    m = np.arange(1, bounds.hoeffding_test_size(epsilon, delta) + 1)
    low, high = proportion_confint(np.round(p * m), m, alpha=delta, method="beta")
    too_wide = m[(high - low) / 2 > epsilon]
    expected = int(too_wide[-1]) + 1 if too_wide.size else 1
    assert bounds.exact_test_size(epsilon, delta, p) == expected
    assert expected <= bounds.sure_test_size(epsilon, delta, p) <= bounds.hoeffding_test_size(epsilon, delta)


def _bernoulli_sets(p: float, n_sets: int, m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_sets, m)) < p


def test_vectorized_intervals_equal_scalar_ones() -> None:
    """Oracle: the scalar test_error_intervals (scipy binomtest for CP/Wilson) on the same rows."""
    sets = _bernoulli_sets(0.1, 6, 300, seed=3)
    sets[0] = False  # include the degenerate k = 0 row
    k = sets.sum(axis=1)
    vectorized = bounds.count_intervals(k, 300, 0.9)
    for row in range(sets.shape[0]):
        scalar = _by_method(bounds.test_error_intervals(sets[row], 0.9, np.random.default_rng(0), 99))
        for method, (low, high) in vectorized.items():
            assert low[row] == pytest.approx(scalar[method].low, abs=1e-12), method
            assert high[row] == pytest.approx(scalar[method].high, abs=1e-12), method


def test_coverage_of_guaranteed_methods_at_least_nominal() -> None:
    """Oracle: the guarantee itself, up to 3 binomial standard errors of Monte-Carlo noise."""
    p, n_sets, m, confidence = 0.15, 4000, 500, 0.9
    sets = _bernoulli_sets(p, n_sets, m, seed=11).astype(np.uint8)
    before = sets.copy()
    result = {c.method: c for c in bounds.coverage(sets, p, confidence, np.random.default_rng(1), 20, 199)}
    np.testing.assert_array_equal(sets, before)
    assert tuple(result) == bounds.METHODS
    tolerance = 3 * math.sqrt(confidence * (1 - confidence) / n_sets)
    for method in ("clopper_pearson", "hoeffding", "empirical_bernstein"):
        assert result[method].guaranteed
        assert result[method].coverage >= confidence - tolerance, method
        assert result[method].n_sets == n_sets
    assert result["hoeffding"].mean_width == pytest.approx(2 * bounds.hoeffding_epsilon(m, 0.1))
    assert result["bca"].n_sets == 20 and "first 20 of 4000" in result["bca"].note
    assert 0 <= result["bca"].coverage <= 1


def test_coverage_matches_exact_binomial_coverage() -> None:
    """Oracle: exact coverage Σ_k Binom(k; m, p)·[p ∈ CI(k)] from scipy.stats.binom, vs simulation."""
    p, n_sets, m = 0.3, 4000, 200
    result = {c.method: c for c in bounds.coverage(_bernoulli_sets(p, n_sets, m, seed=5), p, 0.9, None, 0)}
    k = np.arange(m + 1)
    pmf = stats.binom.pmf(k, m, p)
    for method in ("clopper_pearson", "wilson"):
        low, high = proportion_confint(
            k, m, alpha=0.1, method="beta" if method == "clopper_pearson" else "wilson"
        )
        exact = float((pmf * ((low <= p) & (p <= high))).sum())
        assert result[method].coverage == pytest.approx(
            exact, abs=3 * math.sqrt(exact * (1 - exact) / n_sets)
        )
    assert result["bca"].n_sets == 0 and math.isnan(result["bca"].coverage)


@pytest.mark.parametrize(("m", "lo", "hi"), [(1000, 0.1, 0.2), (37, 0.0, 1.0), (2000, 0.1305, 0.1565)])
def test_histogram_bins_fall_between_levels(m: int, lo: float, hi: float) -> None:
    """Oracle: the lab's rule, edges between consecutive levels k/m and 1/m apart, covering [lo, hi]."""
    edges = bounds_plots.error_histogram_bins(m, lo, hi)
    np.testing.assert_allclose(np.diff(edges), 1 / m, rtol=1e-9)
    assert edges[0] <= lo and edges[-1] >= hi
    scaled = edges * m
    assert np.all(np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6)  # strictly between k/m and (k+1)/m
    levels = np.arange(math.ceil(lo * m - 1e-9), math.floor(hi * m + 1e-9) + 1)
    assert np.all(np.histogram(levels / m, bins=edges)[0] == 1)


def _assert_real_png(path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert image.std() > 0  # not a blank canvas


def test_plots_write_non_blank_pngs(tmp_path) -> None:
    """Oracle: matplotlib.image.imread reads back an image with varying pixels; no temp files left."""
    rng = np.random.default_rng(0)
    e = (rng.random(400) < 0.2).astype(np.uint8)
    result = bounds.analyse_errors(e, 0.9, rng, 999)
    bounds_plots.plot_bounds(
        result.distribution, result.empirical_error, result.intervals, 400, tmp_path / "b.png"
    )
    degenerate = bounds.analyse_errors(np.zeros(400), 0.9, rng)
    bounds_plots.plot_bounds(None, 0.0, degenerate.intervals, 400, tmp_path / "d.png")
    sets = rng.random((300, 400)) < 0.2
    bounds_plots.plot_true_distribution(400, 0.2, result.empirical_error, tmp_path / "t.png", sets.mean(1))
    bounds_plots.plot_true_distribution(400, 0.2, result.empirical_error, tmp_path / "e.png")
    exact = bounds.exact_coverage(400, 0.2, 0.9, rng, 99)
    bounds_plots.plot_coverage(exact, bounds.coverage(sets, 0.2, 0.9, rng, 10, 99), tmp_path / "c.png")
    bounds_plots.plot_coverage(exact, (), tmp_path / "x.png")
    names = ["b.png", "c.png", "d.png", "e.png", "t.png", "x.png"]
    for name in names:
        _assert_real_png(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == names


# --- exact coverage: Σ_k Binom(k; m, R)·[R ∈ I(k)] ---


def _oracle_exact(m: int, p: float, confidence: float, method: str) -> tuple[float, float]:
    """Oracle: the pmf sum and expected width written out with scipy.stats.binom, one k at a time,
    with Clopper–Pearson's limits from scipy.stats.beta or Hoeffding's k/m ± sqrt(ln(2/δ)/(2m))."""
    delta = 1 - confidence
    covered, width = [], []
    for k in range(m + 1):
        if method == "clopper_pearson":
            low = 0.0 if k == 0 else stats.beta.ppf(delta / 2, k, m - k + 1)
            high = 1.0 if k == m else stats.beta.ppf(1 - delta / 2, k + 1, m - k)
        else:
            eps = math.sqrt(math.log(2 / delta) / (2 * m))
            low, high = max(k / m - eps, 0.0), min(k / m + eps, 1.0)
        pmf = stats.binom.pmf(k, m, p)
        covered.append(pmf if low <= p <= high else 0.0)
        width.append(pmf * (high - low))
    return math.fsum(covered), math.fsum(width)


@pytest.mark.parametrize(("m", "p"), [(100, 0.05), (2000, 0.15), (500, 0.5)])
def test_exact_coverage_matches_an_independent_pmf_sum(m: int, p: float) -> None:
    """Oracle: _oracle_exact above (scipy.stats.binom and scipy.stats.beta / Hoeffding's formula)."""
    got = {c.method: c for c in bounds.exact_coverage(m, p, 0.9, bca="skip")}
    assert tuple(got) == bounds.METHODS
    for method in ("clopper_pearson", "hoeffding"):
        coverage, width = _oracle_exact(m, p, 0.9, method)
        assert got[method].coverage == pytest.approx(coverage, abs=1e-9), method
        assert got[method].mean_width == pytest.approx(width, abs=1e-9), method
        assert got[method].neglected == 0.0 and got[method].nominal == 0.9
    assert math.isnan(got["bca"].coverage) and "not computed" in got["bca"].note


@pytest.mark.parametrize("m", [30, 200, 2000])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_guaranteed_methods_exact_coverage_is_at_least_nominal(m: int, confidence: float) -> None:
    """Oracle: the guarantee itself, now with no Monte Carlo slack (Clopper & Pearson 1934)."""
    for p in (0.001, 0.01, 0.05, 0.1, 0.15, 0.2583, 0.5, 0.77, 0.999):
        got = {c.method: c for c in bounds.exact_coverage(m, p, confidence, bca="skip")}
        for method in ("clopper_pearson", "hoeffding", "empirical_bernstein"):
            assert got[method].coverage >= confidence - 1e-12, (method, p)
        assert 0.0 <= got["wilson"].coverage <= 1.0


def test_exact_coverage_of_plug_in_chebyshev_misses_at_k_zero() -> None:
    """Oracle: the pmf of k = 0, (1 − p)^m: Chebyshev's interval there is [0, 0] and misses p > 0."""
    got = {c.method: c for c in bounds.exact_coverage(2000, 1e-3, 0.9, bca="skip")}
    assert got["chebyshev"].coverage <= 1 - (1 - 1e-3) ** 2000 + 1e-12


@pytest.mark.parametrize(("m", "p", "seed"), [(300, 0.2, 0), (150, 0.5, 1), (60, 0.1, 2), (25, 0.04, 3)])
def test_bca_boundary_search_equals_evaluating_every_k(m: int, p: float, seed: int) -> None:
    """Oracle: bca="all", every k with pmf above BCA_TAIL through bca_bootstrap, same seed."""
    every = bounds.exact_coverage(m, p, 0.9, np.random.default_rng(seed), 199, bca="all")[-1]
    search = bounds.exact_coverage(m, p, 0.9, np.random.default_rng(seed), 199)[-1]
    assert search.coverage == every.coverage
    assert search.neglected == every.neglected <= 1e-9
    kept = int((stats.binom.pmf(np.arange(m + 1), m, p) > bounds.BCA_TAIL).sum())
    assert f"{kept} of the {kept} k's" in every.note and math.isfinite(every.mean_width)
    if m >= 150:  # large enough for the search to skip the middle of the covered run
        assert f"of the {kept} k's" in search.note and f"{kept} of the {kept}" not in search.note
        assert math.isnan(search.mean_width)


def test_bca_exact_coverage_is_a_probability_near_brute_force_simulation() -> None:
    """Oracle: brute force, BCa on 1500 simulated test sets with a fresh bootstrap each, within 4
    standard errors of both Monte Carlo estimates (the exact sum's own noise: its bootstrap)."""
    m, p, resamples = 40, 0.3, 199
    exact = [
        bounds.exact_coverage(m, p, 0.9, np.random.default_rng(seed), resamples, bca="all")[-1]
        for seed in range(10)
    ]
    values = np.array([c.coverage for c in exact])
    assert np.all((values >= 0) & (values <= 1))
    assert all(not c.guaranteed and c.method == "bca" for c in exact)
    rng = np.random.default_rng(123)
    sets = rng.random((1500, m)) < p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boots = [bounds.bca_bootstrap(row, 0.9, rng, resamples).interval for row in sets]
    brute = np.mean([b.available and b.low <= p <= b.high for b in boots])
    se = math.sqrt(values.var(ddof=1) / values.size + brute * (1 - brute) / sets.shape[0])
    assert values.mean() == pytest.approx(brute, abs=4 * se)


def test_bca_exact_coverage_counts_k_zero_as_not_covering() -> None:
    """Oracle: (1 − p)^m, the mass of k = 0, where BCa has no interval (all errors equal)."""
    m, p = 30, 0.02
    got = bounds.exact_coverage(m, p, 0.9, np.random.default_rng(0), 99)[-1]
    assert 0 <= got.coverage <= 1 - (1 - p) ** m + 1e-12
    assert "covers nothing" in got.note


def test_exact_coverage_rejects_bad_inputs() -> None:
    """Oracle: the input contract (R in [0, 1], m ≥ 2, a known BCa mode)."""
    for args, kw in (((100, 1.5), {}), ((1, 0.5), {}), ((100, 0.5), {"bca": "some"})):
        with pytest.raises(ValueError):
            bounds.exact_coverage(*args, **kw)
