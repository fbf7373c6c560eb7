"""``pipeline rerun`` checks the tracking store before it writes anything, as ``pipeline study`` does.

The real command line, as cron runs it, in a fresh workspace holding only the study file.
Oracles: the exit status, stderr, and the file system (no storage/, mlruns/ or reports/).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import dead_port, listing

DEMO = Path(__file__).resolve().parents[2] / "studies" / "demo.toml"


@pytest.mark.parametrize("kind", ["http", "postgresql", "sqlite-under-a-file"])
def test_an_unusable_tracking_store_stops_the_rerun_with_one_line_and_nothing_written(tmp_path, kind):
    (tmp_path / "studies").mkdir()
    shutil.copy(DEMO, tmp_path / "studies" / "demo.toml")
    port = dead_port()
    if kind == "http":
        uri = shown = f"http://127.0.0.1:{port}"
    elif kind == "postgresql":
        uri = f"postgresql+psycopg://u:sekret@127.0.0.1:{port}/db"
        shown = f"postgresql+psycopg://u:***@127.0.0.1:{port}/db"
    else:  # the store's folder would be under a file
        (tmp_path / "a-file").write_text("")
        uri, shown = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}", str(tmp_path / "a-file")
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    env |= {"MLFLOW_TRACKING_URI": uri, "GIT_PYTHON_REFRESH": "quiet"}
    before = listing(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "rerun", "studies/demo.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert shown in err and "sekret" not in err
    assert "nothing was run" in err or "no trial was run" in err  # and what to fix before it
    assert listing(tmp_path) == before  # no storage/, mlruns/, reports/ (no lock, no rerun.log)
