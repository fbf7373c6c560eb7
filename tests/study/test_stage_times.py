"""Where a trial's time goes: every trial's stage times in MLflow, in Optuna and on the study page.

Oracles: the MLflow store (the trial runs' metrics), the Optuna storage (user attributes) and the
trial's own wall clock (``time_trial_s``, measured around the whole trial) that the stages must
account for.
"""

import json

import numpy as np
import optuna
from mlflow import MlflowClient

from pipeline.storage import open_storage
from pipeline.study.trial import STAGES
from tests.conftest import tiny_study

KEYS = [f"time_{stage}_s" for stage in STAGES]


def test_every_trial_logs_its_stage_times_and_they_add_up_to_its_wall_time(workspace):
    workspace.run(tiny_study(training__seeds=2))
    client = MlflowClient(workspace["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pipeline_role") == "trial"]
    assert len(runs) == 2
    for run in runs:
        metrics = run.data.metrics
        assert set(KEYS) | {"time_trial_s"} <= metrics.keys()
        assert all(metrics[key] >= 0 for key in KEYS)
        assert metrics["time_train_s"] > 0 and metrics["time_bounds_s"] > 0 and metrics["time_report_s"] > 0
        total = sum(metrics[key] for key in KEYS)
        assert abs(total - metrics["time_trial_s"]) <= 0.1 * metrics["time_trial_s"], metrics

    study = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"]))
    by_run = {r.info.run_id: r.data.metrics for r in runs}
    for trial in study.trials:
        for key in [*KEYS, "time_trial_s"]:
            assert trial.user_attrs[key] == by_run[trial.user_attrs["mlflow_run_id"]][key]
        # an outside clock: Optuna's start and completion stamps bound the trial's own wall time
        outside = (trial.datetime_complete - trial.datetime_start).total_seconds()
        assert trial.user_attrs["time_trial_s"] <= outside + 0.01

        # the trial's metrics.json holds the stages done when it was written, to the same numbers
        folder = workspace["reports_root"] / "tiny" / f"trial-{trial.number:04d}"
        timings = json.loads((folder / "metrics.json").read_text())["timings"]
        assert timings == {
            key: trial.user_attrs[key] for key in ("time_train_s", "time_evaluate_s", "time_bounds_s")
        }

    page = (workspace["reports_root"] / "tiny" / "index.html").read_text()
    assert "<h2>Where a trial’s time goes</h2>" in page
    median = float(np.median([t.user_attrs["time_trial_s"] for t in study.trials]))
    assert f"<td>time_trial_s</td><td>{median:.4g}</td><td>100 %</td>" in page


def test_a_population_trial_logs_its_share(workspace):
    """Trained together, a trial's training time is its set's wall time in the batched run and its
    trial time the sum of its own stages."""
    workspace.run(tiny_study(training__population=2))
    study = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"]))
    for trial in study.trials:
        attrs = trial.user_attrs
        assert all(attrs[key] >= 0 for key in KEYS)
        assert attrs["time_trial_s"] == sum(attrs[key] for key in KEYS)
