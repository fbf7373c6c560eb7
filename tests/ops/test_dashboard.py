"""``pipeline dashboard`` / ``make dashboard``: optuna-dashboard over a study's storage, opened in-process.

Oracles: the study's own Optuna storage (its name, direction and trials), read through the
dashboard's HTTP API from a real ``pipeline dashboard`` process on 127.0.0.1; the kernel's record of
that process's argv (``/proc/<pid>/cmdline``); ``make -n``'s expansion of the recipe.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from pipeline import cli
from pipeline.config import load_study
from pipeline.storage import open_storage
from tests.ops.test_rerun import write_tiny_toml
from tests.test_mlflow_server import _free_port, _get, stop_group

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 120
SECRET = "hunter2"


def test_pipeline_storage_prints_the_journal_and_never_a_password(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('name = "dash"\n[dataset]\nsource = "gmm"\n[search]\nlr = { low = 0.01, high = 0.1 }\n')
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    run = [sys.executable, "-m", "pipeline", "storage", str(study)]
    assert (
        subprocess.run(run, capture_output=True, text=True, env=env, check=True).stdout
        == str(Path("storage") / "dash.journal") + "\n"
    )
    url = f"postgresql+psycopg://user:{SECRET}@db.example/optuna"
    shown = subprocess.run(
        run, capture_output=True, text=True, env={**env, "OPTUNA_STORAGE": url}, check=True
    )
    assert SECRET not in shown.stdout and "db.example/optuna" in shown.stdout
    raw = subprocess.run(
        [*run, "--unredacted"], capture_output=True, text=True, env={**env, "OPTUNA_STORAGE": url}
    )
    assert raw.returncode == 2 and SECRET not in raw.stdout  # the option that printed it is gone


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_dashboard_puts_no_storage_url_on_a_command_line():
    block = (ROOT / "Makefile").read_text().split("\ndashboard:")[1].split("\n\n")[0]
    recipe = [line.strip() for line in block.splitlines() if line.startswith("\t")]
    assert recipe[-1] == "$(PY) -m pipeline dashboard $(STUDY) --port $(DASHBOARD_PORT)"
    assert not any("pipeline storage" in line or "bin/optuna-dashboard" in line for line in recipe)
    url = f"postgresql+psycopg://user:{SECRET}@db.example/optuna"
    expanded = subprocess.run(
        ["make", "-n", "--no-print-directory", "dashboard", "STUDY=studies/demo.toml", "DASHBOARD_PORT=8123"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # as from a shell, not from inside `make test` (whose MAKEFLAGS/MAKELEVEL a child make inherits)
        env={
            **{k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
            "OPTUNA_STORAGE": url,
        },
        check=True,
    ).stdout
    assert expanded.splitlines()[-1] == ".venv/bin/python -m pipeline dashboard studies/demo.toml --port 8123"
    assert SECRET not in expanded and "db.example" not in expanded


def test_dashboard_hands_the_opened_storage_to_run_server(workspace, monkeypatch):
    monkeypatch.chdir(workspace["root"])
    toml = write_tiny_toml(workspace["root"] / "tiny.toml")
    served = {}

    class Dashboard:  # optuna_dashboard's entry point, recorded instead of serving
        @staticmethod
        def run_server(storage, host, port):
            served.update(storage=storage, host=host, port=port)

    monkeypatch.setattr("pipeline.ops.dashboard.optuna_dashboard", Dashboard)
    optuna.create_study(study_name="tiny", storage=open_storage(workspace["storage"]), direction="maximize")
    assert cli.main(["dashboard", str(toml), "--storage", workspace["storage"], "--port", "8123"]) == 0
    assert isinstance(served["storage"], optuna.storages.BaseStorage)
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert [s.study_name for s in served["storage"].get_all_studies()] == ["tiny"]


def test_dashboard_refuses_a_missing_study_or_extra_in_one_line_with_exit_2(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace["root"])
    toml = write_tiny_toml(workspace["root"] / "tiny.toml")
    monkeypatch.setattr("pipeline.ops.dashboard.optuna_dashboard", object())  # installed, never reached
    assert cli.main(["dashboard", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no Optuna storage at storage/tiny.journal" in err
    assert err.count("\n") == 1 and not (workspace["root"] / "storage").exists()  # nothing created

    monkeypatch.setattr("pipeline.ops.dashboard.optuna_dashboard", None)  # the extra not installed
    assert cli.main(["dashboard", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[dashboard]'" in err and "make dashboard" in err


@pytest.mark.filterwarnings("ignore:Query string argument.*pysqlite:sqlalchemy.exc.SAWarning")
def test_the_dashboard_serves_the_study_and_its_argv_holds_no_password(workspace, monkeypatch):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is installed by the dev extra")
    if not Path("/proc/self/cmdline").is_file():
        pytest.skip("needs /proc to read a process's argv")
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)  # not checked here
    root = workspace["root"]
    toml = write_tiny_toml(root / "tiny.toml", trials=2)
    cfg = load_study(toml)
    url = f"sqlite:///{root / 'optuna.db'}?password={SECRET}"  # SQLite ignores it; redact() masks it
    workspace.run(cfg, storage=url)
    port = _free_port()
    log = open(root / "dashboard.log", "w")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "dashboard", str(toml), "--port", str(port)],
        cwd=root,
        env={**os.environ, "OPTUNA_STORAGE": url},  # the password reaches it by the environment only
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(
                    f"pipeline dashboard exited {proc.returncode}: {(root / 'dashboard.log').read_text()}"
                )
            try:
                summaries = json.loads(_get(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pipeline dashboard not ready after {STARTUP_TIMEOUT} s")
                time.sleep(0.5)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"dashboard" in argv and not any(SECRET.encode() in arg for arg in argv)
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(url))
        (summary,) = summaries
        assert summary["study_name"] == cfg.name
        assert summary["directions"] == [study.direction.name.lower()]
        detail = json.loads(_get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}?after=0"))
        values = sorted(t["values"][0] for t in detail["trials"] if t.get("values"))
        assert values == pytest.approx(sorted(t.value for t in study.trials))
    finally:
        stop_group(proc)
        log.close()
    shown = (root / "dashboard.log").read_text()
    assert "password=***" in shown and SECRET not in shown
