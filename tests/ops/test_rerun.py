"""Scheduled reruns: the lock, idempotence, drift and exit codes.

Oracles: Optuna's storage (trial counts, the best trial), MLflow's store (the rerun runs' tags,
metrics and status), scipy's exact binomial interval, numpy statistics, the kernel (a SIGKILLed
lock holder), and the selected trial itself: retrained with the study's own training seed, the
rerun must reproduce the trial's test error exactly.
"""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from scipy import stats

from pipeline import cli
from pipeline.config import ConfigError
from pipeline.ops import drift, rerun
from pipeline.ops.rerun import (
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    HISTORY_FILE,
    RerunLocked,
    detect_drift,
    run_rerun,
    study_lock,
)
from pipeline.ops.schedule import cron_line, parse_cron, rerun_command
from pipeline.report.reruns import rerun_section_html
from pipeline.storage import open_storage
from tests.conftest import TINY, tiny_study

DAY1 = dt.datetime(2026, 11, 1, 3, 0, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 11, 2, 3, 0, tzinfo=dt.UTC)


def _rerun(cfg, ws, **kw):
    return run_rerun(
        cfg,
        storage=ws["storage"],
        tracking_uri=ws["tracking_uri"],
        reports_root=ws["reports_root"],
        progress=False,
        **kw,
    )


def _trials(ws, name="tiny"):
    return optuna.load_study(study_name=name, storage=open_storage(ws["storage"])).trials


def _history(ws, name="tiny"):
    return json.loads((ws["reports_root"] / name / HISTORY_FILE).read_text())["reruns"]


def _rerun_runs(ws, name="tiny"):
    client = MlflowClient(ws["tracking_uri"])
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.rerun = 'true'")


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_tiny_toml(path: Path, **tables) -> Path:
    """The conftest's tiny study as a TOML file, with whole tables added or replaced."""
    raw = {**TINY, **tables}
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for table, values in raw.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(ws, *args):
    return cli.main(["rerun", *args, "--storage", ws["storage"], "--tracking-uri", ws["tracking_uri"]])


@pytest.fixture
def project(workspace, monkeypatch):
    """The workspace as the current folder (the command line writes reports/ there), with a study file."""
    (workspace["root"] / "mlruns").mkdir(exist_ok=True)
    monkeypatch.chdir(workspace["root"])
    write_tiny_toml(workspace["root"] / "tiny.toml", trials=1, rerun={"seeds": 2})
    return workspace


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_twice_reproduces_the_selection_adds_a_record_and_no_trials(workspace):
    (workspace["root"] / "mlruns").mkdir()
    # first_seed = 0 is the study's own training seed: seed 0 must reproduce the trial exactly
    cfg = tiny_study(trials=1, rerun={"seeds": 3, "first_seed": 0})
    first = _rerun(cfg, workspace, now=DAY1)
    assert len(_trials(workspace)) == 1
    best = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"])).best_trial
    rec = first.record
    assert rec["selected_trial"] == best.number and rec["selected_params"] == best.params
    assert rec["seeds"] == [0, 1, 2] and rec["new_trials"] == 1
    assert rec["test_errors"][0] == best.user_attrs["test_error"]  # the trial, retrained
    assert rec["selected_test_error_clopper_pearson"] == [
        best.user_attrs["test_error_clopper_pearson_low"],
        best.user_attrs["test_error_clopper_pearson_high"],
    ]
    errors = np.array(rec["test_errors"])
    assert rec["test_error_mean"] == pytest.approx(errors.mean())
    assert rec["test_error_std"] == pytest.approx(errors.std(ddof=1))
    assert (rec["test_error_min"], rec["test_error_max"]) == (errors.min(), errors.max())
    m = rec["test_m"]
    assert m == 300
    k = round(np.mean([round(e * m) for e in errors]))
    ci = stats.binomtest(k, m).proportion_ci(0.9, method="exact")
    assert rec["test_error_clopper_pearson"] == pytest.approx([ci.low, ci.high])
    assert first.drift.compared_with is None and not first.drift.detected

    second = _rerun(cfg, workspace, now=DAY2)
    assert len(_trials(workspace)) == 1  # no duplicate trials
    history = _history(workspace)
    assert [r["date"] for r in history] == [DAY1.isoformat(), DAY2.isoformat()]
    assert second.record["test_errors"] == rec["test_errors"]  # fixed seeds: the same numbers
    assert second.record["new_trials"] == 0
    assert second.drift.compared_with == DAY1.isoformat()
    assert not second.drift.detected and second.drift.changes == ()

    client, runs = _rerun_runs(workspace)
    assert len(runs) == 2
    by_id = {r.info.run_id: r for r in runs}
    run = by_id[second.run_id]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_error_mean"] == pytest.approx(second.record["test_error_mean"])
    assert run.data.metrics["drift"] == 0.0 and run.data.tags["drift"] == "false"
    for key in ("git_commit", "torch", "optuna", "split_hash", "config_hash", "rerun_date"):
        assert key in run.data.tags
    assert run.data.tags["selected_trial"] == str(best.number)
    assert sorted(m.step for m in client.get_metric_history(second.run_id, "seed_test_error")) == [0, 1, 2]
    assert {"rerun.json", "reruns.png"} <= {a.path for a in client.list_artifacts(second.run_id)}
    # reruns are runs of their own: the study still has one parent run
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.pipeline_role = 'study'")
    assert len(parents) == 1

    folder = workspace["reports_root"] / "tiny"
    assert (folder / "reruns.png").stat().st_size > 0
    assert "no drift since" in (folder / "rerun.log").read_text()
    section = rerun_section_html(folder)
    assert section.count("<tr>") == 3 and "no drift" in section and "data:image/png" in section
    assert rerun_section_html(workspace["root"]) is None
    # the study page is refreshed after each rerun and carries the same section
    assert section in (folder / "index.html").read_text()

    # a raised trial target continues the study; the selection may move, and drift says so
    third = _rerun(tiny_study(trials=1, rerun={"seeds": 3, "first_seed": 0, "trials": 2}), workspace)
    assert len(_trials(workspace)) == 2 and third.record["new_trials"] == 1
    moved = third.record["selected_params"] != rec["selected_params"]
    assert third.drift.selection_changed == moved
    assert "trials_target: 1 → 2" in third.drift.changes


BASE = {
    "date": "2026-11-01T03:00:00+00:00",
    "selected_trial": 4,
    "selected_params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "confidence": 0.9,
    "test_error_mean": 0.200,
    "test_error_min": 0.190,
    "test_error_max": 0.210,
    "test_error_clopper_pearson": [0.180, 0.222],
    "seeds": [1, 2, 3, 4, 5],
    "trials_target": 8,
    "split_hash": "aaaa",
    "config_hash": "cccc",
    "provenance": {"git_commit": "abc", "torch": "2.14.1"},
}


@pytest.mark.parametrize(
    ("changes", "selection", "interval", "spread"),
    [
        ({}, False, False, False),  # nothing changed
        ({"test_error_mean": 0.205}, False, False, False),  # inside both
        ({"test_error_mean": 0.215}, False, False, True),  # inside the interval, outside the seeds' range
        ({"test_error_mean": 0.230}, False, True, True),  # outside the exact interval
        ({"test_error_mean": 0.170}, False, True, True),  # below it
        ({"test_error_mean": 0.222}, False, False, True),  # on the interval's edge counts as inside
        ({"selected_params": {"lr": 0.06, "momentum": 0.9, "weight_decay": 0.0}}, True, False, False),
        ({"selected_trial": 9}, False, False, False),  # another trial with the same params: same config
    ],
)
def test_drift_on_constructed_histories(changes, selection, interval, spread):
    current = {**BASE, "date": "2026-11-02T03:00:00+00:00", **changes}
    drift = detect_drift(BASE, current)
    assert (drift.selection_changed, drift.outside_interval, drift.outside_spread) == (
        selection,
        interval,
        spread,
    )
    assert drift.detected == (selection or interval or spread)
    assert len(drift.reasons) == selection + interval + spread
    assert drift.compared_with == BASE["date"]


def test_first_rerun_has_nothing_to_drift_from_and_provenance_changes_are_listed():
    assert not detect_drift(None, BASE).detected
    moved = {**BASE, "split_hash": "bbbb", "provenance": {"git_commit": "def", "torch": "2.14.1"}}
    drift = detect_drift(BASE, moved)
    assert not drift.detected  # a change alone is not drift: the numbers decide
    assert drift.changes == ("split_hash: aaaa → bbbb", "git_commit: abc → def")


def test_rerun_table_is_validated():
    assert tiny_study().rerun.seeds == 5 and tiny_study().rerun.first_seed == 1
    with pytest.raises(ConfigError, match=r"rerun\.seeds = 1: must be >= 2"):
        tiny_study(rerun={"seeds": 1})
    with pytest.raises(ConfigError, match=r"unknown key rerun\.seed;"):
        tiny_study(rerun={"seed": 3})
    with pytest.raises(ConfigError, match=r"rerun\.trials = -1"):
        tiny_study(rerun={"trials": -1})


# ----------------------------------------------------------------------------------------------
# Exit codes, through the command line


@pytest.mark.slow
def test_exit_codes_ok_drift_failed_bad_history(project, capsys, monkeypatch):
    assert _cli(project, "tiny.toml") == EXIT_OK
    assert "first rerun" in capsys.readouterr().out
    # make the previous record claim a different result: the same rerun now drifts
    path = project["reports_root"] / "tiny" / HISTORY_FILE
    data = json.loads(path.read_text())
    data["reruns"][-1].update(test_error_clopper_pearson=[0.9, 0.95], test_error_min=0.9, test_error_max=0.9)
    path.write_text(json.dumps(data))
    assert _cli(project, "tiny.toml") == EXIT_DRIFT
    out = capsys.readouterr().out
    assert "DRIFT" in out and "exact 90% interval [0.9000, 0.9500]" in out
    last = _history(project)[-1]
    assert last["drift"]["outside_interval"] and last["drift"]["outside_spread"]
    assert not last["drift"]["selection_changed"]
    _, runs = _rerun_runs(project)
    assert sorted(r.data.tags["drift"] for r in runs) == ["false", "true"]

    # a failure: exit 1, the traceback in rerun.log, the MLflow run FAILED, no record, lock released
    def boom(*args, **kwargs):
        raise RuntimeError("boom while retraining")

    with monkeypatch.context() as patch:
        patch.setattr(drift, "train", boom)
        assert _cli(project, "tiny.toml") == EXIT_FAILED
    assert "boom while retraining" in capsys.readouterr().err
    folder = project["reports_root"] / "tiny"
    log = (folder / "rerun.log").read_text()
    assert "RuntimeError: boom while retraining" in log and "Traceback" in log
    assert len(_history(project)) == 2
    _, runs = _rerun_runs(project)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]
    with study_lock(folder):
        pass

    # a history that is not one is bad input: exit 2, and nothing else is touched
    path.write_text("{not json")
    assert _cli(project, "tiny.toml") == EXIT_USAGE
    assert "not a rerun history" in capsys.readouterr().err
    assert len(_trials(project)) == 1 and len(_rerun_runs(project)[1]) == 3


def test_bad_study_file_is_exit_2(project, capsys):
    write_tiny_toml(project["root"] / "bad.toml", rerun={"seeds": 0})
    assert _cli(project, "bad.toml") == EXIT_USAGE
    assert "rerun.seeds = 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The lock


def _wait_for_lock(
    folder: Path, proc: subprocess.Popen, pid: int | None = None, timeout: float = 180
) -> None:
    """Poll until the lock file names ``pid`` (any pid if None): the holder has the lock by then."""
    lock = folder / rerun.LOCK_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = lock.read_text() if lock.exists() else ""
        if (f"pid {pid} " if pid else "pid ") in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("the holder never took the lock")


@pytest.mark.reliability
def test_lock_concurrent_reruns_and_a_killed_holder(project, capsys):
    """Two reruns at once: one runs, the other exits with the lock code at once. A holder killed
    with SIGKILL leaves the lock file but not the lock. The first rerun is started exactly as cron
    would start it: the command of the crontab line ``pipeline schedule`` installs.
    """
    root = project["root"]
    folder = root / "reports" / "tiny"
    options = {"storage": project["storage"], "tracking_uri": project["tracking_uri"]}
    line = cron_line(parse_cron("0 3 * * *"), "tiny", rerun_command(Path("tiny.toml"), options), root)
    command = line.split(" ", 5)[5].rsplit(" # pipeline-rerun:", 1)[0].replace("\\%", "%")
    first = subprocess.Popen(["/bin/sh", "-c", command], cwd="/", start_new_session=True)
    try:
        _wait_for_lock(folder, first)
        assert _cli(project, "tiny.toml") == EXIT_LOCKED
        assert "another rerun of this study is running (pid" in capsys.readouterr().err
        assert first.wait(timeout=600) == EXIT_OK
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert len(_history(project)) == 1  # only the first rerun did anything
    assert len(_trials(project)) == 1
    assert "first rerun" in (folder / "cron.log").read_text()
    assert "skipped: another rerun" in (folder / "rerun.log").read_text()

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom pipeline.ops.rerun import study_lock\n"
            "with study_lock(Path(sys.argv[1])):\n    time.sleep(600)\n",
            str(folder),
        ],
        cwd=Path(__file__).parents[2],
    )
    try:
        _wait_for_lock(folder, holder, holder.pid)
        with pytest.raises(RerunLocked, match=f"pid {holder.pid} "), study_lock(folder):
            pass
        assert _cli(project, "tiny.toml") == EXIT_LOCKED
        assert len(_history(project)) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    assert f"pid {holder.pid} " in (folder / rerun.LOCK_FILE).read_text()  # the file stays, the lock went
    capsys.readouterr()
    assert _cli(project, "tiny.toml") == EXIT_OK
    assert "no drift since" in capsys.readouterr().out
    assert len(_history(project)) == 2 and len(_trials(project)) == 1


def test_sigterm_during_a_rerun_fails_queues_and_explains_the_trial(project, monkeypatch, capsys):
    """The one signal policy under ``pipeline rerun``: FAIL, queued again, reason, exit 143."""
    from pipeline.signals import Terminated

    def stopped(*args, **kwargs):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr("pipeline.study.trial.train", stopped)
    assert _cli(project, "tiny.toml") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM: trial 0 was marked FAIL and queued again" in err
    failed, queued = _trials(project)
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["reason"] == "stopped by SIGTERM"
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == failed.params
    assert not (project["reports_root"] / "tiny" / HISTORY_FILE).exists()  # no record was added


def test_a_signal_while_the_study_page_is_written_still_stops_the_command(project, monkeypatch, capsys):
    from pipeline.signals import Terminated

    def stopped(*args, **kwargs):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr("pipeline.report.study_page.write_study_page", stopped)
    args = ["study", "tiny.toml", "--storage", project["storage"], "--tracking-uri", project["tracking_uri"]]
    assert cli.main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert [t.state for t in _trials(project)] == [optuna.trial.TrialState.COMPLETE]  # the trial is kept
