"""Scheduled reruns: continue a study, retrain its selected configuration, test it against a baseline.

A rerun is safe under cron or a systemd timer. It holds a per-study kernel lock (``fcntl.flock`` on
``reports/<study>/rerun.lock``; the kernel drops it when the process dies, SIGKILL included, so a
killed rerun never blocks the next one), logs to ``reports/<study>/rerun.log``, shows no progress
bars unless stderr is a terminal, and exits with a code a scheduler can act on (``EXIT_*``).

What one rerun does: (1) continue the study to its trial target (``[rerun] trials``, else the
study's ``trials``), resuming whatever is unfinished; (2) retrain the selected configuration (the
study's best trial by the validation objective, never by test) once per replicate seed and test
each model; (3) judge it and append one record to ``reports/<study>/reruns.json`` (written
atomically), logged as an MLflow run tagged ``rerun=true`` in the study's experiment.

The judgement. The first rerun (or ``--rebaseline``, or a history from before baselines) freezes
a *baseline*: the selected configuration, its ``[rerun] seeds`` replicates' test errors, their
seed list, the provenance, and every replicate's test logits (``rerun-baseline-<index>.npz``
beside the history). Every later rerun trains the baseline's configuration with the baseline's
seeds and is tested against it, never against the previous rerun: the test set is the same every
time, so what varies is the training seed. Verdicts: ``reproduced`` (test predictions bitwise the
baseline's), ``consistent`` (the numbers moved, not significantly; the record lists what changed
in the provenance), ``drift`` (the permutation test's p ≤ alpha, exit 3). A study that now selects
another configuration is ``selection_changed``: never drift; that configuration gets a baseline of
its own, frozen by that rerun.
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

import numpy as np
import optuna

from pipeline import device as devices
from pipeline import files, tracking
from pipeline.config import StudyConfig
from pipeline.data import Split, load_split
from pipeline.errors import UsageError
from pipeline.ops.drift import (
    Verdict,
    compare,
    describe_test,
    environment,
    exact_interval,
    freeze,
    predictions_digest,
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
    current_baseline,
    load_history,
    load_predictions,
    params_text,
    predictions_name,
    record_rerun_looks,
    save_history,
    save_predictions,
)
from pipeline.report.study_page import regenerate
from pipeline.seeds import derive_seed
from pipeline.signals import signal_in, stop_on_signals
from pipeline.storage import open_storage, preflight, ranked_trials, redact, storage_spec
from pipeline.study.run import run_study

EXIT_OK = 0  # ran: reproduced, consistent, a baseline frozen, or the selection changed (new baseline)


EXIT_FAILED = 1  # an error or a signal stopped the rerun; see rerun.log; no record was added


EXIT_USAGE = 2  # bad study file, data or history file (the message says which and how to fix it)


EXIT_DRIFT = 3  # ran, and the replicates differ significantly from the baseline's (p <= alpha)


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
    verdict: Verdict
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
    rebaseline: bool = False,
) -> RerunOutcome:
    """One rerun under the study's lock; raises ``RerunLocked`` if another one is running.

    ``rebaseline``: freeze a new baseline from this rerun instead of testing against the old one.
    """
    folder = reports_root / cfg.name
    # the study's own checks, before the lock, the log or the journal exist: a store that does not
    # answer or a folder that refuses writes is one line and exit 2, with nothing written
    uri = tracking.tracking_uri(tracking_uri)
    preflight(cfg.name, storage_spec(cfg, storage), uri, reports_root)
    tracking.check_reachable(uri)
    with study_lock(folder), _file_log(folder / LOG_FILE):
        return _rerun(cfg, folder, storage, tracking_uri, reports_root, trials, progress, now, rebaseline)


def _rerun(
    cfg, folder, storage, tracking_uri, reports_root, trials, progress, now, rebaseline
) -> RerunOutcome:
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
    base_index = current_baseline(history)
    base = history[base_index] if base_index is not None else None
    reason = _freeze_reason(history, base, best.params, rebaseline)
    seeds = rerun_seeds(cfg) if reason or base is None else tuple(base["seeds"])
    if not reason and seeds != rerun_seeds(cfg):
        log.info(
            "[rerun] seeds and first_seed give the seeds %s, but baseline #%d froze %s: those are used "
            "(pipeline rerun --rebaseline adopts the file's)",
            list(rerun_seeds(cfg)),
            base_index,
            list(seeds),
        )

    # (2) retrain the selection once per replicate seed
    device = devices.resolve(cfg.training.device)
    devices.set_precision(cfg.training.precision)
    split = load_split(cfg.dataset).to(device)
    mlflow = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(mlflow, cfg.name)
    prov = {**tracking.provenance(device), **environment()}
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
        record_rerun_looks(folder, date, len(seeds))  # the ledger first: these networks will see the test set
        results, logits = retrain(cfg, split, best.params, seeds)
        for res in results:
            log.info(
                "seed %d: test error %.4f (%d/%d), %s",
                res.seed,
                res.test_error,
                res.test_k,
                res.test_m,
                res.outcome,
            )

        # (3) record, judge against the baseline, keep the history
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
            "test_k": [r.test_k for r in results],
            "val_accs": [r.val_acc for r in results],
            "seed_clopper_pearson": [list(r.clopper_pearson) for r in results],
            "diverged_seeds": [r.seed for r in results if r.outcome != "completed"],
            **summarize_seeds(results, confidence),
            "predictions_sha256": predictions_digest(logits),
            "split_hash": split.split_hash,
            "config_hash": cfg.config_hash(),
            "provenance": prov,
            "test": describe_test(len(seeds)),
            "alpha_family": cfg.rerun.alpha,
            "alpha_spending": cfg.rerun.alpha_spending,
            "planned": cfg.rerun.planned,
        }
        alpha = cfg.rerun.alpha_per_rerun
        if reason:
            verdict = freeze(reason, alpha, base, base_index, record)
            record["predictions_file"] = predictions_name(len(history))
            save_predictions(folder / record["predictions_file"], logits, seeds)
        else:
            comparison = 1 + sum(r.get("baseline") == base_index for r in history)
            stored = load_predictions(folder / base.get("predictions_file", ""))
            if stored is None:
                log.warning(
                    "baseline #%d's predictions (%s) are missing or unreadable: reproduced is judged "
                    "by their recorded SHA-256 digests alone",
                    base_index,
                    folder / base.get("predictions_file", ""),
                )
            rng = np.random.default_rng(derive_seed(seeds[0], "rerun-permutation", base_index, comparison))
            verdict = compare(base, base_index, record, logits, stored, cfg.rerun, comparison, rng)
        record |= verdict.to_dict()
        history.append(record)
        save_history(history_path, history)
        plot_reruns(history, folder / PLOT_FILE)
        _log_run(mlflow, run_id, record, results, folder)
        status = "FINISHED"
    finally:
        mlflow.set_terminated(run_id, status)
    try:  # the study page gets the new record in its Reruns section; the record is kept regardless
        regenerate(cfg, storage=storage, tracking_uri=tracking_uri, reports_root=reports_root)
    except Exception as exc:
        log.warning("study page not refreshed (%s); `pipeline report` rebuilds it", exc)
    log.info("%s", summary_line(record))
    return RerunOutcome(record, verdict, history_path, run_id)


def _freeze_reason(history, base, params, rebaseline: bool) -> str:
    """Why this rerun freezes a new baseline ("" when it is tested against the one in force)."""
    if base is None:
        return "first rerun" if not history else "the history's records predate baselines"
    if dict(base["selected_params"]) != dict(params):
        return "the selected configuration changed"
    return "--rebaseline" if rebaseline else ""


def _n_trials(spec: str, name: str) -> int:
    if "://" not in spec and not Path(spec).exists():  # no journal yet: run_study creates it after its checks
        return 0
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


def _log_run(mlflow, run_id: str, record: dict[str, Any], results, folder: Path) -> None:
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
        "alpha": record["alpha"],
        "drift": float(record["verdict"] == "drift"),
        "selection_changed": float(record["verdict"] == "selection_changed"),
    }
    if record["p_value"] is not None:
        metrics["p_value"] = record["p_value"]
    if record["reproduced"] is not None:
        metrics["reproduced"] = float(record["reproduced"])
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
        "alpha_spending": record["alpha_spending"],
    }
    tags = {
        "verdict": record["verdict"],
        "drift": str(record["verdict"] == "drift").lower(),
        "verdict_reasons": "; ".join(record["reasons"]) or "none",
        "baseline": "none" if record["baseline"] is None else str(record["baseline"]),
        "froze_baseline": str(record["froze_baseline"]).lower(),
    }
    tracking.log(mlflow, run_id, params=params, metrics=metrics, tags=tags)
    for r in results:  # one point per seed, the seed as the step
        tracking.log(mlflow, run_id, metrics={"seed_test_error": r.test_error}, step=r.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rerun.json"
        files.write_json(path, record)
        mlflow.log_artifact(run_id, str(path))
    mlflow.log_artifact(run_id, str(folder / PLOT_FILE))
    if record.get("predictions_file"):
        mlflow.log_artifact(run_id, str(folder / record["predictions_file"]))


def summary_line(record: Mapping[str, Any]) -> str:
    """One line a cron mail or a log reader can act on."""
    low, high = record["test_error_clopper_pearson"]
    head = (
        f"rerun {record['study']} {record['date']}: trial {record['selected_trial']} "
        f"({params_text(record['selected_params'])}), test error {record['test_error_mean']:.4f} "
        f"± {record['test_error_std']:.4f} over {len(record['seeds'])} seeds "
        f"[{record['test_error_min']:.4f}, {record['test_error_max']:.4f}], exact "
        f"{record['confidence']:.0%} [{low:.4f}, {high:.4f}]; {record['new_trials']} new trials"
    )
    verdict, reasons = record["verdict"], "; ".join(record["reasons"])
    changed = "; ".join(record["changes"])
    if verdict == "selection_changed":
        return (
            f"{head}; SELECTION CHANGED: {reasons} (not drift: the next reruns are tested against "
            f"this one); changed: {changed or 'nothing in the provenance'}"
        )
    if verdict == "baseline":
        return (
            f"{head}; baseline frozen ({record['baseline_reason']}): later reruns are tested against "
            f"these {len(record['seeds'])} replicates at alpha = {record['alpha']:.3g}"
        )
    against = f"baseline #{record['baseline']}"
    if verdict == "reproduced":
        return f"{head}; reproduced {against}: {reasons}"
    changed = f"; changed since it: {changed}" if changed else "; nothing changed in the provenance"
    if verdict == "consistent":
        return f"{head}; consistent with {against}: {reasons}{changed}"
    return f"{head}; DRIFT from {against}: {reasons}{changed}"


def rerun_main(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    trials: int | None = None,
    reports_root: Path = Path("reports"),
    rebaseline: bool = False,
) -> int:
    """``pipeline rerun``: run once, print one summary line, return an ``EXIT_*`` code.

    Config, data and study errors propagate (the command line prints them, exit 2); they and
    every other failure are written to ``rerun.log`` first, so a cron user finds them there, except
    what the checks before the lock find (a tracking store that does not answer, an unwritable
    output folder): those write nothing, ``rerun.log`` included, and show on stderr (cron.log).
    """
    folder = reports_root / cfg.name
    with stop_on_signals():
        try:
            outcome = run_rerun(
                cfg,
                storage=storage,
                tracking_uri=tracking_uri,
                reports_root=reports_root,
                trials=trials,
                rebaseline=rebaseline,
            )
        except RerunLocked as exc:
            with _file_log(folder / LOG_FILE):
                log.warning("skipped: %s", exc)
            print(f"rerun {cfg.name}: skipped: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        except RerunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except UsageError:  # config, data, device and study errors: the command line says which, exit 2
            raise
        except (Exception, KeyboardInterrupt) as exc:
            stop = signal_in(exc)
            if stop is not None:  # the command line prints the one stop line and exits 143 / 130
                raise stop from None
            print(
                f"error: rerun of {cfg.name} failed: {exc!r}; details in {folder / LOG_FILE}", file=sys.stderr
            )
            return EXIT_FAILED
    print(summary_line(outcome.record))
    return EXIT_DRIFT if outcome.verdict.drift else EXIT_OK


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
        log.error("rerun failed: %r", exc, exc_info=not isinstance(exc, (RerunError, UsageError)))
        raise
    finally:
        log.setLevel(previous_level)
        for h in handlers:
            log.removeHandler(h)
            h.close()
