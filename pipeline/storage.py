"""Optuna storage: where a study lives, how to open it, and the checks made before anything runs.

- ``storage_spec`` / ``open_storage``: a journal file (default ``storage/<study>.journal``) or a
  database URL; on a database other than SQLite, a heartbeat lets a dead worker's trial be failed
  and queued again (``Retry``).
- ``AllocationLock``: held from counting a study's trials until the next one is asked, so workers
  never overfill the study.
- ``redact`` / ``scrub``: a URL or message with its password masked, for every log line and page.
- ``preflight``: before any trial, every output folder is writable and inside its root.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from pipeline import journal
from pipeline.config import StudyConfig
from pipeline.errors import UsageError
from pipeline.urls import redact

DEFAULT_STORAGE_DIR = Path("storage")
HEARTBEAT_ENV = "PIPELINE_HEARTBEAT_SECONDS"  # heartbeat interval on database storages
DEFAULT_HEARTBEAT = 30  # seconds; a dead worker's trial is failed after 3 intervals without one
MAX_RETRY = 2  # an interrupted or killed configuration runs at most 1 + MAX_RETRY times
LOCK_TIMEOUT = 120  # seconds to wait for the allocation lock on PostgreSQL before giving up


class StudyError(UsageError, RuntimeError):
    """A study that cannot start or resume as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TrialCounts:
    """How many of a study's trials are in each state (the one place they are counted)."""

    complete: int = 0
    pruned: int = 0
    fail: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        """Complete or pruned: the trials a study's target counts."""
        return self.complete + self.pruned

    @property
    def total(self) -> int:
        return self.complete + self.pruned + self.fail + self.running + self.waiting


def trial_counts(study: optuna.Study) -> TrialCounts:
    found = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        found[trial.state.name.lower()] += 1
    return TrialCounts(**found)


TIE = 1e-12  # objectives closer than this are a tie


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The one selection rule: complete trials, best first, by validation only (never by test).

    Best objective first; a tie (within ``TIE``) goes to the lower final validation loss, then to
    the smaller trial number. Optuna's ``best_trial`` is not used: it keeps the earliest of tied
    trials on the journal and has no defined order on a database storage.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(complete, key=lambda t: (sign * t.value, t.number))
    groups: list[list[FrozenTrial]] = []  # runs of values within TIE of the run's first (best) one
    for trial in ranked:
        if groups and abs(trial.value - groups[-1][0].value) <= TIE:
            groups[-1].append(trial)
        else:
            groups.append([trial])

    def loss(trial: FrozenTrial) -> float:
        value = trial.user_attrs.get("val_loss")
        return value if isinstance(value, float) and math.isfinite(value) else math.inf

    return [t for group in groups for t in sorted(group, key=lambda t: (loss(t), t.number))]


def storage_spec(cfg: StudyConfig, explicit: str | None = None) -> str:
    """``--storage``, else $OPTUNA_STORAGE, else the journal file ``storage/<study>.journal``."""
    return explicit or os.environ.get("OPTUNA_STORAGE") or str(DEFAULT_STORAGE_DIR / f"{cfg.name}.journal")


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """A database URL (``postgresql+psycopg://…``, ``sqlite:///…``) or a journal file path.

    The journal file is Optuna's recommended storage for several processes on one machine.
    """
    if "://" in spec:
        kwargs: dict[str, Any] = {}
        if spec.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        else:
            # heartbeat: a killed worker's trial is failed and queued again (RetryHeartbeatStaleTrialCallback)
            kwargs.update(heartbeat_kwargs())
            if spec.startswith("postgresql"):
                kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}
        try:
            with warnings.catch_warnings():  # heartbeat_interval is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(spec, **kwargs)
        except Exception as exc:
            reason = scrub(str(exc).split("\n")[0], spec)
            raise StudyError(
                f"cannot open Optuna storage {redact(spec)}: {reason}\n"
                "Check that the database server is running and reachable, and the URL (--storage or "
                "$OPTUNA_STORAGE); nothing was run."
            ) from None
    path = Path(spec)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fixed = journal.repair(path)  # a write cut short by a full disk: drop the torn record
        if fixed is not None:
            print(fixed.line(), file=sys.stderr, flush=True)
        # an absolute path: Optuna's lock is a symlink to the journal, and a relative target dangles,
        # which turns its wait for a busy lock into a busy loop (no back-off, no stale-lock release)
        backend = optuna.storages.journal.JournalFileBackend(str(path.resolve()))
    except OSError as exc:
        raise StudyError(f"cannot open Optuna journal {path}: {exc}") from None
    return optuna.storages.journal.JournalStorage(backend)


def scrub(text: str, url: str) -> str:
    """``text`` with any password from ``url`` replaced (driver errors can echo parts of a URL)."""
    try:
        parsed = make_url(url)
    except Exception:
        return text
    secrets = [parsed.password, *(v for k, v in parsed.query.items() if k.lower() == "password")]
    for secret in secrets:
        if secret and isinstance(secret, str):
            text = text.replace(secret, "***")
    return text


def uses_heartbeat(spec: str) -> bool:
    """Database storages (not SQLite, not the journal file) detect dead workers by heartbeat."""
    return "://" in spec and not spec.startswith("sqlite")


def heartbeat_kwargs() -> dict[str, Any]:
    """``RDBStorage`` keywords: heartbeat every $PIPELINE_HEARTBEAT_SECONDS (30), stale after 3 beats."""
    raw = os.environ.get(HEARTBEAT_ENV, str(DEFAULT_HEARTBEAT))
    try:
        interval = int(raw)
        if interval < 1:
            raise ValueError
    except ValueError:
        raise StudyError(f"${HEARTBEAT_ENV} = {raw!r}: give a whole number of seconds >= 1") from None
    return {
        "heartbeat_interval": interval,
        "grace_period": 3 * interval,
        "heartbeat_stale_trial_callback": Retry(),
    }


class Retry(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker died: same params, queued as WAITING.

    The failed attempt's user attrs (its worker, its MLflow run) are not copied: they describe
    that attempt, and a dead worker's id on a live trial would get it swept again.
    """

    def __init__(self, max_retry: int = MAX_RETRY) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {}
        super().__call__(study, trial)


class AllocationLock:
    """A lock held from counting a study's trials until Optuna's ``ask`` has created the next one.

    Journal file or SQLite: ``flock`` on a file beside it (released by the kernel if the process
    dies). PostgreSQL: a session advisory lock (released by the server if the connection drops).
    Other databases: no lock (a race at the very end may then add one trial too many).
    """

    def __init__(self, spec: str, study_name: str) -> None:
        self.spec, self.study_name = spec, study_name
        self._fd: int | None = None
        self._conn: Any = None
        self._engine: Any = None
        self.path: Path | None = None
        if "://" not in spec:
            self.path = Path(spec).with_name(f"{Path(spec).name}.{study_name}.alloc.lock")
        elif spec.startswith("sqlite"):
            database = make_url(spec).database
            if database and database != ":memory:":
                self.path = Path(database).with_name(f"{Path(database).name}.{study_name}.alloc.lock")

    def acquire(self) -> None:
        if self.path is not None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.spec.startswith("postgresql"):
            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.spec, poolclass=sqlalchemy.pool.NullPool)
            digest = hashlib.sha256(f"pipeline:{self.study_name}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            self._conn = self._engine.connect()
            try:
                self._conn.execute(sqlalchemy.text(f"SET lock_timeout = '{LOCK_TIMEOUT}s'"))
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            except sqlalchemy.exc.OperationalError as exc:
                self.release()
                raise StudyError(
                    f"study {self.study_name!r}: another worker held the trial-allocation lock for "
                    f"over {LOCK_TIMEOUT} s ({type(exc.orig).__name__}); check the workers, then start "
                    "this one again"
                ) from None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # ends the session, and with it the advisory lock

    def close(self) -> None:
        self.release()
        if self._engine is not None:
            self._engine.dispose()


def inside(root: Path, name: str) -> Path:
    """``root / name``, refusing a name that would land outside ``root``."""
    path = root / name
    if name in ("", ".", "..") or not path.resolve().is_relative_to(root.resolve()):
        raise StudyError(
            f"{name!r} would put files at {path.resolve()}, outside {root}/; "
            "study names may only use lower-case letters, digits, '-' and '_'"
        )
    return path


RESUME = "then run the same command again: finished trials are kept and the study resumes"


def write_error(exc: OSError, doing: str, then: str = RESUME, folder: Path | None = None) -> str:
    """One line for a write that failed: where (the file, else the folder being written), why, and
    what to do."""
    where = exc.filename or (f"a file under {folder}" if folder is not None else "a file (the OS named none)")
    fix = {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some space",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "make it writable",
        errno.EPERM: "make it writable",
    }.get(exc.errno or 0, "fix the folder")
    return f"{doing}: cannot write {where}: {exc.strerror or exc}. {fix.capitalize()}, {then}."


def check_writable(folder: Path, what: str, how: str) -> None:
    """Write, sync and delete a probe file in ``folder`` (or the nearest folder above it that
    exists, where it will be created), or raise StudyError. Creates nothing."""
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe_dir))
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".write-probe-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        exc.filename = str(probe_dir)  # the folder that refused, not the probe's throwaway name
        raise StudyError(write_error(exc, f"{what} ({how})", "then start again: no trial was run")) from None


def preflight(name: str, spec: str, tracking_uri: str, reports_root: Path) -> Path:
    """Before any trial: the report folder stays inside its root and every output folder is writable.

    Returns the study's report folder.
    """
    reports = inside(reports_root, name)
    if spec == str(DEFAULT_STORAGE_DIR / f"{name}.journal"):
        inside(DEFAULT_STORAGE_DIR, f"{name}.journal")
    check_writable(reports, "reports folder", "reports/<study>/ of the current folder")
    if "://" not in spec:
        if Path(spec).is_dir():
            raise StudyError(
                f"Optuna storage {spec} is a folder; give a journal file (e.g. {Path(spec) / name}.journal) "
                "or a database URL (--storage or $OPTUNA_STORAGE)"
            )
        check_writable(Path(spec).parent, "Optuna journal folder", "--storage or $OPTUNA_STORAGE")
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///")).parent
        how = "--tracking-uri or $MLFLOW_TRACKING_URI"
        check_writable(store, "MLflow store folder", how)
        check_writable(store / "artifacts" / name, "MLflow artifact folder", how)
    return reports
