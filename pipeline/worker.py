"""Workers: several processes, on one machine or many, sharing one study; and the faults they survive.

- ``optimize`` runs trials until the study holds exactly its total of complete-or-pruned trials,
  counting the trials other workers are running. The count and Optuna's ``ask`` happen under one
  allocation lock (a file lock beside the journal, or a PostgreSQL advisory lock), so two workers
  never both take the last slot.
- A worker killed mid-trial leaves a RUNNING trial. On a database storage Optuna's heartbeat fails
  it; on the local journal file ``sweep`` fails RUNNING trials whose process is gone (same host, pid
  dead or reused). Either way the trial is queued again with the same params (``Retry``) and its
  MLflow run is closed as KILLED.
- SIGTERM (and SIGHUP) raise ``Terminated``, an ordinary exception, so Optuna marks the trial FAIL
  and its MLflow run is closed, as with Ctrl-C. The interrupted trial is queued to run again.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import fcntl
import hashlib
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.study import DEFAULT_STORAGE_DIR, StudyError

HEARTBEAT_ENV = "PIPELINE_HEARTBEAT_SECONDS"  # heartbeat interval on database storages
DEFAULT_HEARTBEAT = 30  # seconds; a dead worker's trial is failed after 3 intervals without one
MAX_RETRY = 2  # an interrupted or killed configuration runs at most 1 + MAX_RETRY times
POLL_SECONDS = 2.0  # how often an idle worker looks at trials other workers are running
UNCLAIMED_SECONDS = 60  # a RUNNING trial with no worker id after this long is not waited for
LOCK_TIMEOUT = 120  # seconds to wait for the allocation lock on PostgreSQL before giving up


# ----------------------------------------------------------------------------------------------
# Signals


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived: an ``Exception``, so Optuna fails the trial rather than leave it RUNNING."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.trial: int | None = None  # set by ``optimize``: the trial it interrupted
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Terminated`` in the main thread.

    A second signal while cleaning up gets the default action (the process dies at once). SIGHUP
    stays ignored where it was ignored (``nohup``). Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        current = signal.getsignal(signum)
        if signum == signal.SIGHUP and current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def signal_in(exc: BaseException) -> BaseException | None:
    """The ``Terminated`` or ``KeyboardInterrupt`` that ``exc`` is, or arose while handling, if any.

    A signal lands between any two bytecodes, sometimes inside a library's cleanup, which may then
    fail in turn (a lock file already removed): the signal, not that failure, is what happened.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (Terminated, KeyboardInterrupt)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# ----------------------------------------------------------------------------------------------
# Which process runs a trial, and is it still alive


def worker_id(pid: int | None = None) -> str:
    """``host:pid:start`` — the process start time (in clock ticks) tells a reused pid apart."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3… of /proc/<pid>/stat (state, ppid, …), or None where there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22, starttime


def process_alive(wid: str) -> bool | None:
    """Whether the worker that wrote ``wid`` still runs; None if it ran on another host or is unknown."""
    try:
        host, pid_text, ticks = wid.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):  # gone, or a zombie not yet reaped
            return False
        return not ticks or fields[19] == ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Storage: heartbeat, retry, allocation lock


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
            from sqlalchemy.engine import make_url

            database = make_url(spec).database
            if database and database != ":memory:":
                self.path = Path(database).with_name(f"{Path(database).name}.{study_name}.alloc.lock")

    def acquire(self) -> None:
        if self.path is not None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.spec.startswith("postgresql"):
            import sqlalchemy

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


# ----------------------------------------------------------------------------------------------
# Sweep: dead workers' trials


def sweep(study: optuna.Study, spec: str, mlflow: Any = None, experiment_id: str | None = None) -> list[int]:
    """Fail the RUNNING trials of dead workers, queue them again, and close their MLflow runs as KILLED.

    On a database storage Optuna's heartbeat decides (the storage's ``Retry`` queues them); on the
    journal file or SQLite a trial is dead when its worker ran on this host and its process is gone.
    Returns the numbers of the trials this call failed.
    """
    failed: list[int] = []
    if uses_heartbeat(spec):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        failed = sorted(t.number for t in after if t.number not in before)
    else:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if process_alive(str(trial.user_attrs.get("worker", ""))) is not False:
                continue
            try:  # as Optuna's fail_stale_trials does: no sampler.after_trial for another process's trial
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker swept it first
            Retry()(study, trial)
            failed.append(trial.number)
    if mlflow is not None and experiment_id is not None:
        close_orphan_runs(study, mlflow, experiment_id)
    return failed


def close_orphan_runs(study: optuna.Study, mlflow: Any, experiment_id: str) -> list[str]:
    """MLflow runs still RUNNING whose Optuna trial has failed: end them as KILLED."""
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    runs = mlflow.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING' and tags.pipeline_role = 'trial'"
    )
    closed = []
    for run in runs:
        number = run.data.tags.get("optuna_trial", "")
        if number.isdigit() and states.get(int(number)) == TrialState.FAIL:
            mlflow.set_tag(run.info.run_id, "reason", "its worker died mid-trial; the trial was queued again")
            mlflow.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


# ----------------------------------------------------------------------------------------------
# The worker loop


def optimize(
    study: optuna.Study,
    total: int,
    objective: Callable[[optuna.Trial], float],
    *,
    spec: str,
    sweep: Callable[[], Any] | None = None,
    on_trial: Callable[[FrozenTrial], None] | None = None,
    poll: float = POLL_SECONDS,
) -> None:
    """Run trials until the study holds ``total`` complete-or-pruned trials, with other workers.

    A slot is free when finished + running < total; a worker with no free slot waits while other
    workers' trials run (one may die and be queued again), and returns once ``total`` are finished.
    Interrupted trials (signal, Ctrl-C, a disk error) are FAIL and queued to run again.
    """
    lock = AllocationLock(spec, study.study_name)
    mine: dict[str, int] = {}

    def run(trial: optuna.Trial) -> float:
        lock.release()
        trial.set_user_attr("worker", worker_id())
        mine["trial"] = trial.number
        try:
            return objective(trial)
        except Exception as exc:
            stop = signal_in(exc)
            if stop is not None and stop is not exc:  # cleanup code failed on the way out: the signal wins
                raise stop from None
            if isinstance(exc, OSError):
                raise StudyError(write_error(exc, f"trial {trial.number}")) from exc
            raise

    try:
        while True:
            mine.clear()
            if sweep is not None:
                sweep()
            lock.acquire()
            try:
                by_state = _states(study)
                finished = by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]
                limit = min(total, _grid_size(study) or total)  # a grid has no more points to give
                if finished >= limit:
                    return
                if finished + by_state[TrialState.RUNNING] >= limit:
                    if not _worth_waiting(study, spec):
                        return
                    lock.release()
                    time.sleep(poll)
                    continue
                study.optimize(run, n_trials=1)
            except (Exception, KeyboardInterrupt) as exc:
                # interrupted (signal, Ctrl-C) or a disk error: the trial never got its chance
                stop = signal_in(exc) or (exc if isinstance(exc, StudyError) else None)
                if stop is not None and "trial" in mine:
                    _requeue(study, mine["trial"])
                    stop.trial = mine["trial"]  # for the exit message
                raise
            finally:
                lock.release()
            if on_trial is not None and "trial" in mine:
                on_trial(_trial(study, mine["trial"]))
    finally:
        lock.close()


def _states(study: optuna.Study) -> dict[TrialState, int]:
    found = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        found[trial.state] += 1
    return found


def _grid_size(study: optuna.Study) -> int | None:
    """GridSampler: the number of grid points (from a trial's record of the grid), else None."""
    if not isinstance(study.sampler, optuna.samplers.GridSampler):
        return None
    for trial in study.get_trials(deepcopy=False):
        space = trial.system_attrs.get("search_space")
        if space:
            return math.prod(len(values) for values in space.values())
    return None


def _worth_waiting(study: optuna.Study, spec: str) -> bool:
    """Whether some running trial will finish or be found dead (so a slot may open again)."""
    if uses_heartbeat(spec):
        return True
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        wid = trial.user_attrs.get("worker")
        if wid is None:  # no id yet: asked a moment ago (or by a process that died right then)
            started = trial.datetime_start or datetime.datetime.now()
            if (datetime.datetime.now() - started).total_seconds() < UNCLAIMED_SECONDS:
                return True
        elif process_alive(str(wid)):
            return True
    return False


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _requeue(study: optuna.Study, number: int) -> None:
    """Queue an interrupted trial's params again, if it ended FAIL (not if it had finished)."""
    trial = _trial(study, number)
    if trial.state == TrialState.FAIL:
        Retry()(study, trial)


def trial_line(trial: FrozenTrial, index: int | None = None) -> str:
    """One line per finished trial, for workers' logs."""
    who = f"worker {index} " if index is not None else ""
    value = "" if trial.value is None else f" value={trial.value:.4f}"
    reason = trial.user_attrs.get("reason")
    return f"{who}(pid {os.getpid()}): trial {trial.number} {trial.state.name}{value}" + (
        f" ({reason})" if reason else ""
    )


# ----------------------------------------------------------------------------------------------
# Paths and writable folders, checked before any trial starts


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


def write_error(exc: OSError, doing: str, then: str = RESUME) -> str:
    """One line for a write that failed: where, why, and what to do."""
    where = exc.filename or "?"
    fix = {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some space",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "make it writable",
        errno.EPERM: "make it writable",
    }.get(exc.errno or 0, "fix the folder")
    return f"{doing}: cannot write {where}: {exc.strerror or exc}. {fix.capitalize()}, {then}."


def check_writable(folder: Path, what: str, how: str) -> None:
    """Create ``folder`` and write, sync and delete a probe file in it, or raise StudyError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(folder)
        raise StudyError(write_error(exc, f"{what} ({how})", "then start again: no trial was run")) from None


def preflight(name: str, spec: str, tracking_uri: str, reports_root: Path) -> Path:
    """Before any trial: the report folder stays inside its root and every output folder is writable.

    Returns the study's report folder.
    """
    reports = inside(reports_root, name)
    if spec == str(DEFAULT_STORAGE_DIR / f"{name}.journal"):
        inside(DEFAULT_STORAGE_DIR, f"{name}.journal")
    check_writable(reports_root, "reports folder", "reports/ of the current folder")
    if "://" not in spec:
        check_writable(Path(spec).parent, "Optuna journal folder", "--storage or $OPTUNA_STORAGE")
    if tracking_uri.startswith("sqlite:///"):
        check_writable(
            Path(tracking_uri.removeprefix("sqlite:///")).parent,
            "MLflow store folder",
            "--tracking-uri or $MLFLOW_TRACKING_URI",
        )
    return reports


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
