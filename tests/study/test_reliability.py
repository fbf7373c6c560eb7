"""Faults: kill -9 and SIGTERM/Ctrl-C mid-trial, pruning, bad input, unwritable outputs, secrets.

Oracles: Optuna's storage (states, params, retry links), MLflow's store (run statuses, metric
histories), the files on disk, the process exit status, and ``torch.load``'s refusal.
A killed worker is a real ``python -m pipeline worker`` process; the rerun that heals the study
runs in this process (``run_study``, what the worker command calls).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import io
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline import cli
from pipeline.model import WeightsError, build_mlp, load_weights
from pipeline.storage import StudyError, open_storage, redact
from pipeline.study.run import open_study, run_study
from tests.conftest import tiny_study
from tests.study.test_workers import (
    FASHION,
    fast_study,
    load,
    mid_trial,
    postgres,  # noqa: F401 - the module-scoped server fixture
    start_worker,
    trial_runs,
    wait_for,
    worker_env,
    write_fashion,
    write_study,
)

pytestmark = pytest.mark.reliability
LONG = 2000  # epochs: a few seconds a trial, so a worker can be caught mid-trial and killed
# (the study's budget is part of its signature: every run of one study must train the same epochs)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """cwd, tracking store and (by default) journal storage under tmp_path, for workers and this process."""
    monkeypatch.chdir(tmp_path)
    spec = str(tmp_path / "storage" / "tiny.journal")
    values = worker_env(tmp_path, spec, PIPELINE_HEARTBEAT_SECONDS="1")
    for key in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "PIPELINE_HEARTBEAT_SECONDS"):
        monkeypatch.setenv(key, values[key])
    # the study page is tested elsewhere; here it would only add seconds to every in-process run
    monkeypatch.setattr("pipeline.study.run.write_after_study", lambda *a, **k: None)
    return values


def _use_storage(env, monkeypatch, spec: str) -> None:
    env["OPTUNA_STORAGE"] = spec
    monkeypatch.setenv("OPTUNA_STORAGE", spec)


# ----------------------------------------------------------------------------------------------
# kill -9


def _kill_9_mid_trial_then_heal(tmp_path, env) -> None:
    spec, uri = env["OPTUNA_STORAGE"], env["MLFLOW_TRACKING_URI"]
    storage = open_storage(spec)
    write_study(tmp_path, trials=2, dataset=dict(FASHION), training__epochs=LONG)
    # one trial completed before the crash
    run_study(fast_study(trials=1, training__epochs=LONG), progress=False)
    done = load(spec, storage=storage).trials[0]
    assert done.state == TrialState.COMPLETE

    proc = start_worker(tmp_path, env, "--index", "1", log="killed.log")
    wait_for("a trial mid-way", mid_trial(spec, storage), [(proc, tmp_path / "killed.log")])
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    zombie = load(spec, storage=storage).trials[1]
    assert zombie.state == TrialState.RUNNING  # killed mid-trial: nobody told Optuna
    runs, _, _ = trial_runs(uri)
    assert {r.data.tags["optuna_trial"]: r.info.status for r in runs}["1"] == "RUNNING"

    outcome = run_study(fast_study(trials=2, training__epochs=LONG), progress=False)  # another worker
    assert (outcome.n_complete + outcome.n_pruned, outcome.n_failed) == (2, 1)
    trials = load(spec, storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert (trials[0].params, trials[0].value, trials[0].datetime_complete) == (
        done.params,
        done.value,
        done.datetime_complete,
    )
    retry = trials[2]
    assert retry.params == zombie.params and retry.system_attrs["failed_trial"] == 1
    runs, parents, in_default = trial_runs(uri)
    status = {r.data.tags["optuna_trial"]: r.info.status for r in runs}
    assert status == {"0": "FINISHED", "1": "KILLED", "2": "FINISHED"}  # one run per attempt
    assert parents[0].info.status == "FINISHED" and in_default == []


def test_kill_9_mid_trial_on_the_journal_file(tmp_path, env):
    _kill_9_mid_trial_then_heal(tmp_path, env)


def test_kill_9_mid_trial_on_postgresql(tmp_path, env, monkeypatch, postgres):  # noqa: F811
    _use_storage(env, monkeypatch, postgres.create_database("kill9"))
    _kill_9_mid_trial_then_heal(tmp_path, env)  # heartbeat every 1 s, stale after 3 s


# ----------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C


@pytest.mark.parametrize(
    ("signum", "code", "name", "inherited"),
    [
        (signal.SIGTERM, 143, "SIGTERM", signal.SIG_DFL),
        (signal.SIGINT, 130, "Ctrl-C", signal.SIG_DFL),
        (signal.SIGINT, 130, "Ctrl-C", signal.SIG_IGN),  # a background job of a non-interactive shell
    ],
    ids=["SIGTERM", "Ctrl-C", "Ctrl-C-inherited-ignored"],
)
def test_signal_fails_the_trial_closes_its_run_and_a_rerun_resumes(
    tmp_path, env, signum, code, name, inherited
):
    spec, uri = env["OPTUNA_STORAGE"], env["MLFLOW_TRACKING_URI"]
    storage = open_storage(spec)
    write_study(tmp_path, trials=1, dataset=dict(FASHION), training__epochs=LONG)
    proc = start_worker(tmp_path, env, "--index", "1", log="worker.log", sigint=inherited)
    wait_for("a trial mid-way", mid_trial(spec, storage), [(proc, tmp_path / "worker.log")])
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    log = (tmp_path / "worker.log").read_text()
    assert f"stopped by {name}: trial 0 was marked FAIL and queued again" in log
    assert ("SIGINT was ignored when this process started" in log) == (inherited == signal.SIG_IGN)
    assert "Traceback" not in log  # one line for the stopped trial, not Optuna's traceback

    stopped, queued = load(spec, storage=storage).trials
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["reason"] == f"stopped by {name}"
    assert queued.state == TrialState.WAITING and queued.params == stopped.params
    runs, parents, _ = trial_runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]  # closed by the worker itself
    assert parents[0].info.status == "FAILED"

    outcome = run_study(fast_study(trials=1, training__epochs=LONG), progress=False)
    assert (outcome.n_complete, outcome.n_failed) == (1, 1)
    resumed = load(spec, storage=storage).trials[1]
    assert resumed.state == TrialState.COMPLETE and resumed.params == stopped.params
    runs, parents, _ = trial_runs(uri)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert parents[0].info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------
# Pruning


@pytest.mark.parametrize("kind", ["median", "hyperband"])
def test_pruner_prunes_a_hopeless_trial_and_keeps_its_partial_curve(env, kind):
    cfg = tiny_study(
        trials=4,
        training__epochs=6,
        pruner__kind=kind,
        pruner__warmup_epochs=2,
        search__lr={"choices": [0.3, 0.1, 1e-4]},
        search__momentum={"value": 0.9},
    )
    study = open_study(cfg, env["OPTUNA_STORAGE"])
    for lr in (0.3, 0.1, 0.3, 1e-4):  # three good trials set the bar, then a hopeless one
        study.enqueue_trial({"lr": lr, "momentum": 0.9})
    outcome = run_study(cfg, progress=False)
    assert (outcome.n_complete, outcome.n_pruned) == (3, 1)

    hopeless = load(env["OPTUNA_STORAGE"]).trials[3]
    assert hopeless.params["lr"] == 1e-4 and hopeless.state == TrialState.PRUNED
    epochs = hopeless.user_attrs["epochs_run"]
    assert (
        1 <= epochs < 6 and hopeless.user_attrs["reason"] == f"pruned by {kind} pruner after epoch {epochs}"
    )
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(hopeless.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "PRUNED"
    curve = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in curve) == list(range(1, epochs + 1))
    assert {m.step: m.value for m in curve} == pytest.approx(hopeless.intermediate_values)


# ----------------------------------------------------------------------------------------------
# Bad input: refused before any trial, nothing half-written


def test_a_name_that_escapes_reports_is_refused(env, tmp_path):
    bad = dataclasses.replace(tiny_study(), name="../escaped")  # past the config's own check
    with pytest.raises(StudyError, match="outside reports/"):
        run_study(bad, progress=False)
    assert not (tmp_path.parent / "escaped").exists()
    assert not (tmp_path / "storage").exists()


def test_an_unreachable_database_is_one_clear_error_without_the_password(env, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://pipeline:hunter2@127.0.0.1:{port}/study"
    write_study(tmp_path)
    assert cli.main(["study", "study.toml", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: cannot open Optuna storage postgresql+psycopg://pipeline:***@127.0.0.1:{port}"
    )
    assert "hunter2" not in err and "Traceback" not in err
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    assert not [p for p in (tmp_path / "reports").rglob("*") if p.is_file()]


@contextlib.contextmanager
def _fail_writes_under(root: Path, code: int, when=lambda path: True):
    """Fault injection at the OS boundary: creating files or folders under ``root`` fails with ``code``.

    Covers ``os.open``/``os.mkdir`` (tempfile, pathlib) and ``open`` in a writing mode: a read-only
    or full file system, which root (who runs CI) cannot get from ``chmod``.
    """
    root = str(root.resolve())

    def hit(path) -> bool:
        text = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return text.startswith(root) and when(text)

    def guard(real, writes=lambda *a, **k: True):
        def wrapper(path, *args, **kwargs):
            if hit(path) and writes(*args, **kwargs):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real(path, *args, **kwargs)

        return wrapper

    def open_writes(mode="r", *args, **kwargs) -> bool:
        return any(c in mode for c in "wax+")

    def os_open_writes(flags, *args, **kwargs) -> bool:
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "mkdir", guard(os.mkdir))
        patch.setattr(os, "open", guard(os.open, os_open_writes))
        patch.setattr(builtins, "open", guard(builtins.open, open_writes))
        patch.setattr(io, "open", guard(io.open, open_writes))
        yield


@pytest.mark.parametrize(
    ("folder", "code", "what"),
    [
        ("reports", errno.EROFS, "reports folder"),
        ("mlruns", errno.EROFS, "MLflow store folder"),
        ("storage", errno.EACCES, "Optuna journal folder"),
    ],
)
def test_an_unwritable_output_folder_stops_before_any_trial(env, tmp_path, folder, code, what):
    # the folder exists and refuses writes (nothing is created before the checks, so a folder that
    # does not exist yet is checked where it would be created: in the folder above it)
    (tmp_path / folder).mkdir(exist_ok=True)
    with _fail_writes_under(tmp_path / folder, code), pytest.raises(StudyError) as caught:
        run_study(tiny_study(), progress=False)
    message = str(caught.value)
    assert message.startswith(what) and os.strerror(code) in message and "no trial was run" in message
    assert not (tmp_path / "storage" / "tiny.journal").exists()
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_a_full_disk_mid_study_stops_with_one_error_and_keeps_finished_trials(env, tmp_path):
    spec, uri = env["OPTUNA_STORAGE"], env["MLFLOW_TRACKING_URI"]
    reports = tmp_path / "reports" / "tiny"
    write_fashion(tmp_path)
    full = _fail_writes_under(reports, errno.ENOSPC, when=lambda p: "trial-0001" in p)
    with full, pytest.raises(StudyError) as caught:
        run_study(fast_study(trials=2), progress=False)
    message = str(caught.value)
    assert message.startswith("trial 1: cannot write ") and "No space left on device" in message
    assert "Free some space, then run the same command again" in message

    first, full, queued = load(spec).trials
    assert first.state == TrialState.COMPLETE and (reports / "trial-0000" / "report.html").exists()
    assert full.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert not list(reports.glob("*trial-0001*"))  # no half-written report folder
    runs, _, _ = trial_runs(uri)
    assert {r.data.tags["optuna_trial"]: r.info.status for r in runs} == {"0": "FINISHED", "1": "FAILED"}

    run_study(fast_study(trials=2), progress=False)  # space freed: the rerun resumes
    trials = load(spec).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == full.params and (reports / "trial-0002" / "report.html").exists()


# ----------------------------------------------------------------------------------------------
# Security


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://u:s3cret@db.example:5432/optuna",
            "postgresql+psycopg://u:***@db.example:5432/optuna",
        ),
        ("postgresql+psycopg://u:p%40ss@db/optuna", "postgresql+psycopg://u:***@db/optuna"),
        ("postgresql+psycopg://u@db/optuna?password=s3cret", "postgresql+psycopg://u@db/optuna?password=***"),
        ("postgresql+psycopg://u:a@b@db/optuna", "postgresql+psycopg://u:***@db/optuna"),  # unencoded @
        (
            "postgresql+psycopg://u:a/b@db/x?sslmode=require",
            "postgresql+psycopg://u:***@db/x?sslmode=require",
        ),
        ("postgresql+psycopg://db/optuna", "postgresql+psycopg://db/optuna"),
        ("sqlite:///storage/x.db", "sqlite:///storage/x.db"),
        ("storage/x.journal", "storage/x.journal"),
    ],
)
def test_database_passwords_are_redacted(url, shown):
    assert redact(url) == shown


def test_load_weights_reads_a_state_dict_and_refuses_a_pickle_that_runs_code(tmp_path):
    model = build_mlp(2, (8,), "tanh", seed=0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = build_mlp(2, (8,), "tanh", seed=1)
    state = load_weights(tmp_path / "model.pt", other)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value) and torch.equal(other.state_dict()[key], value)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused"):
        load_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_mlflow_ui_and_server_commands_bind_to_localhost():
    """Every ``mlflow ui``/``mlflow server`` command in the Makefile and the README's code blocks."""
    root = Path(__file__).resolve().parents[2]
    recipes = [line for line in (root / "Makefile").read_text().splitlines() if line.startswith("\t")]
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (root / "README.md").read_text(), re.S | re.M)
    lines = recipes + [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if re.search(r"(^|[\s/])mlflow (ui|server)\b", line.split("#")[0])]
    assert commands
    for line in commands:
        host = re.search(r"--host\s+(\S+)", line)
        assert host and host.group(1) == "127.0.0.1", line
