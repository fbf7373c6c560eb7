"""Faults found by adversarial testing: an unreachable or full tracking store, bad paths, data
errors. Each ends as one line and exit 2 with nothing written, or (mid-trial) as a FAIL trial
queued again with no report folder that looks complete. Oracles: the file system and Optuna's
storage, on real parts (a dead port, a real tmpfs that fills, a real SQLite store)."""

import contextlib
import shutil
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import cli, journal, tracking
from pipeline.storage import open_storage
from tests.conftest import dead_port, listing
from tests.ops.test_rerun import write_tiny_toml


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    write_tiny_toml(tmp_path / "tiny.toml", trials=2)
    return tmp_path


@pytest.mark.parametrize("scheme", ["http", "postgresql+psycopg"])
def test_an_unreachable_tracking_store_is_one_line_and_nothing_is_written(project, capsys, scheme):
    port = dead_port()
    uri = f"http://127.0.0.1:{port}" if scheme == "http" else f"{scheme}://u:sekret@127.0.0.1:{port}/db"
    before = listing(project)
    started = time.monotonic()
    assert cli.main(["study", "tiny.toml", "--tracking-uri", uri]) == 2
    assert time.monotonic() - started < 30  # not MLflow's minutes of retries
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing was run" in err and "Traceback" not in err
    assert "sekret" not in err and f"127.0.0.1:{port}" in err
    assert listing(project) == before  # no storage/, mlruns/ or reports/


@pytest.mark.parametrize("uri", ["mlruns", "file:///tmp/mlruns", "/dev/null/mlruns"])
def test_a_file_store_tracking_uri_is_one_line_and_nothing_is_written(project, capsys, uri):
    """MLflow 3 refuses its file store: said before anything exists, not as a traceback after."""
    before = listing(project)
    assert cli.main(["study", "tiny.toml", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"MLflow tracking URI {uri} names a file store" in err and "sqlite:///" in err
    assert listing(project) == before


def test_a_data_error_leaves_no_empty_folders(project, capsys):
    write_tiny_toml(
        project / "tiny.toml",
        trials=1,
        dataset={"source": "cifar2", "root": "no-data-here", "download": False},
    )
    before = listing(project)
    assert cli.main(["study", "tiny.toml"]) == 2
    assert "cifar-10" in capsys.readouterr().err.lower()
    assert listing(project) == before


def test_storage_given_as_a_folder_is_one_line(project, capsys):
    (project / "a-folder").mkdir()
    assert cli.main(["study", "tiny.toml", "--storage", "a-folder"]) == 2
    err = capsys.readouterr().err
    assert "is a folder; give a journal file" in err and "Traceback" not in err


def test_a_dataset_root_that_is_a_file_is_one_line_and_nothing_is_written(project, capsys):
    write_tiny_toml(
        project / "tiny.toml",
        trials=1,
        dataset={"source": "fashion2", "classes": ["Pullover", "Bag"], "root": "data", "download": False},
    )
    (project / "data").write_text("not a folder\n")
    before = listing(project)
    assert cli.main(["study", "tiny.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "dataset.root = 'data' is a file, not a folder" in err
    assert listing(project) == before


@pytest.mark.parametrize(
    ("folder", "what"),
    [("reports/tiny", "reports folder"), ("mlruns/artifacts/tiny", "MLflow artifact folder")],
)
def test_a_read_only_output_folder_is_found_before_any_trial(project, capsys, read_only_mount, folder, what):
    """A real read-only mount (root, who runs CI, ignores file modes): the preflight names the
    folder, exit 2, and no trial runs (no journal, no MLflow store)."""
    read_only_mount(project / folder)
    before = listing(project)
    assert cli.main(["study", "tiny.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {what}") and f"{folder}: Read-only file system" in err
    assert "write-probe" not in err and "no trial was run" in err
    assert listing(project) == before  # no storage/tiny.journal, no mlruns/mlflow.db


@pytest.fixture
def tmpfs(make_tmpfs):
    return make_tmpfs(8)


def test_a_tracking_store_that_fills_mid_trial_fails_and_requeues_the_trial(
    project, tmpfs, monkeypatch, capsys
):
    monkeypatch.setenv(journal.MIN_FREE_ENV, "0")  # let the store fill during a trial, not before it
    uri = f"sqlite:///{tmpfs / 'mlflow.db'}"
    real_log = tracking.log

    def fill_then_log(mlflow, run_id, **kw):
        if kw.get("tags", {}).get("trial_state") == "COMPLETE" and (project / "fill-now").exists():
            with open(tmpfs / "filler", "wb") as filler, contextlib.suppress(OSError):
                filler.write(b"\0" * (64 << 20))  # the disk is full from here on
        return real_log(mlflow, run_id, **kw)

    monkeypatch.setattr(tracking, "log", fill_then_log)
    assert cli.main(["study", "tiny.toml", "--tracking-uri", uri, "--trials", "1"]) == 0
    (project / "fill-now").touch()
    assert cli.main(["study", "tiny.toml", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "trial 1: " in err and "run the same command again" in err
    trials = optuna.load_study(study_name="tiny", storage=open_storage("storage/tiny.journal")).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].params == trials[1].params  # queued again: no parameters dropped
    assert (project / "reports" / "tiny" / "trial-0000" / "report.html").is_file()
    assert not (project / "reports" / "tiny" / "trial-0001").exists()  # no complete-looking folder
    (tmpfs / "filler").unlink()
    (project / "fill-now").unlink()
    assert cli.main(["study", "tiny.toml", "--tracking-uri", uri]) == 0
    trials = optuna.load_study(study_name="tiny", storage=open_storage("storage/tiny.journal")).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert shutil.disk_usage(tmpfs).free > 0


def test_two_first_runs_create_one_tracking_store_without_a_race(tmp_path):
    """Two processes creating a fresh SQLite store at the same instant (a barrier file starts both)."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom pipeline import tracking\n"
        "go = Path(sys.argv[2])\nwhile not go.exists():\n    time.sleep(0.001)\n"
        "client = tracking.client(sys.argv[1])\n"
        "print(tracking.experiment_id(client, 'tiny'))\n"
    )
    for attempt in range(3):
        uri = f"sqlite:///{tmp_path / f'store{attempt}' / 'mlflow.db'}"
        go = tmp_path / f"go{attempt}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, uri, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        time.sleep(3)  # both are waiting at the barrier, their imports done
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in outs]
        assert len({out.strip() for out, _ in outs}) == 1  # one experiment, whoever created it


def test_a_folder_given_as_the_study_file_is_named_as_a_folder(project, capsys):
    assert cli.main(["check", str(project)]) == 2
    assert "is a folder, not a study file" in capsys.readouterr().err


@pytest.mark.reliability
def test_postgresql_stopping_mid_trial_is_one_line_and_closes_the_mlflow_runs(tmp_path):
    from tests.postgres import postgres_server
    from tests.study.test_workers import (
        PG_BINDIR,
        mid_trial,
        start_worker,
        trial_runs,
        worker_env,
        write_study,
    )

    if PG_BINDIR is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    write_study(tmp_path, trials=1, training__epochs=5000)
    with postgres_server(PG_BINDIR) as server:
        url = server.create_database("stops")
        env = worker_env(tmp_path, url, PIPELINE_HEARTBEAT_SECONDS="1")
        proc = start_worker(tmp_path, env, "--index", "1", log="worker.log")
        deadline = time.monotonic() + 240
        while not mid_trial(url)() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()
    # the server is gone (stopped with -m immediate) while the trial trains
    assert proc.wait(timeout=120) == 2
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log
    assert "trial 0: the Optuna storage failed" in log and server.password not in log
    runs, parents, _ = trial_runs(env["MLFLOW_TRACKING_URI"])
    assert [r.info.status for r in runs] == ["FAILED"]  # the trial's MLflow run is closed
    assert [p.info.status for p in parents] == ["FAILED"]  # and the study's parent run
