"""``make dashboard``: optuna-dashboard over a study's storage, found by ``pipeline storage``.

Oracle: the study's own Optuna storage (its name, direction and trials), read through the
dashboard's HTTP API from a real optuna-dashboard process on 127.0.0.1.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from pipeline.storage import open_storage
from tests.conftest import tiny_study
from tests.test_mlflow_server import _free_port, _get, stop_group

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is installed by the dev extra")
STARTUP_TIMEOUT = 120


def test_pipeline_storage_prints_the_journal_and_hides_a_password(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('name = "dash"\n[dataset]\nsource = "gmm"\n[search]\nlr = { low = 0.01, high = 0.1 }\n')
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    run = [sys.executable, "-m", "pipeline", "storage", str(study)]
    assert (
        subprocess.run(run, capture_output=True, text=True, env=env, check=True).stdout
        == str(Path("storage") / "dash.journal") + "\n"
    )
    url = "postgresql+psycopg://user:hunter2@db.example/optuna"
    shown = subprocess.run(
        run, capture_output=True, text=True, env={**env, "OPTUNA_STORAGE": url}, check=True
    )
    assert "hunter2" not in shown.stdout and "db.example/optuna" in shown.stdout
    raw = subprocess.run(
        [*run, "--unredacted"], capture_output=True, text=True, env={**env, "OPTUNA_STORAGE": url}, check=True
    )
    assert raw.stdout.strip() == url


def test_the_dashboard_serves_the_studys_trials(workspace, monkeypatch):
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)  # not checked here
    cfg = tiny_study(trials=2)
    workspace.run(cfg)
    port = _free_port()
    binary = Path(sys.executable).with_name("optuna-dashboard")
    log = open(workspace["root"] / "dashboard.log", "w")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        [str(binary), workspace["storage"], "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"optuna-dashboard exited with {proc.returncode}")
            try:
                summaries = json.loads(_get(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard not ready after {STARTUP_TIMEOUT} s")
                time.sleep(0.5)
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(workspace["storage"]))
        (summary,) = summaries
        assert summary["study_name"] == cfg.name
        assert summary["directions"] == [study.direction.name.lower()]
        detail = json.loads(_get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}?after=0"))
        values = sorted(t["values"][0] for t in detail["trials"] if t.get("values"))
        assert values == pytest.approx(sorted(t.value for t in study.trials))
    finally:
        stop_group(proc)
        log.close()
