"""Workers: several processes, on one machine or many, sharing one study; and the faults they survive.

- ``optimize`` runs trials until the study holds exactly its total of complete-or-pruned trials,
  counting the trials other workers are running. The count and Optuna's ``ask`` happen under one
  allocation lock (a file lock beside the journal, or a PostgreSQL advisory lock), so two workers
  never both take the last slot.
- A worker killed mid-trial leaves a RUNNING trial. On a database storage Optuna's heartbeat fails
  it; on the local journal file ``sweep`` fails RUNNING trials whose process is gone (same host, pid
  dead or reused). Either way the trial is queued again with the same params (``Retry``) and its
  MLflow run is closed as KILLED.
- A signal (``pipeline.signals``) fails the running trial with the reason "stopped by SIGTERM" /
  "stopped by Ctrl-C", closes its MLflow run and queues it to run again.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import tracking
from pipeline.signals import signal_in, stop_reason
from pipeline.storage import (
    RESUME,
    AllocationLock,
    Retry,
    StudyError,
    trial_counts,
    uses_heartbeat,
    write_error,
)

POLL_SECONDS = 2.0  # how often an idle worker looks at trials other workers are running


UNCLAIMED_SECONDS = 60  # a RUNNING trial with no worker id after this long is not waited for


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


class OneLineTrialFailure(logging.Filter):
    """Optuna logs a failed trial with its whole traceback, then a second line: keep one line.

    The exception itself reaches the command line, which prints it once (a signal as one line).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if " failed with value " in message:
            return False
        if " failed with parameters: " in message:
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = OneLineTrialFailure()
_THREAD_HOOK = threading.excepthook


def _one_line_thread_error(args: threading.ExceptHookArgs) -> None:
    """A store failing under Optuna's heartbeat thread: one line, not a traceback (the main thread
    meets the same store and stops with its own line)."""
    line = tracking.store_error(args.exc_value) if args.exc_value is not None else None
    if line is None:
        _THREAD_HOOK(args)
    else:
        name = args.thread.name if args.thread is not None else "a thread"
        print(f"{name}: {line}", file=sys.stderr, flush=True)


threading.excepthook = _one_line_thread_error


logging.getLogger("optuna.study._optimize").addFilter(_ONE_LINE)


def optimize(
    study: optuna.Study,
    total: int,
    objective: Callable[[optuna.Trial], float],
    *,
    spec: str,
    sweep: Callable[[], Any] | None = None,
    on_trial: Callable[[FrozenTrial], None] | None = None,
    poll: float = POLL_SECONDS,
    before_trial: Callable[[], None] | None = None,
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
        except (Exception, KeyboardInterrupt) as exc:
            stop = signal_in(exc)
            if stop is not None:
                with contextlib.suppress(Exception):  # the reason the study page and the log show
                    trial.set_user_attr("reason", stop_reason(stop))
            if stop is not None and stop is not exc:  # cleanup code failed on the way out: the signal wins
                raise stop from None
            if isinstance(exc, OSError):
                raise StudyError(write_error(exc, f"trial {trial.number}")) from exc
            failed_store = tracking.store_error(exc)
            if failed_store is not None:  # like a full disk: the trial is queued again, the study stops
                raise StudyError(f"trial {trial.number}: {failed_store}. Fix the store, {RESUME}.") from exc
            raise

    try:
        while True:
            mine.clear()
            if sweep is not None:
                sweep()
            if before_trial is not None:  # e.g. the free-space check: stop before, not during
                before_trial()
            lock.acquire()
            try:
                counted = trial_counts(study)
                finished = counted.finished
                limit = min(total, _grid_size(study) or total)  # a grid has no more points to give
                if finished >= limit:
                    return
                if finished + counted.running >= limit:
                    if not _worth_waiting(study, spec):
                        return
                    lock.release()
                    time.sleep(poll)
                    continue
                study.optimize(run, n_trials=1)
            except (Exception, KeyboardInterrupt) as exc:
                # interrupted (signal, Ctrl-C), a disk error or a store that stopped answering
                stop = signal_in(exc) or (exc if isinstance(exc, StudyError) else None)
                failed_store = tracking.store_error(exc) if stop is None else None
                if stop is None and failed_store is None:
                    raise
                requeued = "trial" not in mine or _requeue(study, mine["trial"])
                if failed_store is not None:  # Optuna's own storage went away (e.g. PostgreSQL stopped)
                    which = f"trial {mine['trial']}: " if "trial" in mine else ""
                    later = (
                        ""
                        if requeued
                        else " The trial stays RUNNING until the database is back; its heartbeat then "
                        "fails it and queues it again."
                    )
                    raise StudyError(f"{which}{failed_store}.{later} Fix the store, {RESUME}.") from exc
                if "trial" in mine:
                    stop.trial = mine["trial"]  # for the exit message
                raise
            finally:
                lock.release()
            if on_trial is not None and "trial" in mine:
                on_trial(_trial(study, mine["trial"]))
    finally:
        lock.close()


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


def _requeue(study: optuna.Study, number: int) -> bool:
    """Queue an interrupted trial's params again, if it ended FAIL (not if it had finished).

    False when the storage itself cannot be reached (the heartbeat retries the trial later).
    """
    try:
        trial = _trial(study, number)
        if trial.state == TrialState.FAIL:
            Retry()(study, trial)
    except Exception as exc:
        if tracking.store_error(exc) is None:
            raise
        return False
    return True
