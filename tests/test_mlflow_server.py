"""The MLflow UI's view of a study: a real ``mlflow server`` on 127.0.0.1 over a small study's store.

Everything is read back through the server's REST API (``MlflowClient`` against its URL, plus the
artifact endpoints the UI itself calls). Oracles: Optuna's storage (params, per-epoch values,
counts) and the files the study wrote.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from pipeline.storage import open_storage
from tests.conftest import tiny_study

STARTUP_TIMEOUT = 120  # seconds for the server to answer /health (about 15 s on a busy 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a server's process group (started with ``start_new_session``), SIGKILL after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # only ever 127.0.0.1
        return response.read()


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, folder: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``mlflow server`` over ``tracking_uri`` on a free loopback port, logging to
    ``folder/server.log``; yields its URL once /health answers; its process group is stopped after."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(folder)}")
                try:
                    if _get(f"{url}/health").strip() == b"OK":
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not ready after {STARTUP_TIMEOUT} s:\n{_tail(folder)}")
                time.sleep(0.5)
            yield url
        finally:
            stop_group(proc)


def _tail(folder: Path) -> str:
    return (folder / "server.log").read_text()[-3000:]


@pytest.fixture
def server(workspace, monkeypatch):
    """A 2-trial study, then ``mlflow server`` over its store; the process group is killed after."""
    monkeypatch.setattr(
        "pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000
    )  # the true error is not checked here
    cfg = tiny_study(trials=2)
    workspace.run(cfg)
    with mlflow_server(workspace["tracking_uri"], workspace["root"]) as url:
        yield {"url": url, "cfg": cfg, **workspace}


@pytest.mark.slow
def test_the_ui_server_shows_the_study_as_optuna_stored_it(server):
    client = MlflowClient(server["url"])
    study = optuna.load_study(study_name="tiny", storage=open_storage(server["storage"]))
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline_role") == "study"]
    children = [r for r in runs if r.data.tags.get("pipeline_role") == "trial"]
    assert len(parents) == 1 and len(children) == len(study.trials) == 2
    parent = parents[0]
    assert parent.data.metrics["n_complete"] == 2 and parent.data.metrics["n_failed"] == 0
    assert parent.data.metrics["best_trial_number"] == study.best_trial.number

    by_number = {int(r.data.metrics["trial_number"]): r for r in children}
    assert sorted(by_number) == [t.number for t in study.trials]
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"trial-{trial.number:04d}"
        assert run.info.status == "FINISHED"
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert float(run.data.params["momentum"]) == trial.params["momentum"]
        assert run.data.params["training.epochs"] == "3"
        # the per-epoch curve the UI plots is the one Optuna saw
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report.html", "metrics.json", "test_predictions.json", "curves.png", "model.pt"} <= artifacts

    # ordering by a metric (what the UI's run table and Compare view do) finds Optuna's best trial
    ranked = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.pipeline_role = 'trial'",
        order_by=["metrics.val_acc DESC", "metrics.trial_number ASC"],
    )
    assert int(ranked[0].data.metrics["trial_number"]) == study.best_trial.number

    # the endpoints the UI's artifact browser calls
    listed = json.loads(_get(f"{server['url']}/api/2.0/mlflow/artifacts/list?run_id={parent.info.run_id}"))
    assert {"index.html", "study"} <= {f["path"] for f in listed["files"]}
    page = _get(f"{server['url']}/get-artifact?path=index.html&run_uuid={parent.info.run_id}")
    local = (server["reports_root"] / "tiny" / "index.html").read_text()
    assert 'href="trial-0000/report.html"' in local  # the local page links each trial's folder ...
    served = page.decode()  # ... the parent run's copy names each trial's run instead: no dead links
    assert "trial-0000/report.html" not in served and "MLflow run" in served
    for run in by_number.values():
        assert f'<code class="run">{run.info.run_id}</code>' in served
    assert served.count("<tr>") == local.count("<tr>")  # the same tables, row for row
    trial0 = by_number[0].info.run_id
    metrics = json.loads(_get(f"{server['url']}/get-artifact?path=metrics.json&run_uuid={trial0}"))
    assert metrics["test_error"] == pytest.approx(study.trials[0].user_attrs["test_error"])
