"""End to end on the synthetic ground truth: Optuna trials as nested MLflow runs with reports.

Oracles: Optuna's storage (trial counts, params), MLflow's store (runs, params, metric histories,
artifacts), and the files on disk.
"""

import json

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from scipy import stats

from pipeline.storage import StudyError, open_storage, storage_spec
from tests.conftest import tiny_study


def _run(cfg, ws, **kw):
    return ws.run(cfg, **kw)


def _study(ws, name="tiny"):
    return optuna.load_study(study_name=name, storage=open_storage(ws["storage"]))


def test_smoke_study_runs_every_stage_and_tracks_it(workspace):
    cfg = tiny_study()
    outcome = _run(cfg, workspace)
    assert (outcome.n_complete, outcome.n_pruned, outcome.n_failed) == (2, 0, 0)

    client = MlflowClient(workspace["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline_role") == "study"]
    children = [r for r in runs if r.data.tags.get("pipeline_role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] == 2
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        for key in ("lr", "momentum", "weight_decay", "training.epochs", "model.hidden"):
            assert key in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == [1, 2, 3]
        for key in (
            "val_acc",
            "test_acc",
            "test_error",
            "trial_number",
            "test_error_clopper_pearson_low",
            "coverage_hoeffding",
        ):
            assert key in run.data.metrics
        assert run.data.metrics["test_error"] == pytest.approx(1 - run.data.metrics["test_acc"])
        for key in ("git_commit", "config_hash", "split_hash", "torch", "optuna_trial"):
            assert key in run.data.tags
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "report.html",
            "confusion_matrix.png",
            "curves.png",
            "metrics.json",
            "model.pt",
            "bounds.png",
        } <= artifacts
    # Optuna and MLflow agree on each trial's parameters
    study = _study(workspace)
    by_number = {int(r.data.tags["optuna_trial"]): r for r in children}
    for trial in study.trials:
        run = by_number[trial.number]
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert trial.value == pytest.approx(run.data.metrics["val_acc"])
    # the report folder is complete and its numbers match the tracked ones
    folder = workspace["reports_root"] / "tiny" / "trial-0000"
    assert {"report.html", "curves.png", "confusion_matrix.png", "metrics.json", "bounds.png"} <= {
        p.name for p in folder.iterdir()
    }
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["test_error"] == pytest.approx(by_number[0].data.metrics["test_error"])
    assert sum(map(sum, summary["confusion_matrix"])) == 300
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # the ground truth's exact coverage in metrics.json, against an independent pmf sum (scipy)
    truth = summary["ground_truth"]
    R, m = truth["true_error"], 300
    k = np.arange(m + 1)
    covered = {r["method"]: r for r in truth["coverage"]}
    low, high = stats.beta.ppf(0.05, k, m - k + 1), stats.beta.ppf(0.95, k + 1, m - k)
    low, high = np.where(k == 0, 0.0, low), np.where(k == m, 1.0, high)
    oracle = stats.binom.pmf(k, m, R)[(low <= R) & (high >= R)].sum()
    assert covered["clopper_pearson"]["exact_coverage"] == pytest.approx(oracle, abs=1e-9)
    eps = np.sqrt(np.log(2 / 0.1) / (2 * m))
    oracle = stats.binom.pmf(k, m, R)[np.abs(k / m - R) <= eps].sum()
    assert covered["hoeffding"]["exact_coverage"] == pytest.approx(oracle, abs=1e-9)
    assert covered["clopper_pearson"]["coverage"] is not None  # the simulated check sits beside it
    assert "exact coverage" in (folder / "report.html").read_text().lower()


def test_resume_keeps_finished_trials_and_caps_the_total(workspace):
    first = tiny_study()
    _run(first, workspace)
    before = {t.number: (t.params, t.value) for t in _study(workspace).trials}
    _run(first.with_overrides(trials=4), workspace)
    trials = _study(workspace).trials
    assert len(trials) == 4
    assert {t.number: (t.params, t.value) for t in trials if t.number < 2} == before
    # running again with the same total adds nothing
    _run(first.with_overrides(trials=4), workspace)
    assert len(_study(workspace).trials) == 4
    # one parent run per study, reused on resume
    client = MlflowClient(workspace["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get("pipeline_role") == "study" for r in runs) == 1
    assert sum(r.data.tags.get("pipeline_role") == "trial" for r in runs) == 4
    assert client.get_experiment_by_name("Default") is None or not client.search_runs(
        [client.get_experiment_by_name("Default").experiment_id]
    )


def test_resume_refuses_a_changed_search_space(workspace):
    _run(tiny_study(trials=1), workspace)
    changed = tiny_study(trials=2, search__momentum={"choices": [0.0, 0.5]})
    with pytest.raises(StudyError, match="search space"):
        _run(changed, workspace)
    assert len(_study(workspace).trials) == 1


def test_resume_refuses_a_changed_direction(workspace):
    _run(tiny_study(trials=1), workspace)
    with pytest.raises(StudyError, match="maximize"):
        _run(tiny_study(trials=2, objective="val_loss"), workspace)


def test_divergence_is_pruned_with_a_reason_and_the_study_goes_on(workspace):
    cfg = tiny_study(
        trials=2,
        search__lr={"choices": [1e6, 0.05]},
        sampler__kind="grid",
        model__activation="relu",
        search__momentum={"value": 0.0},
    )
    outcome = _run(cfg, workspace)
    study = _study(workspace)
    states = {t.params["lr"]: t for t in study.trials}
    assert states[1e6].state == optuna.trial.TrialState.PRUNED
    assert "non-finite loss at epoch" in states[1e6].user_attrs["reason"]
    assert states[0.05].state == optuna.trial.TrialState.COMPLETE
    assert (outcome.n_complete, outcome.n_pruned) == (1, 1)


def test_default_storage_is_a_journal_file_per_study(monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert storage_spec(tiny_study()) == "storage/tiny.journal"
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg://u:secret@h/db")
    assert storage_spec(tiny_study()).startswith("postgresql")


def test_mlflow_sees_a_model_experiment_its_description_the_data_and_lean_trial_runs(workspace):
    from mlflow import MlflowClient

    from pipeline.study.trial import COMPARED

    cfg = tiny_study(trials=2, description="Pullover vs Coat, <b>first look</b>")
    workspace.run(cfg)
    client = MlflowClient(workspace["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table, not GenAI
    assert exp.tags["mlflow.note.content"] == cfg.description
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags["pipeline_role"] == "study")
    trials = [r for r in runs if r.data.tags["pipeline_role"] == "trial"]
    assert len(parent.data.params) > 25  # the whole configuration lives on the parent run
    for run in trials:
        assert set(run.data.params) == set(cfg.search) | set(COMPARED)
        assert len(run.data.params) == len(cfg.search) + len(COMPARED) < 15
        assert run.data.tags["config_hash"] == cfg.config_hash()
    split_hash = parent.data.tags["split_hash"]
    for run in [parent, *trials]:
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [
            ("gmm:class 0-vs-class 1", split_hash[:36])
        ]
