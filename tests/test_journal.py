"""A full disk under the Optuna journal: a torn record repaired on open, space checked before a
trial. Oracles: Optuna itself (it refuses the torn file, and reads the repaired one), the bytes
kept aside, and a real tmpfs that runs out of space."""

import json
import os
import shutil

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import cli, journal
from pipeline.storage import open_storage
from tests.conftest import tiny_study
from tests.ops.test_rerun import write_tiny_toml


def _record(path, key: str) -> bytes:
    """A whole SET_STUDY_USER_ATTR record, as Optuna writes them (copied from the journal's own)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    record = next(r for r in lines if r["op_code"] == 2)
    record["user_attr"] = {key: "kept"}
    return json.dumps(record, separators=(",", ":")).encode()


def test_a_torn_record_glued_to_the_next_is_repaired_on_open(workspace, capsys):
    workspace.run(tiny_study(trials=1))
    path = workspace["root"] / "storage" / "study.journal"
    before = optuna.load_study(study_name="tiny", storage=open_storage(str(path))).trials
    whole = path.read_bytes()
    torn = b'{"op_code":5,"worker_id":"w","trial_id":1,"param_name":"mom'  # the disk filled here
    glued, later = _record(path, "glued"), _record(path, "later")
    path.write_bytes(whole + torn + glued + b"\n" + later + b"\n")  # space freed: later appends
    with pytest.raises(json.JSONDecodeError):  # what every command met before the repair
        optuna.load_study(
            study_name="tiny",
            storage=optuna.storages.journal.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(path))
            ),
        )
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(path)))
    line = capsys.readouterr().err
    assert "repaired Optuna journal" in line and "dropped 1 torn record(s)" in line and "kept 1" in line
    assert study.user_attrs["glued"] == study.user_attrs["later"] == "kept"
    after = study.trials
    assert [(t.state, t.value, t.params) for t in after] == [(t.state, t.value, t.params) for t in before]
    copies = list(path.parent.glob("study.journal.torn-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == whole + torn + glued + b"\n" + later + b"\n"
    outcome = workspace.run(tiny_study(trials=2))  # and the study resumes from it
    assert outcome.n_complete == 2


def test_a_last_record_cut_short_is_dropped(workspace):
    workspace.run(tiny_study(trials=1))
    path = workspace["root"] / "storage" / "study.journal"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":4,"worker_id":"w","study_id":0,"datetime_')
    fixed = journal.repair(path)
    assert fixed is not None and fixed.dropped == 1 and fixed.salvaged == 0
    assert path.read_bytes() == whole
    assert journal.repair(path) is None  # a whole journal is left alone


@pytest.fixture
def tmpfs(make_tmpfs):
    """A 4 MB tmpfs (root only: CI runs as root)."""
    return make_tmpfs(4)


def test_a_nearly_full_disk_stops_the_study_before_a_trial_and_loses_nothing(
    tmpfs, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(journal.MIN_FREE_ENV, "2")
    (tmp_path / "mlruns").mkdir()
    write_tiny_toml(tmp_path / "tiny.toml", trials=1)
    spec = str(tmpfs / "tiny.journal")
    assert cli.main(["study", "tiny.toml", "--storage", spec]) == 0
    saved = (tmpfs / "tiny.journal").read_bytes()
    free = shutil.disk_usage(tmpfs).free
    with open(tmpfs / "filler", "wb") as filler:  # leave 1 MB: less than the 2 MB a trial may need
        filler.write(b"\0" * (free - 2**20))
    assert cli.main(["study", "tiny.toml", "--storage", spec, "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmpfs} has 1.0 MB free" in err and "Free some space, then run the same command again" in err
    assert (tmpfs / "tiny.journal").read_bytes() == saved  # not a byte written
    os.unlink(tmpfs / "filler")
    assert cli.main(["study", "tiny.toml", "--storage", spec, "--trials", "2"]) == 0
    trials = optuna.load_study(study_name="tiny", storage=open_storage(spec)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
