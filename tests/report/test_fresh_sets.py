"""The selected trial's fresh test sets: their test errors against the exact binomial, their coverage
against the exact sum, the same draws every time, and the study page's section.

Oracles: the true error R from the ground truth's exact posterior on points drawn here (not the
module's draws), ``bounds.exact_coverage`` at the same (m, R), and the page's bytes rebuilt.
"""

import math

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from pipeline import bounds
from pipeline.data import GMM_MEANS, GaussianMixture
from pipeline.model import build_mlp
from pipeline.report import fresh_sets
from pipeline.report import study_page as sr
from pipeline.report.study_summary import TrialOutputs
from tests.conftest import tiny_study

M, SETS, CONFIDENCE = 60, 4000, 0.9
ORACLE_POINTS = 2_000_000  # R's SD from the exact posterior on these: ≈ 2e-4, under the MC SD of 9e-4


@pytest.fixture(scope="module")
def oracle():
    """A small fixed network on the two-moons mixture and its true error R, from the posterior."""
    truth = GaussianMixture(GMM_MEANS)
    model = build_mlp(2, (4,), "tanh", seed=3).eval()
    with torch.inference_mode():
        x, _ = truth.sample(ORACLE_POINTS, torch.Generator().manual_seed(12345))
        p1 = truth.posterior(x)
        predicted = model(x).argmax(1)
    p_wrong = torch.where(predicted == 1, 1 - p1, p1)  # P(Y ≠ f(x) | x)
    return truth, model, float(p_wrong.mean()), float(p_wrong.std()) / ORACLE_POINTS**0.5


@pytest.fixture(scope="module")
def simulated(oracle):
    truth, model, r, r_sd = oracle
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fresh_sets, "CHUNK_POINTS", 1000)  # 16 sets a chunk, the last one short: 250 chunks
        return fresh_sets.simulate(model, truth, M, SETS, 7, r, CONFIDENCE, true_error_sd=r_sd)


def test_the_fresh_sets_test_errors_follow_the_exact_binomial(oracle, simulated):
    _, _, r, r_sd = oracle
    assert 0.05 < r < 0.95  # not a degenerate classifier
    assert simulated.n_sets == SETS and simulated.k.min() >= 0 and simulated.k.max() <= M
    assert simulated.binomial_sd == pytest.approx(math.sqrt(r * (1 - r) / M))
    mc_sd = math.sqrt(simulated.mean_mc_sd**2 + r_sd**2)  # the sets' noise and R's own
    assert abs(simulated.mean - r) <= 4 * mc_sd
    assert abs(simulated.sd - simulated.binomial_sd) <= 4 * simulated.sd_mc_sd


def test_each_methods_simulated_coverage_meets_the_exact_sum(oracle, simulated):
    _, _, r, _ = oracle
    exact = {c.method: c.coverage for c in bounds.exact_coverage(M, r, CONFIDENCE, bca="skip")}
    assert [c.method for c in simulated.coverage] == list(fresh_sets.SIMULATED)
    for c in simulated.coverage:
        mc_sd = math.sqrt(exact[c.method] * (1 - exact[c.method]) / SETS)
        assert c.exact == pytest.approx(exact[c.method])  # none given: computed at R
        assert c.mc_sd == pytest.approx(mc_sd)
        assert abs(c.simulated - exact[c.method]) <= 4 * max(mc_sd, 1 / SETS), c.method
        assert c.exact_low <= c.exact <= c.exact_high


def test_the_same_seed_draws_the_same_sets(oracle):
    truth, model, r, _ = oracle
    first = fresh_sets.simulate(model, truth, M, 300, 11, r, CONFIDENCE)
    again = fresh_sets.simulate(model, truth, M, 300, 11, r, CONFIDENCE)
    other = fresh_sets.simulate(model, truth, M, 300, 12, r, CONFIDENCE)
    np.testing.assert_array_equal(first.k, again.k)
    assert first.coverage == again.coverage
    assert not np.array_equal(first.k, other.k)


# ----------------------------------------------------------------------------------------------
# The study page


@pytest.mark.slow  # a two-trial study, then the page rebuilt
def test_a_ground_truth_study_page_has_the_section_and_rebuilds_byte_for_byte(workspace, monkeypatch):
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)  # R's precision is not checked
    cfg = tiny_study()  # fresh_sets = 200
    outcome = workspace.run(cfg)
    text = outcome.page.read_text()
    assert "The selected trial&#x27;s test error over fresh test sets" in text
    assert "S = 200 fresh test sets of m = 300 points" in text
    assert text.index("over fresh test sets</h2>") > text.index("<h2>The selected trial</h2>")
    assert 'alt="test error over fresh test sets"' in text
    assert (workspace["reports_root"] / "tiny" / "study" / fresh_sets.FIGURE).is_file()
    for method in fresh_sets.SIMULATED:
        assert f"<td>{method}</td>" in text
    rebuilt = sr.regenerate(  # the weights come from the trial's MLflow run: no report folder holds them
        cfg,
        storage=workspace["storage"],
        tracking_uri=workspace["tracking_uri"],
        reports_root=workspace["reports_root"],
    )
    assert rebuilt.read_text() == text


def _trial(number: int = 0) -> optuna.trial.FrozenTrial:
    dist = FloatDistribution(0.0, 0.3)
    params = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}  # a real trial's: trial_setup reads all 3
    trial = create_trial(value=0.8, params=params, distributions=dict.fromkeys(params, dist))
    trial.number = number
    return trial


def _outputs(number: int = 0, with_truth: bool = True) -> TrialOutputs:
    metrics = {"test_m": M, "test_k": 12, "test_error": 0.2, "confidence": CONFIDENCE}
    if with_truth:
        metrics["ground_truth"] = {"true_error": 0.2, "true_error_sd": 0.0, "coverage": []}
    return TrialOutputs(number, metrics, None, None, ("0", "1"))


def test_image_data_or_no_ground_truth_numbers_give_no_section(tmp_path):
    image = tiny_study(dataset__source="fashion2")  # nothing is read: the section needs a ground truth
    assert fresh_sets.ground_truth(image) is None
    assert fresh_sets.selected_section(image, _trial(), _outputs(), tmp_path, None, tmp_path) is None
    gmm = tiny_study()
    untruthed = _outputs(with_truth=False)
    assert fresh_sets.selected_section(gmm, _trial(), untruthed, tmp_path, None, tmp_path) is None
    assert fresh_sets.selected_section(gmm, None, None, tmp_path, None, tmp_path) is None


def test_the_weights_come_from_the_report_folder_or_the_section_says_they_are_missing(tmp_path):
    cfg = tiny_study(bounds__fresh_sets=100)
    missing = fresh_sets.selected_section(cfg, _trial(), _outputs(), tmp_path, None, tmp_path)
    assert missing is not None and missing.result is None and "model.pt was found neither" in missing.note
    folder = tmp_path / "trial-0000"
    folder.mkdir()
    torch.save(build_mlp(2, cfg.model.hidden, cfg.model.activation, seed=1).state_dict(), folder / "model.pt")
    found = fresh_sets.selected_section(cfg, _trial(), _outputs(), tmp_path, None, tmp_path)
    assert found is not None and found.result is not None and found.result.n_sets == 100
    assert found.figure.src.startswith("data:image/png;base64,") and (tmp_path / fresh_sets.FIGURE).is_file()
    assert len(found.rows) == len(fresh_sets.SIMULATED)
