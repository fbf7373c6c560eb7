"""files: the one atomic write. Oracle: the bytes on disk, and what a killed writer leaves."""

import os
import subprocess
import sys

import pytest

from pipeline import files


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "x.json"
    files.write_json(path, {"v": float("nan"), "k": 3})
    assert path.read_text() == '{\n  "v": null,\n  "k": 3\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.txt"
    files.write_text(path, "old")

    def half(handle):
        handle.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(path, half)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_mode_is_applied_for_secrets(tmp_path):
    path = files.write_text(tmp_path / "env", "A=1\n", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600


def test_atomic_dir_replaces_a_folder_and_cleans_a_killed_writers_leftover(tmp_path):
    final = tmp_path / "study"
    # a writer killed with SIGKILL inside atomic_dir leaves its temporary folder behind
    code = (
        "import os, signal, sys\nfrom pathlib import Path\nfrom pipeline import files\n"
        "with files.atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'half.png').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(final)], check=False)
    assert proc.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".study.")]
    assert len(leftovers) == 1 and not final.exists()
    with files.atomic_dir(final) as tmp:
        (tmp / "page.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]
    assert (final / "page.txt").read_text() == "ok"
    assert final.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_a_live_writers_temporary_is_kept(tmp_path):
    mine = tmp_path / f".study.tmp-{os.getpid()}-abc"
    mine.mkdir()
    assert files.clean_leftovers(tmp_path, "study") == []
    assert mine.exists()


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_full_disk_error_names_the_file_it_was_writing(tmp_path):
    def full(handle):
        raise OSError(28, "No space left on device")  # what a write through a file object raises

    with pytest.raises(OSError) as caught:
        files.atomic_write(tmp_path / "report.html", full)
    assert caught.value.filename == str(tmp_path / "report.html")
