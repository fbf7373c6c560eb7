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
import dataclasses
import datetime as dt
import fcntl
import html
import json
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.figure import Figure

from pipeline import bounds, files, report, tracking
from pipeline.config import ConfigError, StudyConfig
from pipeline.data import DataError, Split, load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.signals import signal_in, stop_on_signals
from pipeline.storage import StudyError, open_storage, storage_spec
from pipeline.study import run_study
from pipeline.train import DTYPES, Hyper, train

EXIT_OK = 0  # ran; no drift (or the first rerun: nothing to compare with)
EXIT_FAILED = 1  # an error or a signal stopped the rerun; see rerun.log; no record was added
EXIT_USAGE = 2  # bad study file, data or history file (the message says which and how to fix it)
EXIT_DRIFT = 3  # ran and drift was detected against the previous rerun
EXIT_LOCKED = 4  # another rerun of this study holds the lock; nothing was done

LOCK_FILE = "rerun.lock"
LOG_FILE = "rerun.log"
HISTORY_FILE = "reruns.json"
PLOT_FILE = "reruns.png"
HISTORY_VERSION = 1
_EPS = 1e-12  # float slack when testing whether a mean lies inside a recorded interval

log = logging.getLogger("pipeline.rerun")


class RerunError(RuntimeError):
    """A rerun that cannot proceed as asked (corrupt history, nothing to retrain)."""


class RerunLocked(RuntimeError):
    """Another process holds this study's rerun lock."""


# ----------------------------------------------------------------------------------------------
# Lock


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


# ----------------------------------------------------------------------------------------------
# Retraining the selected configuration


@dataclass(frozen=True)
class SeedResult:
    """One retrained model of the selected configuration."""

    seed: int  # training seed: weight init and batch order
    test_error: float
    test_k: int  # test errors out of test_m
    test_m: int
    val_acc: float
    clopper_pearson: tuple[float, float]  # exact interval of this model's test error
    outcome: str  # "completed" or the divergence message


def rerun_seeds(cfg: StudyConfig) -> tuple[int, ...]:
    """The fixed training seeds of a rerun: ``first_seed``, ``first_seed + 1``, …"""
    return tuple(range(cfg.rerun.first_seed, cfg.rerun.first_seed + cfg.rerun.seeds))


def rerun_trials(cfg: StudyConfig, override: int | None = None) -> int:
    """Trial target of a rerun: the command line, else ``[rerun] trials``, else the study's ``trials``."""
    return override or cfg.rerun.trials or cfg.trials


def retrain(cfg: StudyConfig, split: Split, params: Mapping[str, Any], seed: int) -> SeedResult:
    """Train the trial's params from scratch with training seed ``seed``, then test the model.

    The model follows the trial's own (``study.begin_trial``): a searched ``hidden`` is one layer
    of that width, a searched ``activation`` replaces the file's.
    """
    hidden = (params["hidden"],) if "hidden" in params else cfg.model.hidden
    activation = params.get("activation", cfg.model.activation)
    training = dataclasses.replace(cfg.training, seed=seed)
    model = build_mlp(split.input_dim, hidden, activation, seed, dtype=DTYPES[training.dtype])
    hyper = Hyper(params["lr"], params["momentum"], params["weight_decay"])
    result = train(model, split, hyper, training)
    val = evaluate(model, split.x_val, split.y_val, split.classes, training.loss)
    test = evaluate(model, split.x_test, split.y_test, split.classes, training.loss)
    err = bounds.analyse_errors(
        test.errors, cfg.bounds.confidence, np.random.default_rng(seed), n_resamples=999
    )
    exact = next(iv for iv in err.intervals if iv.method == "clopper_pearson")
    return SeedResult(seed, test.error, err.k, err.m, val.accuracy, (exact.low, exact.high), result.outcome)


def exact_interval(k: int, m: int, confidence: float) -> tuple[float, float]:
    """Clopper–Pearson interval for ``k`` errors out of ``m`` (the bounds stage's formula)."""
    low, high = bounds.count_intervals(k, m, confidence)["clopper_pearson"]
    return float(low), float(high)


def summarize_seeds(results: Sequence[SeedResult], confidence: float) -> dict[str, Any]:
    """Mean, spread and exact interval of the retrained models' test errors.

    Diverged retrains are listed but left out of the statistics. The exact interval is the
    Clopper–Pearson interval at the mean error count (k̄ rounded, out of m): the test-set sampling
    uncertainty of a model with the mean error, which a later rerun's mean is checked against.
    """
    good = [r for r in results if r.outcome == "completed"]
    if not good:
        raise RerunError(
            "every retrained seed diverged; the selected configuration is unstable — "
            "lower the search range of lr or check the study"
        )
    errors = np.array([r.test_error for r in good])
    m = good[0].test_m
    mean_k = float(np.mean([r.test_k for r in good]))
    return {
        "test_m": m,
        "test_error_mean": float(errors.mean()),
        "test_error_std": float(errors.std(ddof=1)) if len(errors) > 1 else float("nan"),
        "test_error_min": float(errors.min()),
        "test_error_max": float(errors.max()),
        "test_error_clopper_pearson": list(exact_interval(round(mean_k), m, confidence)),
    }


# ----------------------------------------------------------------------------------------------
# Drift


@dataclass(frozen=True)
class Drift:
    """How a rerun compares with the one before it."""

    compared_with: str | None  # date of the previous rerun; None for the first rerun
    selection_changed: bool  # the selected params differ
    outside_interval: bool  # mean test error outside the previous rerun's exact interval
    outside_spread: bool  # mean test error outside the previous rerun's [min, max] across seeds
    reasons: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()  # provenance that changed (commit, versions, split, config)

    @property
    def detected(self) -> bool:
        return self.selection_changed or self.outside_interval or self.outside_spread

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "detected": self.detected}


def _inside(x: float, low: float, high: float) -> bool:
    return low - _EPS <= x <= high + _EPS


def detect_drift(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> Drift:
    """Compare two rerun records (as stored in ``reruns.json``); ``previous`` None → no drift."""
    if previous is None:
        return Drift(None, False, False, False)
    mean = current["test_error_mean"]
    low, high = previous["test_error_clopper_pearson"]
    lo_spread, hi_spread = previous["test_error_min"], previous["test_error_max"]
    selection = dict(previous["selected_params"]) != dict(current["selected_params"])
    interval = not _inside(mean, low, high)
    spread = not _inside(mean, lo_spread, hi_spread)
    reasons = []
    if selection:
        reasons.append(
            f"selected configuration changed: trial {previous['selected_trial']} "
            f"{_params_text(previous['selected_params'])} → trial {current['selected_trial']} "
            f"{_params_text(current['selected_params'])}"
        )
    if interval:
        reasons.append(
            f"mean test error {mean:.4f} is outside the previous rerun's exact "
            f"{previous['confidence']:.0%} interval [{low:.4f}, {high:.4f}]"
        )
    if spread:
        reasons.append(
            f"mean test error {mean:.4f} is outside the previous rerun's across-seed range "
            f"[{lo_spread:.4f}, {hi_spread:.4f}]"
        )
    return Drift(
        previous.get("date"), selection, interval, spread, tuple(reasons), _changes(previous, current)
    )


def _changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, ...]:
    notes = []
    for key in ("split_hash", "config_hash", "seeds", "trials_target"):
        if previous.get(key) != current.get(key):
            notes.append(f"{key}: {previous.get(key)} → {current.get(key)}")
    old, new = previous.get("provenance", {}), current.get("provenance", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            notes.append(f"{key}: {old.get(key)} → {new.get(key)}")
    return tuple(notes)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ----------------------------------------------------------------------------------------------
# History


def load_history(path: Path) -> list[dict[str, Any]]:
    """The records of earlier reruns, oldest first ([] when there is no history yet)."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["reruns"]
        if data.get("version") != HISTORY_VERSION or not isinstance(records, list):
            raise ValueError(f"expected version {HISTORY_VERSION} with a list of reruns")
    except (ValueError, KeyError, TypeError) as exc:
        raise RerunError(
            f"{path}: not a rerun history ({exc}); move it aside to start a new history "
            "(the MLflow runs tagged rerun=true keep every earlier record)"
        ) from None
    return records


def save_history(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write the whole history through a temporary file and a rename."""
    files.write_json(path, {"version": HISTORY_VERSION, "reruns": list(records)})


# ----------------------------------------------------------------------------------------------
# One rerun


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
    log.info("rerun of %s (%s) started: trial target %d, storage %s", cfg.name, cfg.path, target, spec)
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
    try:
        best = study.best_trial  # by the validation objective: the test set never selects
    except ValueError:
        raise RerunError(f"study {cfg.name!r} has no completed trial to retrain") from None

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
        from pipeline.study_report import regenerate

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
        f"({_params_text(record['selected_params'])}), test error {record['test_error_mean']:.4f} "
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


# ----------------------------------------------------------------------------------------------
# Command edge


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


# ----------------------------------------------------------------------------------------------
# For the study page


def plot_reruns(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Mean test error per rerun with its exact interval and across-seed range; drift in red.

    Written to a temporary file and renamed, like every other report file.
    """
    dates = [r["date"][:16].replace("T", " ") for r in history]
    x = np.arange(len(history))
    mean = np.array([r["test_error_mean"] for r in history])
    low = np.array([r["test_error_clopper_pearson"][0] for r in history])
    high = np.array([r["test_error_clopper_pearson"][1] for r in history])
    smin = np.array([r["test_error_min"] for r in history])
    smax = np.array([r["test_error_max"] for r in history])
    drift = np.array([bool(r.get("drift", {}).get("detected")) for r in history])
    fig = Figure(figsize=(max(5.5, 0.8 * len(history) + 3), 3.8))
    ax = fig.add_subplot()
    ax.vlines(x, low, high, color="0.55", lw=1.2, label="exact interval")
    ax.vlines(x, smin, smax, color="tab:blue", lw=5, alpha=0.45, label="range across seeds")
    ax.plot(x[~drift], mean[~drift], "o", color="tab:blue", label="mean test error")
    if drift.any():
        ax.plot(x[drift], mean[drift], "o", color="tab:red", ms=9, label="drift")
    selected = [r.get("selected_test_error") for r in history]
    if any(v is not None for v in selected):
        ax.plot(x, [np.nan if v is None else v for v in selected], "x", color="0.3", label="selected trial")
    ax.set_xticks(x, dates, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test error")
    ax.set_title(f"{history[-1]['study']}: reruns (confidence {history[-1]['confidence']:.0%})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return files.save_figure(fig, path)


def rerun_section_html(reports_dir: Path) -> str | None:
    """The study page's "Reruns" section for ``reports/<study>/``; None when it was never rerun."""
    try:
        history = load_history(Path(reports_dir) / HISTORY_FILE)
    except RerunError as exc:
        return f"<p class='bad'>{html.escape(str(exc))}</p>"
    if not history:
        return None
    rows = []
    for r in history:
        d = r.get("drift", {})
        status = "first" if d.get("compared_with") is None else ("DRIFT" if d.get("detected") else "no drift")
        low, high = r["test_error_clopper_pearson"]
        rows.append(
            (
                r["date"],
                r["selected_trial"],
                _params_text(r["selected_params"]),
                r["test_error_mean"],
                r["test_error_std"],
                f"{r['test_error_min']:.4f}–{r['test_error_max']:.4f}",
                f"[{low:.4f}, {high:.4f}]",
                r["new_trials"],
                status + (": " + "; ".join(d.get("reasons", ())) if d.get("detected") else ""),
                "; ".join(d.get("changes", ())),
            )
        )
    last = history[-1]
    latest = last.get("drift", {})
    verdict = (
        "<span class='bad'>drift detected</span>"
        if latest.get("detected")
        else "<span class='good'>no drift</span>"
        if latest.get("compared_with")
        else "first rerun"
    )
    intro = (
        f"<p>{len(history)} reruns; the latest ({html.escape(last['date'])}): {verdict}. Each rerun "
        f"retrains the selected configuration (best by validation) with the training seeds "
        f"{', '.join(map(str, last['seeds']))} and tests every model. Drift: the selection changed, or "
        f"the mean test error left the previous rerun's exact {last['confidence']:.0%} interval "
        "(Clopper–Pearson at the mean error count) or its range across seeds.</p>"
    )
    with tempfile.TemporaryDirectory() as tmp:
        figure = report.image_html(plot_reruns(history, Path(tmp) / PLOT_FILE), "test error over reruns")
    header = (
        "date",
        "trial",
        "params",
        "mean test error",
        "std",
        "min–max",
        "exact interval",
        "new trials",
        "drift",
        "changed since previous",
    )
    return intro + figure + report.table_html(rows[::-1], header)
