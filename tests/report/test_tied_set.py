"""The tied set and the seed-paired runner-up comparison (K ≥ 2 training seeds per trial).

Oracles: scipy's ``ttest_ind(equal_var=False)`` and ``ttest_rel(...).confidence_interval``,
``scipy.stats.t.interval``, statsmodels' ``multipletests(method="holm")`` and Holm's step-down
rule written out here, all computed in the test; and a constructed study whose answer is known
(two configurations that differ only by seed noise, one that is 0.05 worse at SD 0.01).
"""

import dataclasses
import html
import json
import math
import warnings

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipeline import compare, storage
from pipeline.report import study_page as sr
from pipeline.report.html import number
from pipeline.report.study_summary import summarize_study
from tests.conftest import tiny_study

DELTA = 0.1  # the pages' δ = 1 − [bounds] confidence (0.9 by default)
SPACE = {"lr": FloatDistribution(0.01, 0.3, log=True), "momentum": CategoricalDistribution([0.0, 0.9])}


def _holm_by_hand(p):
    """Holm's step-down adjusted p-values: sorted ascending, (m − i)·p_(i), running max, capped at 1."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        adjusted[j] = running
    return adjusted


# ----------------------------------------------------------------------------------------------
# compare.tied_set and compare.seed_paired_difference


def test_welch_p_values_and_holm_adjustment_match_scipy_and_statsmodels():
    rng = np.random.default_rng(1)
    selected = 0.9 + 0.01 * rng.standard_normal(5)
    others = {
        3: 0.9 + 0.02 * rng.standard_normal(5),
        7: 0.88 + 0.01 * rng.standard_normal(4),  # the number of seeds may differ
        8: 0.85 + 0.01 * rng.standard_normal(6),
        12: 0.895 + 0.005 * rng.standard_normal(3),
    }
    rows = compare.tied_set(selected, others, DELTA)

    p = [stats.ttest_ind(selected, x, equal_var=False).pvalue for x in others.values()]
    holm = multipletests(p, alpha=DELTA, method="holm")[1]
    assert [r.number for r in rows] == list(others)
    np.testing.assert_allclose([r.p_value for r in rows], p, rtol=1e-12)
    np.testing.assert_allclose([r.p_adjusted for r in rows], holm, rtol=1e-12)
    np.testing.assert_allclose([r.p_adjusted for r in rows], _holm_by_hand(p), rtol=1e-12)
    for row, x, adj in zip(rows, others.values(), holm, strict=True):
        assert row.mean == pytest.approx(np.mean(x)) and row.sd == pytest.approx(np.std(x, ddof=1))
        assert row.tied is bool(adj > DELTA)
    assert {r.tied for r in rows} == {True, False}  # the draws exercise both outcomes
    # two-sided: which sample is the selected one does not change a p-value
    for n, x in others.items():
        assert compare.tied_set(x, {0: selected}, DELTA)[0].p_value == pytest.approx(
            next(r.p_value for r in rows if r.number == n), rel=1e-12
        )
    assert compare.tied_set(selected, {}, DELTA) == []


def test_zero_variance_samples_give_exact_p_values_never_nan():
    # both constant: the statistic is 0/0, so equal means give p = 1 and different means p = 0
    assert compare.welch_p_value([0.9] * 3, [0.9] * 4) == 1.0
    assert compare.welch_p_value([0.1 + 0.2] * 3, [0.3] * 3) == 1.0  # equal within 1e-12
    assert compare.welch_p_value([0.9] * 3, [0.8] * 3) == 0.0
    with warnings.catch_warnings():  # scipy warns of the cancellation in both variances, then says NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        assert math.isnan(stats.ttest_ind([0.9] * 3, [0.9] * 4, equal_var=False).pvalue)  # hence the rule
    # one constant sample and one that varies: Welch's t is defined; scipy's answer stands
    varying = [0.88, 0.9, 0.91]
    with warnings.catch_warnings():  # scipy warns of the cancellation in the constant one's variance
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = stats.ttest_ind([0.9] * 3, varying, equal_var=False).pvalue
    assert compare.welch_p_value([0.9] * 3, varying) == pytest.approx(expected, rel=1e-12)
    rows = compare.tied_set([0.9] * 3, {1: [0.9] * 3, 2: [0.8] * 3}, DELTA)
    assert [(r.p_value, r.tied) for r in rows] == [(1.0, True), (0.0, False)]
    assert all(math.isfinite(r.p_adjusted) for r in rows)
    assert compare.TIE == storage.TIE  # "equal" means what the selection rule calls a tie


@pytest.mark.parametrize(
    ("selected", "others"),
    [([0.9], {1: [0.8, 0.81]}), ([0.9, 0.91], {1: [0.8]}), ([0.9, math.nan], {1: [0.8, 0.81]})],
)
def test_the_tied_set_needs_two_finite_seeds_on_each_side(selected, others):
    with pytest.raises(ValueError, match="seeds|non-finite"):
        compare.tied_set(selected, others, DELTA)


def test_seed_paired_difference_is_the_paired_t_interval():
    rng = np.random.default_rng(2)
    for k in (2, 3, 5, 8):
        for shift in (-0.02, 0.0, 0.005, 0.03):
            for confidence in (0.8, 0.9, 0.95):
                a = 0.2 + 0.01 * rng.standard_normal(k)
                b = a - shift + 0.01 * rng.standard_normal(k)
                got = compare.seed_paired_difference(a, b, confidence)
                rel = stats.ttest_rel(a, b)
                ci = rel.confidence_interval(confidence_level=confidence)
                d = a - b
                assert got.difference == pytest.approx(d.mean(), abs=1e-15)
                assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
                low, high = stats.t.interval(confidence, k - 1, loc=d.mean(), scale=stats.sem(d))
                assert (got.low, got.high) == pytest.approx((low, high), rel=1e-10)
                # the verdict is the interval's, and agrees with the paired t-test at δ
                if got.high < 0:
                    assert got.verdict == "better"
                elif got.low > 0:
                    assert got.verdict == "worse"
                else:
                    assert got.verdict == "indistinguishable across these seeds"
                separated = got.verdict != "indistinguishable across these seeds"
                assert separated == (rel.pvalue < 1 - confidence)
                assert got.k == k and got.label == f"approximate: t over {k} seeds"


def test_seed_paired_difference_needs_equal_numbers_of_at_least_two_seeds():
    with pytest.raises(ValueError, match="equal numbers"):
        compare.seed_paired_difference([0.1, 0.2, 0.3], [0.1, 0.2], 0.9)
    with pytest.raises(ValueError, match="at least 2"):
        compare.seed_paired_difference([0.1], [0.2], 0.9)
    same = compare.seed_paired_difference([0.1, 0.2], [0.1, 0.2], 0.9)  # no spread: a point at 0
    assert (same.low, same.high, same.verdict) == (0.0, 0.0, "indistinguishable across these seeds")


# ----------------------------------------------------------------------------------------------
# A constructed study: A and B differ only by seed noise, C is 0.05 worse at SD 0.01 over 5 seeds

K = 5


def _seeded_trial(params, objective, test_error):
    objective, test_error = list(map(float, objective)), list(map(float, test_error))
    return create_trial(
        state=TrialState.COMPLETE,
        value=float(np.mean(objective)),
        params=params,
        distributions=SPACE,
        user_attrs={
            "replicates": len(objective),
            "objective_seeds": objective,
            "test_error_seeds": test_error,
            "val_acc": float(np.mean(objective)),
            "val_loss": 0.3,
            "test_error": float(np.mean(test_error)),
            "val_acc_std": float(np.std(objective, ddof=1)) if len(objective) > 1 else 0.0,
            "test_error_std": float(np.std(test_error, ddof=1)) if len(test_error) > 1 else 0.0,
        },
    )


def _three_configurations(means):
    """Trials 0-2 at lr 0.05, 0.1, 0.2: K seeds each of val_acc mean + N(0, 0.01²) (generator seed 1)."""
    rng = np.random.default_rng(1)
    study = optuna.create_study(study_name="tiny", direction="maximize")
    for lr, mean in zip((0.05, 0.1, 0.2), means, strict=True):
        study.add_trial(
            _seeded_trial(
                {"lr": lr, "momentum": 0.0},
                mean + 0.01 * rng.standard_normal(K),
                1 - mean + 0.01 * rng.standard_normal(K),
            )
        )
    return study


@pytest.fixture
def seeded():
    """Trials 0 (A) and 1 (B): one distribution, different draws; trial 2 (C): 0.05 lower.

    With no true difference Welch's p exceeds δ for about 90 % of draws, so one draw in ten would
    separate the twins: the draws of generator seed 1 give them p = 0.43 (seed 0's give 0.0998).
    """
    return _three_configurations((0.90, 0.90, 0.85))


def _oracle(study):
    """Welch against the selection, Holm over the rest, from scipy and statsmodels."""
    ranked = storage.ranked_trials(study)
    sel = ranked[0].user_attrs["objective_seeds"]
    others = ranked[1:]
    p = [stats.ttest_ind(sel, t.user_attrs["objective_seeds"], equal_var=False).pvalue for t in others]
    adjusted = multipletests(p, method="holm")[1]
    return ranked, {t.number: (pv, adj, adj > DELTA) for t, pv, adj in zip(others, p, adjusted, strict=True)}


def test_seed_noise_is_tied_and_a_real_difference_is_not(seeded):
    cfg = tiny_study(training__seeds=K)
    summary = summarize_study(seeded, cfg, {})
    ranked, oracle = _oracle(seeded)
    assert summary.selected == ranked[0].number in (0, 1)  # A or B, whichever drew the higher mean
    twin = 1 - summary.selected
    assert summary.replicates == K
    got = {r.number: (r.p_value, r.p_adjusted, r.tied) for r in summary.tied}
    assert got.keys() == oracle.keys() == {twin, 2}
    for n, (p, adj, tied) in oracle.items():
        assert got[n][:2] == pytest.approx((p, adj), rel=1e-12) and got[n][2] is bool(tied)
    assert got[twin][2] is True  # identical up to seed noise: tied
    assert got[2][2] is False  # 0.05 lower at SD 0.01 over 5 seeds: separated
    assert summary.metrics["tied_set_size"] == 1
    # the runner-up across seeds: the paired t-interval of the per-seed test errors
    runner = ranked[1]
    assert summary.runner_up == runner.number
    a, b = ranked[0].user_attrs["test_error_seeds"], runner.user_attrs["test_error_seeds"]
    ci = stats.ttest_rel(a, b).confidence_interval(confidence_level=cfg.bounds.confidence)
    assert summary.metrics["runner_up_seed_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert summary.metrics["runner_up_seed_difference_low"] == pytest.approx(ci.low)
    assert summary.metrics["runner_up_seed_difference_high"] == pytest.approx(ci.high)
    # written as JSON (no NaN, no dataclass), and read back the same
    data = json.loads(json.dumps(summary.to_dict(), default=lambda x: x.tolist(), allow_nan=False))
    assert [row["number"] for row in data["tied"]] == [r.number for r in summary.tied]
    assert data["seed_comparison"]["verdict"] == summary.seed_comparison.verdict


def test_a_configuration_better_by_far_more_than_seed_noise_has_no_tie():
    """Trial 2 is 0.05 better at SD 0.01 over 5 seeds: selected, and neither twin is tied with it."""
    study = _three_configurations((0.85, 0.85, 0.90))
    summary = summarize_study(study, tiny_study(training__seeds=K), {})
    ranked, oracle = _oracle(study)
    assert summary.selected == ranked[0].number == 2
    got = {r.number: (r.p_value, r.p_adjusted, r.tied) for r in summary.tied}
    assert got.keys() == oracle.keys() == {0, 1}
    for n, (p, adj, tied) in oracle.items():
        assert got[n][:2] == pytest.approx((p, adj), rel=1e-12) and got[n][2] is bool(tied) is False
    assert summary.metrics["tied_set_size"] == 0


def test_one_seed_trials_are_left_out_and_unequal_seeds_are_not_paired(seeded):
    seeded.add_trial(  # an old trial: one seed, no per-seed attributes
        create_trial(
            value=0.5,
            params={"lr": 0.02, "momentum": 0.9},
            distributions=SPACE,
            user_attrs={"test_error": 0.5},
        )
    )
    summary = summarize_study(seeded, tiny_study(training__seeds=K), {})
    assert summary.left_out == (3,) and 3 not in {r.number for r in summary.tied}
    assert any("the tied set leaves out trial 3 (one seed:" in note for note in summary.notes)

    study = optuna.create_study(direction="maximize")
    study.add_trial(_seeded_trial({"lr": 0.05, "momentum": 0.0}, [0.9, 0.91, 0.92], [0.1, 0.1, 0.11]))
    study.add_trial(_seeded_trial({"lr": 0.1, "momentum": 0.0}, [0.9, 0.89], [0.1, 0.12]))
    summary = summarize_study(study, tiny_study(training__seeds=3), {})
    assert summary.seed_comparison is None and "runner_up_seed_difference" not in summary.metrics
    assert len(summary.tied) == 1  # Welch takes unequal numbers of seeds
    assert any("no comparison paired by seed" in note for note in summary.notes)


# ----------------------------------------------------------------------------------------------
# The page


def _page(tmp_path, study, cfg):
    sources = sr.PageSources("memory", "none", None, None)
    page, summary, _ = sr.write_study_page(cfg, study, tmp_path / "reports" / "tiny", sources)
    return page.read_bytes(), summary


def _write_outputs(page_dir, study, m=200):
    """Each complete trial's folder as a trial leaves it: metrics.json and replicate 0's predictions."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, m)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        wrong = rng.random(m) < t.user_attrs["test_error_seeds"][0]
        predictions = np.where(wrong, 1 - labels, labels)
        folder = page_dir / f"trial-{t.number:04d}"
        folder.mkdir(parents=True)
        k = int(wrong.sum())
        metrics = {"test_m": m, "test_k": k, "test_error": k / m, "val_acc": t.value, "intervals": []}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        data = {"labels": labels.tolist(), "predictions": predictions.tolist(), "classes": ["a", "b"]}
        (folder / "test_predictions.json").write_text(json.dumps(data))


def test_the_page_lists_the_tied_set_and_the_comparison_across_seeds(seeded, tmp_path):
    cfg = tiny_study(training__seeds=K)
    for folder in ("a", "b"):
        _write_outputs(tmp_path / folder / "reports" / "tiny", seeded)
    first, summary = _page(tmp_path / "a", seeded, cfg)
    second, _ = _page(tmp_path / "b", seeded, cfg)
    assert first == second  # the same storage gives the same bytes
    text = first.decode()
    assert f"with {K} seeds per trial, val_acc and test_error are means over the seeds" in text
    assert "the interval is replicate 0's network's" in text  # never pinned on the mean
    ranked, oracle = _oracle(seeded)
    sel = ranked[0]
    n_tied = sum(tied for _, _, tied in oracle.values())
    assert "<h2>Tied with the selected trial</h2>" in text
    are = "configuration is" if n_tied == 1 else "configurations are"
    assert (
        f"<b>Selected trial {sel.number}; {n_tied} {are} statistically tied with it</b> "
        f"(Welch's t over {K} seeds, Holm-corrected at δ = {DELTA:.3g}" in text
    )
    assert "best mean validation objective" in text and "then to the smaller trial number" in text
    assert "<th>Welch p</th><th>Holm-adjusted p</th><th>tied</th>" in text
    for t in ranked[1:]:
        p, adj, tied = oracle[t.number]
        seeds = t.user_attrs["objective_seeds"]
        params = html.escape(", ".join(f"{k}={number(v)}" for k, v in t.params.items()))
        row = (
            f"<tr><td>{t.number}</td><td>{params}</td>"
            f"<td>{np.mean(seeds):.4f} ± {np.std(seeds, ddof=1):.4f}</td><td>{K}</td>"
            f"<td>{number(float(p))}</td><td>{number(float(adj))}</td><td>{'yes' if tied else 'no'}</td></tr>"
        )
        assert row in text
    assert f"<tr><td>{sel.number} (selected)</td>" in text
    errors = sel.user_attrs["test_error_seeds"]
    assert f"test error over the {K} seeds {np.mean(errors):.4f} ± {np.std(errors, ddof=1):.4f}" in text
    sc = summary.seed_comparison
    assert f"[{sc.low:+.4f}, {sc.high:+.4f}]" in text and f"approximate: t over {K} seeds" in text
    assert f"the selected trial is {sr._verdict_text(sc.verdict)}" in text
    # the per-network McNemar test stays, as a detail about replicate 0's networks
    assert summary.comparison is not None and "runner_up_mcnemar_p_value" in summary.metrics
    assert "Detail: the exact McNemar test below compares one network of each trial, replicate 0" in text
    assert "Verdict at δ = 0.1, replicate 0&#x27;s networks:" in text


def test_with_one_seed_the_page_says_why_no_tied_set_can_be_stated(tmp_path):
    study = optuna.create_study(study_name="tiny", direction="maximize")
    for lr, value in ((0.05, 0.8), (0.1, 0.85)):
        study.add_trial(
            create_trial(
                value=value,
                params={"lr": lr, "momentum": 0.0},
                distributions=SPACE,
                user_attrs={"val_acc": value, "test_error": 0.2},
            )
        )
    text, summary = _page(tmp_path, study, tiny_study())
    text = text.decode()
    assert summary.replicates == 1 and summary.tied is None and summary.seed_comparison is None
    assert "tied_set_size" not in summary.metrics
    assert "<h2>Tied with the selected trial</h2>" in text
    assert "seed noise (initialisation, batch order) cannot be separated from the configuration" in text
    assert "<code>[training] seeds = K</code> with K ≥ 2" in text
    assert "<th>Holm-adjusted p</th>" not in text and "statistically tied with it</b>" not in text
    selected = storage.ranked_trials(study)[0].number
    assert "are means over the seeds" not in text
    headline = f"<b>Selected trial {selected}; which configurations are statistically tied with it cannot"
    assert headline in text
    assert dataclasses.asdict(tiny_study().training)["seeds"] == 1
