"""The one selection rule, on constructed ties. Oracle: the rule written out by hand."""

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline.storage import ranked_trials


def _study(rows, direction="maximize"):
    study = optuna.create_study(direction=direction)
    dist = {"lr": FloatDistribution(1e-3, 1.0)}
    for value, val_loss in rows:
        attrs = {} if val_loss is None else {"val_loss": val_loss}
        study.add_trial(create_trial(value=value, params={"lr": 0.1}, distributions=dist, user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.1}, distributions=dist))
    return study


def test_ties_go_to_the_lower_validation_loss_then_the_earlier_trial():
    study = _study(
        [(0.80, 0.50), (0.85, 0.40), (0.85, 0.30), (0.85 + 1e-13, 0.35), (0.85, 0.30), (0.84, 0.1)]
    )
    order = [t.number for t in ranked_trials(study)]
    # 1, 2, 3, 4 tie (within 1e-12); by val_loss: 2 and 4 (0.30, earlier first), 3 (0.35), 1 (0.40)
    assert order == [2, 4, 3, 1, 5, 0]
    assert study.best_trial.number == 3  # Optuna's own pick: the tiny float edge, not the rule


def test_minimize_and_missing_losses():
    study = _study([(0.5, None), (0.2, 0.9), (0.2, None), (0.2, 0.1)], direction="minimize")
    assert [t.number for t in ranked_trials(study)] == [3, 1, 2, 0]  # no recorded loss ranks last
    assert ranked_trials(_study([])) == []


def test_the_parent_run_and_the_outcome_follow_the_rule_not_best_trial(tmp_path):
    """The study's MLflow parent run gets the rule's pick (Optuna's best_trial would differ here)."""
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.study.run import _best, _finish_parent

    study = _study([(0.85, 0.40), (0.85, 0.30)])
    assert study.best_trial.number == 0
    assert _best(study).number == 1
    mlflow = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(mlflow, "ties", "")
    parent = tracking.study_run(mlflow, exp, "ties", {}, params={})
    _finish_parent(mlflow, parent, study, "FINISHED")
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(parent).data.metrics
    assert metrics["best_trial_number"] == 1


def test_the_last_line_names_the_selected_trial_and_its_seed_spread():
    import statistics
    from pathlib import Path

    from pipeline.study.run import StudyOutcome

    one = StudyOutcome("s", 3, 0, 0, 2, 0.875, Path("r"), "p", "val_acc", best_seeds=(0.875,))
    assert one.selected_line == "selected trial 2: val_acc = 0.8750"
    seeds = (0.86, 0.88, 0.89)
    three = StudyOutcome("s", 3, 0, 0, 2, statistics.mean(seeds), Path("r"), "p", "val_acc", best_seeds=seeds)
    assert three.selected_line == (
        f"selected trial 2: val_acc = {statistics.mean(seeds):.4f} "
        f"(mean of 3 seeds, sd {statistics.stdev(seeds):.4f})"
    )
    assert StudyOutcome("s", 0, 0, 1, None, None, Path("r"), "p").selected_line is None
