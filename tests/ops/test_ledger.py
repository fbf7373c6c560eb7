"""The test-set ledger: every network evaluated on a study's test set is counted once.

Oracle: the counts written out by hand from what ran — trials x seed replicates, plus each
rerun's retrains — and the Bonferroni bound recomputed with that N.
"""

import json

import optuna
import pytest

from pipeline.compare import bonferroni_clopper_pearson
from pipeline.ops.rerun import run_rerun
from pipeline.report.reruns import HISTORY_FILE, record_rerun_looks, rerun_looks, save_history
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


@pytest.mark.slow
def test_a_rerun_that_dies_after_testing_still_counts(workspace, monkeypatch):
    """The rerun's ledger entry is written before its retrains see the test set, not with its record."""
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)  # not checked here
    cfg = tiny_study(trials=1, rerun={"seeds": 3})
    workspace.run(cfg)
    kw = dict(storage=workspace["storage"], tracking_uri=workspace["tracking_uri"])
    real = __import__("pipeline.ops.rerun", fromlist=["retrain"]).retrain

    def tests_then_dies(*args, **kwargs):
        real(*args, **kwargs)  # the three networks are trained and tested ...
        raise MemoryError("killed after testing")  # ... and the rerun dies before its record

    monkeypatch.setattr("pipeline.ops.rerun.retrain", tests_then_dies)
    with pytest.raises(MemoryError):
        run_rerun(cfg, reports_root=workspace["reports_root"], progress=False, **kw)
    monkeypatch.setattr("pipeline.ops.rerun.retrain", real)
    folder = workspace["reports_root"] / "tiny"
    assert not (folder / HISTORY_FILE).exists()  # no record ...
    assert rerun_looks(folder) == 3  # ... but counted
    run_rerun(cfg, reports_root=workspace["reports_root"], progress=False, **kw)
    assert (_summary(workspace)["test_looks"], _summary(workspace)["rerun_looks"]) == (1 + 3 + 3, 6)


def test_records_from_before_the_ledger_still_count(tmp_path):
    """A history written before the ledger file existed: each record's replicates count once."""
    save_history(tmp_path / HISTORY_FILE, [{"date": "a", "seeds": [1, 2]}, {"date": "b", "seeds": [1, 2]}])
    assert rerun_looks(tmp_path) == 4
    record_rerun_looks(tmp_path, "b", 2)  # a ledger that started with record b
    record_rerun_looks(tmp_path, "c", 5)  # and a rerun that died before its record
    assert rerun_looks(tmp_path) == 2 + 2 + 5
