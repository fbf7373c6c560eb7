"""The test-set ledger: every network evaluated on a study's test set is counted once.

Oracle: the counts written out by hand from what ran — trials x seed replicates, plus each
rerun's retrains — and the Bonferroni bound recomputed with that N.
"""

import json

import pytest

from pipeline.compare import bonferroni_clopper_pearson
from pipeline.ops.rerun import run_rerun
from pipeline.report.study_page import regenerate
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
