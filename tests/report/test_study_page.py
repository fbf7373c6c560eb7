"""The study page: its statistics against exact oracles, its tables against Optuna's storage.

Oracles: binomial tails computed here with math.comb (McNemar, the smallest resolvable
difference), scipy's beta quantiles (Bonferroni Clopper–Pearson), the published worked example
for Newcombe's paired interval, Optuna's storage (states, params, reasons, counts) and MLflow's
store (the parent run's artifacts and metrics).
"""

import html
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from pipeline import compare
from pipeline.cli import main
from pipeline.config import load_study
from pipeline.report import study_page as sr
from pipeline.report import study_summary
from pipeline.storage import open_storage
from pipeline.study.run import open_study, run_study

# ----------------------------------------------------------------------------------------------
# Statistics


def _errors_from_table(both_wrong, a_only, b_only, both_right):
    """Two 0/1 error vectors whose paired table is the given one (A = rows, B = columns)."""
    a = [1] * both_wrong + [1] * a_only + [0] * b_only + [0] * both_right
    b = [1] * both_wrong + [0] * a_only + [1] * b_only + [0] * both_right
    order = np.random.default_rng(0).permutation(len(a))  # pairing, not position, matters
    return np.array(a)[order], np.array(b)[order]


def _two_sided_binomial_half(low_count, n):
    """P-value of the exact two-sided sign test: 2·P(Binomial(n, ½) ≤ low_count), capped at 1."""
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low_count + 1)) / 2**n)


def test_mcnemar_matches_the_exact_binomial_tail():
    # A wrong where B is right on 2 points, the reverse on 9: p = 2·(C(11,0)+C(11,1)+C(11,2))/2^11
    a, b = _errors_from_table(10, 2, 9, 79)
    expected = 2 * (1 + 11 + 55) / 2048
    assert _two_sided_binomial_half(2, 11) == pytest.approx(expected)

    result = compare.compare_paired(a, b, confidence=0.9)
    assert result.table.tolist() == [[10, 2], [9, 79]]
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert result.difference == pytest.approx((12 - 19) / 100)
    assert result.verdict == "better"  # p = 0.065 ≤ δ = 0.1, and A makes fewer errors
    assert compare.compare_paired(b, a, confidence=0.9).verdict == "worse"
    assert compare.compare_paired(a, b, confidence=0.95).verdict == "indistinguishable at this test size"
    # equal splits: p = 1
    same = compare.compare_paired(*_errors_from_table(5, 4, 4, 87), confidence=0.9)
    assert same.p_value == pytest.approx(1.0)


def test_paired_interval_reproduces_newcombes_worked_example():
    # Fagerland, Lydersen & Laake (2017), ch. 8: table [[59, 6], [16, 80]], 95 % Newcombe
    # square-and-add interval -0.1186 to -0.0046 for (6 − 16)/161 = -0.0621
    low, high = compare.paired_difference_interval(np.array([[59, 6], [16, 80]]), 0.95)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    # no disagreement at all: a real (non-degenerate) interval around 0, unlike Wald's
    low, high = compare.paired_difference_interval(np.array([[10, 0], [0, 90]]), 0.9)
    assert low < 0 < high


def test_union_bound_and_bonferroni_formulas():
    m, delta = 2000, 0.1
    assert compare.union_hoeffding_epsilon(m, delta, 50) == pytest.approx(
        math.sqrt(math.log(2 * 50 / delta) / (2 * m))
    )
    assert compare.union_hoeffding_epsilon(m, delta, 50) == pytest.approx(0.0416, abs=1e-4)  # NOTES.md
    assert compare.union_hoeffding_epsilon(m, delta, 1) == pytest.approx(0.0274, abs=1e-4)
    k, n = 230, 8
    low, high = compare.bonferroni_clopper_pearson(k, m, delta, n)
    # Clopper–Pearson limits at 1 − δ/N are Beta quantiles at δ/(2N)
    assert low == pytest.approx(stats.beta.ppf(delta / (2 * n), k, m - k + 1), rel=1e-9)
    assert high == pytest.approx(stats.beta.ppf(1 - delta / (2 * n), k + 1, m - k), rel=1e-9)
    single = stats.binomtest(k, m).proportion_ci(1 - delta, method="exact")
    assert low < single.low and high > single.high


def test_smallest_resolvable_difference_against_enumeration():
    m, delta = 1000, 0.1
    for n_d in (3, 4, 5, 12, 40):
        significant = [n_d - 2 * b for b in range(n_d // 2 + 1) if _two_sided_binomial_half(b, n_d) <= delta]
        got = compare.smallest_resolvable_difference(n_d, m, delta)
        if significant:
            assert got == pytest.approx(min(significant) / m)
        else:
            assert math.isnan(got)
    assert math.isnan(compare.smallest_resolvable_difference(4, m, delta))  # 2/16 = 0.125 > 0.1
    assert compare.smallest_resolvable_difference(5, m, delta) == pytest.approx(5 / m)  # 2/32 ≤ 0.1


# ----------------------------------------------------------------------------------------------
# A small real study: one failed trial (injected), one diverged (pruned), two complete

SMALL_TRUE_ERROR_SAMPLE = 100_000  # the page does not use the true error: keep its estimate cheap

TOML = """
name = "tiny"
trials = 3

[dataset]
source = "gmm"
n_train = 200
n_test = 300
seed = 0

[model]
hidden = [8]
activation = "relu"

[training]
epochs = 3
batch_size = 32
seed = 0

[search]
lr = { choices = [1e6, 0.05, 0.1] }
momentum = 0.0

[sampler]
kind = "random"

[bounds]
fresh_sets = 200
"""


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    toml = root / "tiny.toml"
    toml.write_text(TOML)
    cfg = load_study(toml)
    ws = {
        "storage": str(root / "storage" / "tiny.journal"),
        "tracking_uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "reports_root": root / "reports",
    }
    (root / "mlruns").mkdir()
    kw = dict(ws, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPTUNA_STORAGE", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", SMALL_TRUE_ERROR_SAMPLE)
        study = open_study(cfg, ws["storage"])
        for lr in (0.05, 1e6, 0.1, 0.05):  # trial 0 fails, 1 diverges, 2 and 3 complete
            study.enqueue_trial({"lr": lr, "momentum": 0.0})

        def boom(*_):
            raise RuntimeError("injected failure")

        mp.setattr("pipeline.study.trial.build_models", boom)
        with pytest.raises(RuntimeError, match="injected failure"):
            run_study(cfg, **kw)
        mp.undo()
        mp.delenv("OPTUNA_STORAGE", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", SMALL_TRUE_ERROR_SAMPLE)
        outcome = run_study(cfg, **kw)
        page_bytes = outcome.page.read_bytes()
    study = optuna.load_study(study_name="tiny", storage=open_storage(ws["storage"]))
    return {
        "cfg": cfg,
        "ws": ws,
        "root": root,
        "toml": toml,
        "outcome": outcome,
        "study": study,
        "page_bytes": page_bytes,
    }


@pytest.mark.slow  # shares the module's small study run
def test_study_run_writes_the_page(study_run):
    outcome = study_run["outcome"]
    assert (outcome.n_complete, outcome.n_pruned, outcome.n_failed) == (2, 1, 1)
    assert outcome.page == study_run["ws"]["reports_root"] / "tiny" / "index.html"
    assert outcome.page.is_file()


@pytest.mark.slow  # shares the module's small study run
def test_trials_table_matches_optuna_storage(study_run):
    study, cfg = study_run["study"], study_run["cfg"]
    page_dir = study_run["ws"]["reports_root"] / "tiny"
    frame = study_summary.trials_frame(study, cfg, page_dir)
    trials = study.get_trials()
    assert frame["number"].tolist() == [t.number for t in trials]
    state_names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    assert frame["state"].tolist() == [state_names[t.state] for t in trials]
    for row, trial in zip(frame.itertuples(), trials, strict=True):
        assert row.lr == trial.params["lr"] and row.momentum == trial.params["momentum"]
        if trial.state == TrialState.COMPLETE:
            assert row.val_acc == trial.value
            assert row.test_error == trial.user_attrs["test_error"]
            assert row.test_error_clopper_pearson_low <= row.test_error <= row.test_error_clopper_pearson_high
            assert row.report == f"trial-{trial.number:04d}/report.html"
            assert row.best_val_acc == max(trial.intermediate_values.values())
        else:
            assert math.isnan(row.test_error) and row.report == ""
    assert frame["state"].value_counts().to_dict() == {"complete": 2, "pruned": 1, "failed": 1}
    # the CSV beside the page holds the same table
    csv = pd.read_csv(page_dir / "study" / "trials.csv", keep_default_na=False)
    assert csv["state"].tolist() == frame["state"].tolist()
    assert csv["lr"].tolist() == frame["lr"].tolist()


@pytest.mark.slow  # shares the module's small study run
def test_page_lists_pruned_and_failed_trials_with_reasons(study_run):
    study = study_run["study"]
    page = study_run["outcome"].page.read_text()
    pruned = study.get_trials(states=(TrialState.PRUNED,))[0]
    failed = study.get_trials(states=(TrialState.FAIL,))[0]
    assert "non-finite loss at epoch" in pruned.user_attrs["reason"]
    assert failed.user_attrs["reason"] == "RuntimeError: injected failure"
    assert pruned.user_attrs["reason"] in page
    assert "RuntimeError: injected failure" in page
    assert "4 trials: 2 complete, 1 pruned, 1 failed" in page


@pytest.mark.slow  # shares the module's small study run
def test_selection_and_comparison_come_from_validation_and_the_saved_predictions(study_run):
    study = study_run["study"]
    folder = study_run["ws"]["reports_root"] / "tiny"
    summary = json.loads((folder / "study" / "study_summary.json").read_text())
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: (t.value, -t.number))
    runner = next(t for t in complete if t.number != best.number)
    assert summary["selected"] == study.best_trial.number == best.number
    assert summary["runner_up"] == runner.number
    assert summary["n_tested"] == 2 and summary["m"] == 300

    def errors(n):
        data = json.loads((folder / f"trial-{n:04d}" / "test_predictions.json").read_text())
        return np.array(data["labels"]) != np.array(data["predictions"])

    a, b = errors(best.number), errors(runner.number)
    assert a.mean() == pytest.approx(best.user_attrs["test_error"])
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    expected_p = stats.binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
    assert summary["comparison"]["p_value"] == pytest.approx(expected_p)
    assert summary["metrics"]["union_hoeffding_epsilon"] == pytest.approx(
        math.sqrt(math.log(2 * 2 / 0.1) / (2 * 300))
    )


@pytest.mark.slow  # shares the module's small study run
def test_one_seed_per_trial_gives_no_tied_set_and_the_page_says_why(study_run):
    """The study ran with [training] seeds = 1: no tied set, no comparison across seeds, a reason."""
    folder = study_run["ws"]["reports_root"] / "tiny"
    summary = json.loads((folder / "study" / "study_summary.json").read_text())
    assert summary["replicates"] == 1 and summary["tied"] is None and summary["seed_comparison"] is None
    assert "tied_set_size" not in summary["metrics"]
    page = study_run["outcome"].page.read_text()
    assert "<h2>Tied with the selected trial</h2>" in page
    assert "seed noise (initialisation, batch order) cannot be separated from the configuration" in page


@pytest.mark.slow  # shares the module's small study run
def test_the_page_in_the_parent_run_names_each_trials_run_instead_of_dead_links(study_run, tmp_path):
    """In MLflow's artifact viewer a trial's report sits in the trial's own run, not beside the page."""
    client = MlflowClient(study_run["ws"]["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.pipeline_role = 'study'")
    copy = Path(client.download_artifacts(parent.info.run_id, "index.html", str(tmp_path)))
    text = copy.read_text()
    assert "trial-0002/report.html" not in text and 'href="trial-' not in text  # nothing that 404s there
    on_disk = (study_run["ws"]["reports_root"] / "tiny" / "index.html").read_text()
    assert 'href="trial-0002/report.html"' in on_disk  # the page on disk keeps its links
    named = re.findall(r'<code class="run">([0-9a-f]*)</code>', text)
    trials = {t.number: t.user_attrs.get("mlflow_run_id", "") for t in study_run["study"].get_trials()}
    assert named == [trials[n] for n in sorted(trials)]  # one per row, in the table's (number) order
    for run_id in filter(None, named):
        run = client.get_run(run_id)
        assert run.info.experiment_id == exp.experiment_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id  # nested under this run
        if run.data.tags.get("trial_state") == "COMPLETE":
            assert "report.html" in {a.path for a in client.list_artifacts(run_id)}


def test_parent_run_holds_the_page_figures_and_study_metrics(study_run):
    client = MlflowClient(study_run["ws"]["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.pipeline_role = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"index.html", "study"} <= artifacts
    inner = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/trials.csv", "study/forest.png", "study/history.png", "study/study_summary.json"} <= inner
    metrics = parent.data.metrics
    assert (metrics["n_complete"], metrics["n_pruned"], metrics["n_failed"]) == (2, 1, 1)
    for key in (
        "best_val_acc",
        "selected_test_error",
        "selected_test_error_clopper_pearson_low",
        "selected_test_error_bonferroni_low",
        "selected_test_error_bonferroni_high",
        "union_hoeffding_epsilon",
        "runner_up_mcnemar_p_value",
        "selected_val_test_gap",
    ):
        assert key in metrics, key
    assert metrics["selected_test_error_bonferroni_low"] <= metrics["selected_test_error_clopper_pearson_low"]
    # each trial run's test predictions are an artifact, so the page can be rebuilt from MLflow alone
    for run in client.search_runs([exp.experiment_id], filter_string="tags.pipeline_role = 'trial'"):
        if run.data.tags.get("trial_state") == "COMPLETE":
            assert "test_predictions.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # shares the module's small study run
def test_report_regenerates_the_page_byte_for_byte(study_run):
    ws, cfg = study_run["ws"], study_run["cfg"]
    first = sr.regenerate(
        cfg, storage=ws["storage"], tracking_uri=ws["tracking_uri"], reports_root=ws["reports_root"]
    )
    assert first.read_bytes() == study_run["page_bytes"]  # the study run's page, rebuilt from storage
    second = sr.regenerate(
        cfg, storage=ws["storage"], tracking_uri=ws["tracking_uri"], reports_root=ws["reports_root"]
    )
    assert second.read_bytes() == study_run["page_bytes"]
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.slow  # shares the module's small study run
def test_cli_report_rebuilds_from_mlflow_artifacts_alone(study_run, tmp_path, monkeypatch, capsys):
    """From another folder (no trial report folders there), the trials' outputs come from MLflow."""
    ws = study_run["ws"]
    monkeypatch.chdir(tmp_path)
    argv = [
        "report",
        str(study_run["toml"]),
        "--storage",
        ws["storage"],
        "--tracking-uri",
        ws["tracking_uri"],
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == "study page: reports/tiny/index.html"
    rebuilt = json.loads((tmp_path / "reports" / "tiny" / "study" / "study_summary.json").read_text())
    original = json.loads((ws["reports_root"] / "tiny" / "study" / "study_summary.json").read_text())
    assert rebuilt == original
    assert not (tmp_path / "reports" / "tiny" / "trial-0002").exists()


def test_cli_report_without_a_study_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(TOML)
    assert main(["report", "s.toml", "--storage", str(tmp_path / "none.journal")]) == 2
    err = capsys.readouterr().err
    assert "no Optuna storage" in err and "none.journal" in err and "pipeline study" in err
    assert not (tmp_path / "none.journal").exists()  # nothing created


# ----------------------------------------------------------------------------------------------
# Degenerate studies and failures of the page itself


def test_page_explains_what_it_cannot_show(tmp_path):
    cfg = load_study_text(tmp_path)
    study = optuna.create_study(direction="maximize")
    dists = {"lr": CategoricalDistribution([1e6, 0.05, 0.1]), "momentum": FloatDistribution(0.0, 0.0)}
    study.add_trial(create_trial(value=0.8, params={"lr": 0.05, "momentum": 0.0}, distributions=dists))
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"lr": 1e6, "momentum": 0.0},
            distributions=dists,
            user_attrs={"reason": "non-finite loss at epoch 1"},
        )
    )
    study.add_trial(
        create_trial(state=TrialState.FAIL, params={"lr": 0.1, "momentum": 0.0}, distributions=dists)
    )
    sources = sr.PageSources("memory", "none", None, None)
    page, summary, _ = sr.write_study_page(cfg, study, tmp_path / "reports" / "tiny", sources)
    text = page.read_text()
    assert summary.selected == 0 and summary.runner_up is None
    assert "Fewer than two complete trials" in text
    assert "parameter importances need at least 2 complete trials" in text
    assert "non-finite loss at epoch 1" in text and html.escape(study_summary.NO_REASON) in text
    assert "1 complete, 1 pruned, 1 failed" in text


@pytest.mark.slow
def test_a_failing_page_warns_and_keeps_the_trials(study_run, monkeypatch):
    """Resume the finished study with the page writer broken: a warning, the trials untouched."""
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def broken(*_, **__):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(sr, "write_study_page", broken)
    ws = study_run["ws"]
    before = [(t.number, t.state, t.params, t.value) for t in study_run["study"].get_trials()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run_study(study_run["cfg"], **ws, progress=False)
    assert outcome.page is None and (outcome.n_complete, outcome.n_pruned, outcome.n_failed) == (2, 1, 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, sr.StudyPageWarning)]
    assert len(messages) == 1 and "disk full (injected)" in messages[0] and "pipeline report" in messages[0]
    stored = optuna.load_study(study_name="tiny", storage=open_storage(ws["storage"])).get_trials()
    assert [(t.number, t.state, t.params, t.value) for t in stored] == before
    assert (ws["reports_root"] / "tiny" / "index.html").read_bytes() == study_run["page_bytes"]


def load_study_text(folder):
    path = folder / "tiny.toml"
    path.write_text(TOML)
    return load_study(path)


def test_the_mcnemar_verdict_and_the_interval_shown_never_disagree_over_all_small_tables():
    """Exhaustive: p <= δ exactly when the interval excludes 0, and the interval holds the observed
    difference. Both depend on a table only through its discordant counts (b, c) and, as a scale,
    its size m, so every (b, c) with b + c <= 40 covers every table with up to 40 disagreements."""
    checked = 0
    for n_d in range(41):
        for a_only in range(n_d + 1):
            b_only = n_d - a_only
            m = n_d + 7  # 7 concordant points; m only scales the difference
            table = np.array([[3, a_only], [b_only, 4]])
            p = mcnemar(table, exact=True).pvalue
            for confidence in (0.9, 0.95, 0.99):
                low, high = compare.exact_difference_interval(table, confidence)
                assert low <= (a_only - b_only) / m <= high
                assert (p <= 1 - confidence) == (high < 0 or low > 0), (table.tolist(), confidence)
                checked += 1
    assert checked == 3 * sum(n + 1 for n in range(41))


def test_fagerlands_disagreeing_example_now_agrees():
    """Newcombe's interval excludes 0 at 95 % where the exact p is 0.0525 (NOTES.md); the interval
    that inverts the exact test does not, and the verdict follows."""
    table = np.array([[59, 6], [16, 80]])
    assert mcnemar(table, exact=True).pvalue == pytest.approx(0.0525, abs=5e-4)
    newcombe = compare.paired_difference_interval(table, 0.95)
    assert newcombe[1] < 0  # the old pairing: "excludes 0" next to p > 0.05
    low, high = compare.exact_difference_interval(table, 0.95)
    assert low < 0 < high
    a = np.repeat([1, 1, 0, 0], table.ravel())
    b = np.repeat([1, 0, 1, 0], table.ravel())
    assert compare.compare_paired(a, b, 0.95).verdict == "indistinguishable at this test size"
