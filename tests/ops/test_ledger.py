"""The test-set ledger: every network evaluated on a study's test set is counted once.

Oracle: the counts written out by hand from what ran — trials x seed replicates, plus each
rerun's retrains — and the Bonferroni bound recomputed with that N.
"""

import json

import optuna
import pytest

from pipeline.compare import bonferroni_clopper_pearson
from pipeline.ops.rerun import run_rerun
from pipeline.report.study_page import regenerate
from pipeline.storage import StudyError, open_storage
from tests.conftest import tiny_study


def _summary(ws, name="tiny"):
    return json.loads((ws["reports_root"] / name / "study" / "study_summary.json").read_text())


@pytest.mark.slow
def test_test_looks_count_trials_replicates_and_reruns_and_a_report_adds_none(workspace, monkeypatch):
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)  # not checked here
    cfg = tiny_study(trials=2, training__seeds=2, rerun={"seeds": 3})
    workspace.run(cfg)
    summary = _summary(workspace)
    assert summary["test_looks"] == 2 * 2 and summary["rerun_looks"] == 0
    assert summary["metrics"]["test_looks"] == 4

    kw = dict(storage=workspace["storage"], tracking_uri=workspace["tracking_uri"])
    run_rerun(cfg, reports_root=workspace["reports_root"], progress=False, **kw)
    summary = _summary(workspace)  # the rerun refreshed the page
    assert (summary["test_looks"], summary["rerun_looks"]) == (4 + 3, 3)

    regenerate(cfg, reports_root=workspace["reports_root"], **kw)  # re-tests nothing
    again = _summary(workspace)
    assert (again["test_looks"], again["rerun_looks"]) == (7, 3)

    # the simultaneous bounds run over every look, not over the trials alone
    trial = json.loads((workspace["reports_root"] / "tiny" / "trial-0000" / "metrics.json").read_text())
    selected = json.loads(
        (workspace["reports_root"] / "tiny" / f"trial-{again['selected']:04d}" / "metrics.json").read_text()
    )
    low, high = bonferroni_clopper_pearson(
        selected["test_k"], selected["test_m"], 1 - cfg.bounds.confidence, 7
    )
    assert again["metrics"]["selected_test_error_bonferroni_low"] == pytest.approx(low, abs=1e-12)
    assert again["metrics"]["selected_test_error_bonferroni_high"] == pytest.approx(high, abs=1e-12)
    assert trial["test_m"] == selected["test_m"]
    page = (workspace["reports_root"] / "tiny" / "index.html").read_text()
    assert "looked at N = 7 times" in page


def test_a_trial_that_fails_after_testing_still_counts(workspace, monkeypatch):
    """The networks saw the test set even if the trial then fails (here in its report stage)."""
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)  # not checked here
    real = __import__("pipeline.study.trial", fromlist=["bounds_and_report"]).bounds_and_report
    calls = {"n": 0}

    def first_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr("pipeline.study.trial.bounds_and_report", first_fails)
    cfg = tiny_study(trials=2, training__seeds=2)
    with pytest.raises(StudyError, match="No space left on device"):
        workspace.run(cfg)
    workspace.run(cfg)  # resumes: the failed trial's parameters again, then the second trial
    study = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"]))
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    assert all(t.user_attrs["test_looks"] == 2 for t in study.trials)  # the failed one too
    assert _summary(workspace)["test_looks"] == 3 * 2
