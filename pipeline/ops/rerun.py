"""Scheduled reruns: continue a study, retrain its selected configuration with fresh seeds, flag drift.

A rerun is safe under cron or a systemd timer. It holds a per-study kernel lock (``fcntl.flock`` on
``reports/<study>/rerun.lock``; the kernel drops it when the process dies, SIGKILL included, so a
killed rerun never blocks the next one), logs to ``reports/<study>/rerun.log``, shows no progress
bars unless stderr is a terminal, and exits with a code a scheduler can act on (``EXIT_*``).

What one rerun does: (1) continue the study to its trial target (``[rerun] trials``, else the
study's ``trials``), resuming whatever is unfinished; (2) retrain the selected configuration (the
study's best trial by the validation objective, never by test) with the training seeds
``first_seed … first_seed + seeds − 1`` and test each model; (3) append one record to
``reports/<study>/reruns.json`` (written atomically) and log it as an MLflow run tagged
``rerun=true`` in the study's experiment, with date, git commit, package versions and split hash.

The seeds are fixed by the ``[rerun]`` table, not drawn per date: an unchanged setup reproduces
the previous rerun's numbers exactly (no drift), so any movement comes from a change of code,
versions, data, study or selection — which the record's provenance shows next to the drift.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipeline import files, tracking
from pipeline.config import ConfigError, StudyConfig
from pipeline.data import DataError, Split, load_split
from pipeline.ops.drift import (
    Drift,
    detect_drift,
    exact_interval,
    rerun_seeds,
    rerun_trials,
    retrain,
    summarize_seeds,
)
from pipeline.report.figures import plot_reruns
from pipeline.report.reruns import (
    HISTORY_FILE,
    PLOT_FILE,
    RerunError,
    load_history,
    params_text,
    save_history,
)
from pipeline.report.study_page import regenerate
from pipeline.signals import signal_in, stop_on_signals
from pipeline.storage import StudyError, open_storage, ranked_trials, redact, storage_spec
from pipeline.study.run import run_study

EXIT_OK = 0  # ran; no drift (or the first rerun: nothing to compare with)


EXIT_FAILED = 1  # an error or a signal stopped the rerun; see rerun.log; no record was added


EXIT_USAGE = 2  # bad study file, data or history file (the message says which and how to fix it)


EXIT_DRIFT = 3  # ran and drift was detected against the previous rerun


EXIT_LOCKED = 4  # another rerun of this study holds the lock; nothing was done


LOCK_FILE = "rerun.lock"


LOG_FILE = "rerun.log"


log = logging.getLogger("pipeline.rerun")


class RerunLocked(RuntimeError):
    """Another process holds this study's rerun lock."""


@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/rerun.lock`` exclusively, or raise ``RerunLocked`` at once (never wait).

    ``flock`` belongs to the open file, so the kernel releases it when the holder exits or is
    killed. The file itself is never deleted: unlinking it would let a third process lock a new
    inode while a second still holds the old one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "holder unknown"
            raise RerunLocked(
                f"another rerun of this study is running ({holder}); lock {path} is held. "
                "Nothing was done; the lock is released when that process exits or is killed."
            ) from None
        os.ftruncate(fd, 0)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        yield path
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RerunOutcome:
    record: dict[str, Any]  # what was appended to reruns.json
    drift: Drift
    history: Path
    run_id: str  # the rerun's MLflow run


def run_rerun(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    reports_root: Path = Path("reports"),
    trials: int | None = None,
    progress: bool | None = None,
    now: dt.datetime | None = None,
) -> RerunOutcome:
    """One rerun under the study's lock; raises ``RerunLocked`` if another one is running."""
    folder = reports_root / cfg.name
    with study_lock(folder), _file_log(folder / LOG_FILE):
        return _rerun(cfg, folder, storage, tracking_uri, reports_root, trials, progress, now)


def _rerun(cfg, folder, storage, tracking_uri, reports_root, trials, progress, now) -> RerunOutcome:
    date = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    history_path = folder / HISTORY_FILE
    history = load_history(history_path)  # a corrupt history stops the rerun before any work
    target = rerun_trials(cfg, trials)
    spec = storage_spec(cfg, storage)
    log.info(
        "rerun of %s (%s) started: trial target %d, storage %s", cfg.name, cfg.path, target, redact(spec)
    )
    before = _n_trials(spec, cfg.name)

    # (1) continue the study; finished trials are kept, unfinished ones resumed
    outcome = run_study(
        cfg.with_overrides(trials=target),
        storage=storage,
        tracking_uri=tracking_uri,
        reports_root=reports_root,
        progress=progress,
    )
    study = optuna.load_study(study_name=cfg.name, storage=open_storage(spec))
    new_trials = len(study.trials) - before
    log.info(
        "study: %d complete, %d pruned, %d failed (%d new trials)",
        outcome.n_complete,
        outcome.n_pruned,
        outcome.n_failed,
        new_trials,
    )
    ranked = ranked_trials(study)  # the one selection rule: by validation, never by test
    if not ranked:
        raise RerunError(f"study {cfg.name!r} has no completed trial to retrain")
    best = ranked[0]

    # (2) retrain the selection with the fixed rerun seeds
    split = load_split(cfg.dataset)
    mlflow = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(mlflow, cfg.name)
    prov = tracking.provenance()
    run_id = mlflow.create_run(
        exp_id,
        run_name=f"rerun-{date}",
        tags={
            "rerun": "true",
            "pipeline_role": "rerun",
            "optuna_study": cfg.name,
            "rerun_date": date,
            "split_hash": split.split_hash,
            "config_hash": cfg.config_hash(),
            "study_file": cfg.path,
            "selected_trial": best.number,
            "selected_run_id": best.user_attrs.get("mlflow_run_id", ""),
            **prov,
        },
    ).info.run_id
    status = "FAILED"
    try:
        seeds = rerun_seeds(cfg)
        results = []
        for seed in seeds:
            res = retrain(cfg, split, best.params, seed)
            log.info(
                "seed %d: test error %.4f (%d/%d), %s",
                seed,
                res.test_error,
                res.test_k,
                res.test_m,
                res.outcome,
            )
            results.append(res)

        # (3) record, compare with the previous rerun, keep the history
        confidence = cfg.bounds.confidence
        record: dict[str, Any] = {
            "date": date,
            "study": cfg.name,
            "run_id": run_id,
            "trials_target": target,
            "new_trials": new_trials,
            "n_complete": outcome.n_complete,
            "n_pruned": outcome.n_pruned,
            "n_failed": outcome.n_failed,
            "objective": cfg.objective,
            "selected_trial": best.number,
            "selected_value": best.value,
            "selected_params": dict(best.params),
            "selected_test_error": best.user_attrs.get("test_error"),
            "selected_test_error_clopper_pearson": _trial_interval(best, split, confidence),
            "confidence": confidence,
            "seeds": list(seeds),
            "test_errors": [r.test_error for r in results],
            "val_accs": [r.val_acc for r in results],
            "seed_clopper_pearson": [list(r.clopper_pearson) for r in results],
            "diverged_seeds": [r.seed for r in results if r.outcome != "completed"],
            **summarize_seeds(results, confidence),
            "split_hash": split.split_hash,
            "config_hash": cfg.config_hash(),
            "provenance": prov,
        }
        drift = detect_drift(history[-1] if history else None, record)
        record["drift"] = drift.to_dict()
        history.append(record)
        save_history(history_path, history)
        plot_reruns(history, folder / PLOT_FILE)
        _log_run(mlflow, run_id, record, results, drift, folder)
        status = "FINISHED"
    finally:
        mlflow.set_terminated(run_id, status)
    try:  # the study page gets the new record in its Reruns section; the record is kept regardless
        regenerate(cfg, storage=storage, tracking_uri=tracking_uri, reports_root=reports_root)
    except Exception as exc:
        log.warning("study page not refreshed (%s); `pipeline report` rebuilds it", exc)
    log.info("%s", summary_line(record, drift))
    return RerunOutcome(record, drift, history_path, run_id)


def _n_trials(spec: str, name: str) -> int:
    try:
        return len(optuna.load_study(study_name=name, storage=open_storage(spec)).trials)
    except KeyError:
        return 0


def _trial_interval(trial: optuna.trial.FrozenTrial, split: Split, confidence: float) -> list[float] | None:
    """The selected trial's exact interval as the study recorded it (recomputed for older studies)."""
    attrs = trial.user_attrs
    if "test_error_clopper_pearson_low" in attrs:
        return [attrs["test_error_clopper_pearson_low"], attrs["test_error_clopper_pearson_high"]]
    if "test_error" in attrs:
        m = len(split.y_test)
        return list(exact_interval(round(attrs["test_error"] * m), m, confidence))
    return None


def _log_run(mlflow, run_id: str, record: dict[str, Any], results, drift: Drift, folder: Path) -> None:
    low, high = record["test_error_clopper_pearson"]
    metrics = {
        key: record[key]
        for key in ("test_error_mean", "test_error_std", "test_error_min", "test_error_max", "new_trials")
        if record[key] is not None and math.isfinite(record[key])
    }
    metrics |= {
        "test_error_clopper_pearson_low": low,
        "test_error_clopper_pearson_high": high,
        "selected_trial_number": record["selected_trial"],
        "drift": float(drift.detected),
        "drift_selection": float(drift.selection_changed),
        "drift_interval": float(drift.outside_interval),
        "drift_spread": float(drift.outside_spread),
    }
    if record["selected_test_error"] is not None:
        metrics["selected_test_error"] = record["selected_test_error"]
    if record["selected_test_error_clopper_pearson"] is not None:
        s_low, s_high = record["selected_test_error_clopper_pearson"]
        metrics |= {
            "selected_test_error_clopper_pearson_low": s_low,
            "selected_test_error_clopper_pearson_high": s_high,
        }
    params = {
        **record["selected_params"],
        "seeds": ",".join(map(str, record["seeds"])),
        "trials_target": record["trials_target"],
        "confidence": record["confidence"],
    }
    tags = {
        "drift": str(drift.detected).lower(),
        "drift_reasons": "; ".join(drift.reasons) or "none",
        "drift_compared_with": drift.compared_with or "none",
    }
    tracking.log(mlflow, run_id, params=params, metrics=metrics, tags=tags)
    for r in results:  # one point per seed, the seed as the step
        tracking.log(mlflow, run_id, metrics={"seed_test_error": r.test_error}, step=r.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rerun.json"
        files.write_json(path, record)
        mlflow.log_artifact(run_id, str(path))
    mlflow.log_artifact(run_id, str(folder / PLOT_FILE))


def summary_line(record: Mapping[str, Any], drift: Drift) -> str:
    """One line a cron mail or a log reader can act on."""
    low, high = record["test_error_clopper_pearson"]
    head = (
        f"rerun {record['study']} {record['date']}: trial {record['selected_trial']} "
        f"({params_text(record['selected_params'])}), test error {record['test_error_mean']:.4f} "
        f"± {record['test_error_std']:.4f} over {len(record['seeds'])} seeds "
        f"[{record['test_error_min']:.4f}, {record['test_error_max']:.4f}], exact "
        f"{record['confidence']:.0%} [{low:.4f}, {high:.4f}]; {record['new_trials']} new trials"
    )
    if drift.compared_with is None:
        return f"{head}; first rerun, nothing to compare with"
    changed = f" (changed: {'; '.join(drift.changes)})" if drift.changes else ""
    if not drift.detected:
        return f"{head}; no drift since {drift.compared_with}{changed}"
    return f"{head}; DRIFT since {drift.compared_with}: {'; '.join(drift.reasons)}{changed}"


def rerun_main(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    trials: int | None = None,
    reports_root: Path = Path("reports"),
) -> int:
    """``pipeline rerun``: run once, print one summary line, return an ``EXIT_*`` code.

    Config, data and study errors propagate (the command line prints them, exit 2); they and
    every other failure are written to ``rerun.log`` first, so a cron user finds them there.
    """
    folder = reports_root / cfg.name
    with stop_on_signals():
        try:
            outcome = run_rerun(
                cfg, storage=storage, tracking_uri=tracking_uri, reports_root=reports_root, trials=trials
            )
        except RerunLocked as exc:
            with _file_log(folder / LOG_FILE):
                log.warning("skipped: %s", exc)
            print(f"rerun {cfg.name}: skipped: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        except RerunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (ConfigError, DataError, StudyError):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            stop = signal_in(exc)
            if stop is not None:  # the command line prints the one stop line and exits 143 / 130
                raise stop from None
            print(
                f"error: rerun of {cfg.name} failed: {exc!r}; details in {folder / LOG_FILE}", file=sys.stderr
            )
            return EXIT_FAILED
    print(summary_line(outcome.record, outcome.drift))
    return EXIT_DRIFT if outcome.drift.detected else EXIT_OK


@contextlib.contextmanager
def _file_log(path: Path) -> Iterator[None]:
    """Append this module's log (and any exception leaving the block) to ``path``; echo it on a TTY."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    if sys.stderr.isatty():
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt = logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s")
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    except BaseException as exc:
        log.error("rerun failed: %r", exc, exc_info=not isinstance(exc, (RerunError, ConfigError)))
        raise
    finally:
        log.setLevel(previous_level)
        for h in handlers:
            log.removeHandler(h)
            h.close()
