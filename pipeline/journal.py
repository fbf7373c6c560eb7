"""The Optuna journal file on a disk that can fill up: a torn record repaired, space checked first.

A write cut short by a full disk leaves half a JSON record; the next append (once space is free)
glues a whole record onto it, and from then on every open fails with ``JSONDecodeError``.
``repair`` runs when a journal is opened: under Optuna's own journal lock it keeps a copy of the
file, drops the torn part (salvaging a whole record glued onto it) and says so in one line.
``check_free_space`` runs before every trial, so a study stops cleanly before the disk is full.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock
from optuna.storages.journal._file import get_lock_file

from pipeline import files
from pipeline.errors import UsageError

MIN_FREE_ENV = "PIPELINE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 64  # a trial writes kilobytes to the journal, and up to ~10 MB of weights and report
RECORD_START = b'{"op_code":'  # how every journal record begins (Optuna writes compact JSON)


class DiskFull(UsageError):
    """Too little free space to run another trial safely; nothing was started."""


@dataclass(frozen=True)
class Repair:
    path: Path
    copy: Path
    dropped: int  # torn records removed
    salvaged: int  # whole records recovered from a line a torn record was glued to

    def line(self) -> str:
        return (
            f"repaired Optuna journal {self.path}: dropped {self.dropped} torn record(s) left by a "
            f"failed write, kept {self.salvaged} glued to them; the original is at {self.copy}"
        )


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _salvage(line: bytes) -> bytes | None:
    """The whole record at the end of a line that begins with a torn one, if there is one."""
    start = line.rfind(RECORD_START)
    while start > 0:
        if _parses(line[start:]):
            return line[start:]
        start = line.rfind(RECORD_START, 0, start)
    return None


def repair(path: Path) -> Repair | None:
    """Repair a torn journal in place (atomically, a copy kept beside it); None if it was whole."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with get_lock_file(JournalFileSymlinkLock(str(path.resolve()))):  # no append is half done
        data = path.read_bytes()
        *lines, tail = data.split(b"\n")
        kept, dropped, salvaged = [], 0, 0
        for line in lines:
            if _parses(line):
                kept.append(line)
                continue
            dropped += 1
            whole = _salvage(line)
            if whole is not None:
                kept.append(whole)
                salvaged += 1
        if tail:  # a last record without its newline: the write stopped mid-record
            dropped += 1
        if not dropped:
            return None
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        copy = path.with_name(f"{path.name}.torn-{stamp}")
        shutil.copy2(path, copy)
        text = b"".join(line + b"\n" for line in kept)
        files.atomic_write(path, lambda handle: handle.write(text))
    return Repair(path, copy, dropped, salvaged)


def min_free_bytes() -> int:
    raw = os.environ.get(MIN_FREE_ENV, str(DEFAULT_MIN_FREE_MB))
    try:
        value = float(raw)
        if not value >= 0:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"${MIN_FREE_ENV} = {raw!r}: give the free space a trial needs, in MB (>= 0)"
        ) from None
    return int(value * 2**20)


def check_free_space(folders: list[Path], what: str) -> None:
    """Raise ``DiskFull`` when any of ``folders`` has less free space than a trial needs."""
    need = min_free_bytes()
    for folder in folders:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need:
            raise DiskFull(
                f"{what}: {folder} has {free / 2**20:.1f} MB free, less than the {need / 2**20:.0f} MB a "
                f"trial may need (${MIN_FREE_ENV}). Free some space, then run the same command again: "
                "finished trials are kept and the study resumes"
            )
