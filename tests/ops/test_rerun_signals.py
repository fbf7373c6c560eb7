"""A real SIGTERM to a real ``pipeline rerun``: first mid-trial, then mid-retrain.

The monkeypatched test in test_rerun.py shows the policy's logic; this one sends the signal to the
process, as systemd or a cron wrapper would. Oracles: the exit status, Optuna's storage (states,
reasons, params of the queued trial), MLflow's store (run statuses) and the rerun history file.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.ops.rerun import HISTORY_FILE, LOG_FILE
from pipeline.storage import open_storage
from tests.study.test_workers import FASHION, load, mid_trial, trial_runs, wait_for, worker_env, write_study

pytestmark = pytest.mark.reliability
EPOCHS = 1000  # seconds a trial (and a retrain): the signal surely lands while they train
SEEDS = 10  # retrain replicates, trained together: about 5 s on a busy 2-core machine


def start_rerun(folder: Path, env: dict[str, str], log: str) -> subprocess.Popen:
    """``python -m pipeline rerun study.toml`` in ``folder``, output to ``log``, SIGINT at its default
    action whatever this process inherited (a background job of a non-interactive shell ignores it)."""
    with open(folder / log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "rerun", "study.toml"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def test_sigterm_mid_trial_then_mid_retrain_exits_143_and_keeps_the_study_resumable(tmp_path):
    spec = str(tmp_path / "storage" / "tiny.journal")
    env = worker_env(tmp_path, spec)
    storage = open_storage(spec)
    write_study(tmp_path, trials=1, dataset=dict(FASHION), training__epochs=EPOCHS, rerun__seeds=SEEDS)
    history = tmp_path / "reports" / "tiny" / HISTORY_FILE

    # (1) mid-trial: the trial is FAIL with the signal as its reason, and queued again
    proc = start_rerun(tmp_path, env, "first.log")
    wait_for("a trial mid-way", mid_trial(spec, storage), [(proc, tmp_path / "first.log")])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    out = (tmp_path / "first.log").read_text()
    assert "stopped by SIGTERM: trial 0 was marked FAIL and queued again" in out and "Traceback" not in out
    stopped, queued = load(spec, storage=storage).trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "stopped by SIGTERM"
    assert queued.state == TrialState.WAITING and queued.params == stopped.params
    runs, parents, _ = trial_runs(env["MLFLOW_TRACKING_URI"])
    assert [r.info.status for r in runs] == ["FAILED"] and [p.info.status for p in parents] == ["FAILED"]
    assert not history.exists()

    # (2) the next rerun resumes the queued trial; stopped while it retrains, it adds no record
    proc = start_rerun(tmp_path, env, "second.log")
    log = tmp_path / "reports" / "tiny" / LOG_FILE

    def retraining() -> bool:  # the study stage has ended: its summary line is in rerun.log
        return log.exists() and re.search(r"study: \d+ complete", log.read_text()) is not None

    wait_for("the retrain stage", retraining, [(proc, tmp_path / "second.log")])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    out = (tmp_path / "second.log").read_text()
    assert "stopped by SIGTERM: run the same command to resume" in out and "Traceback" not in out
    assert "test error" not in log.read_text()  # stopped while the replicates trained
    assert not history.exists()  # no record was appended
    trials = load(spec, storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # the study is kept
    assert trials[1].params == stopped.params
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tiny")
    reruns = client.search_runs([exp.experiment_id], filter_string="tags.rerun = 'true'")
    assert [r.info.status for r in reruns] in ([], ["FAILED"])  # closed, if it was opened
