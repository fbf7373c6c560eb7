"""No password in any file or message: a study, a rerun and a schedule on a password-protected
PostgreSQL storage. Oracle: the bytes of every file they wrote, and everything they printed."""

import os
import stat
import subprocess

import pytest

from pipeline import cli
from tests.ops.test_rerun import write_tiny_toml
from tests.ops.test_schedule import STAND_IN
from tests.study.test_workers import postgres  # noqa: F401 - the module-scoped server fixture


def _files(root):
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_no_file_or_message_holds_the_storage_password(tmp_path, monkeypatch, capsys, postgres):  # noqa: F811
    url = postgres.create_database("secrets")
    secret = postgres.password
    assert secret in url
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    write_tiny_toml(tmp_path / "tiny.toml", trials=1, rerun={"seeds": 2})
    crontab = tmp_path / "crontab-stand-in"
    crontab.write_text(STAND_IN.format(file=tmp_path / "crontab.txt"))
    crontab.chmod(0o755)
    monkeypatch.setenv("PIPELINE_CRONTAB", str(crontab))

    assert cli.main(["study", "tiny.toml", "--storage", url]) == 0
    assert cli.main(["rerun", "tiny.toml", "--storage", url]) == 0
    assert cli.main(["schedule", "tiny.toml", "--cron", "0 3 * * *", "--storage", url]) == 0
    units = tmp_path / "units"
    assert cli.main(["schedule", "tiny.toml", "--systemd", "--cron", "0 3 * * *", "--storage", url,
                     "--unit-dir", str(units)]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert secret not in printed.out and secret not in printed.err

    env_file = tmp_path / "storage" / "tiny.schedule.env"
    written = [p for p in _files(tmp_path) if p != env_file and p != crontab]
    assert any(p.name == "rerun.log" for p in written) and any(p.suffix == ".service" for p in written)
    assert (tmp_path / "crontab.txt") in written and (tmp_path / "mlruns" / "mlflow.db") in written
    leaked = [str(p.relative_to(tmp_path)) for p in written if secret.encode() in p.read_bytes()]
    assert leaked == []

    # the URL lives in one file only the owner can read, and the schedule names that file
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"OPTUNA_STORAGE='{url}'" in env_file.read_text()
    assert str(env_file) in (tmp_path / "crontab.txt").read_text()
    assert f"EnvironmentFile={env_file}" in (units / "pipeline-rerun-tiny.service").read_text()

    # and the crontab line really reaches the study through that file
    line = (tmp_path / "crontab.txt").read_text().strip()
    command = line.split(" ", 5)[5].rsplit(" # ", 1)[0]
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (tmp_path / "reports" / "tiny" / "cron.log").read_text()
    log = (tmp_path / "reports" / "tiny" / "rerun.log").read_text()
    assert "storage postgresql+psycopg://" in log and secret not in log
