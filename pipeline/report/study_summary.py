"""What the study page says, as numbers: the trials, the selection, the comparison, the bounds.

Read from the Optuna storage and each trial's ``metrics.json`` / ``test_predictions.json`` (its
report folder, else its MLflow run); nothing is retrained. ``summarize_study`` gives every number
the page shows, also written as ``study_summary.json`` and logged to the parent run.

With K ≥ 2 training seeds per trial (``[training] seeds``) it also says which configurations the
selected one is statistically tied with (``compare.tied_set``) and compares it with the runner-up
across seeds (``compare.seed_paired_difference``); a trial from before seed replicates counts as
K = 1, its value the one seed's objective.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from pipeline import tracking
from pipeline.compare import (
    PairedComparison,
    SeedComparison,
    TiedRow,
    bonferroni_clopper_pearson,
    compare_paired,
    seed_paired_difference,
    smallest_resolvable_difference,
    tied_set,
    union_hoeffding_epsilon,
)
from pipeline.config import StudyConfig
from pipeline.storage import ranked_trials, trial_counts

STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


NO_REASON = "no reason recorded (see the worker's log)"


@dataclass(frozen=True)
class TrialOutputs:
    """What a complete trial left behind: its metrics.json and its paired test predictions."""

    number: int
    metrics: dict[str, Any]
    labels: np.ndarray | None
    predictions: np.ndarray | None
    classes: tuple[str, ...]

    @property
    def errors(self) -> np.ndarray | None:
        if self.labels is None or self.predictions is None:
            return None
        return (self.labels != self.predictions).astype(np.uint8)

    @property
    def m(self) -> int:
        return int(self.metrics["test_m"])

    @property
    def k(self) -> int:
        return int(self.metrics["test_k"])


def objective_seeds(trial: FrozenTrial) -> list[float]:
    """Each replicate's validation objective; a trial from before seed replicates has one, its value."""
    seeds = trial.user_attrs.get("objective_seeds")
    return [float(v) for v in seeds] if seeds else [float(trial.value)]


def test_error_seeds(trial: FrozenTrial) -> list[float]:
    """Each replicate's test error; one (``test_error``) before seed replicates, none if untested."""
    seeds = trial.user_attrs.get("test_error_seeds")
    if seeds:
        return [float(v) for v in seeds]
    return [float(trial.user_attrs["test_error"])] if "test_error" in trial.user_attrs else []


def trial_state(trial: FrozenTrial) -> str:
    return STATE_NAMES.get(trial.state, trial.state.name.lower())


def trial_reason(trial: FrozenTrial, run_reason: str | None = None) -> str:
    """Why a trial did not complete: the study's recorded reason, its MLflow run's, else a pointer."""
    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
        return ""
    return str(trial.user_attrs.get("reason") or run_reason or NO_REASON)


def run_reasons(study: optuna.Study, mlflow) -> dict[int, str]:
    """``reason`` tags of MLflow runs of trials Optuna holds no reason for (e.g. a dead worker's)."""
    found = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.PRUNED)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if mlflow is not None and run_id and not t.user_attrs.get("reason"):
            try:
                reason = mlflow.get_run(run_id).data.tags.get("reason")
            except Exception:  # a run deleted from MLflow: the page says no reason was recorded
                reason = None
            if reason:
                found[t.number] = reason
    return found


def trials_frame(
    study: optuna.Study,
    cfg: StudyConfig,
    page_dir: Path | None = None,
    reasons: dict[int, str] | None = None,
) -> pd.DataFrame:
    """One row per trial, straight from the Optuna storage (number order).

    ``reasons``: fallbacks for trials whose reason Optuna lacks (see ``run_reasons``).
    """
    reasons = reasons or {}
    rows = []
    for t in study.get_trials(deepcopy=False):
        epochs = t.user_attrs.get("epochs_run", len(t.intermediate_values) or pd.NA)
        curve = (
            [v for v in t.intermediate_values.values() if math.isfinite(v)]
            if cfg.objective == "val_acc"
            else []
        )
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else math.nan
        )
        link = f"trial-{t.number:04d}/report.html"
        row = {
            "number": t.number,
            "state": trial_state(t),
            "reason": trial_reason(t, reasons.get(t.number)),
            **{key: t.params.get(key, math.nan) for key in cfg.search},
            "epochs_run": epochs,
            "val_acc": t.user_attrs.get("val_acc", math.nan),
            "best_val_acc": max(curve) if curve else math.nan,
            "test_error": t.user_attrs.get("test_error", math.nan),
            "test_error_clopper_pearson_low": t.user_attrs.get("test_error_clopper_pearson_low", math.nan),
            "test_error_clopper_pearson_high": t.user_attrs.get("test_error_clopper_pearson_high", math.nan),
            "duration_s": duration,
            "report": link if page_dir is not None and (page_dir / link).is_file() else "",
        }
        rows.append(row)
    columns = ["number", "state", "reason", *cfg.search, "epochs_run", "val_acc", "best_val_acc"]
    columns += ["test_error", "test_error_clopper_pearson_low", "test_error_clopper_pearson_high"]
    frame = pd.DataFrame(rows, columns=[*columns, "duration_s", "report"])
    return frame.astype({"number": "int64", "epochs_run": "Int64"})


def load_outputs(
    trial: FrozenTrial, page_dir: Path, classes: tuple[str, ...], mlflow=None
) -> TrialOutputs | None:
    """The trial's metrics.json and test_predictions.json: its report folder, else its MLflow run."""
    folders = [page_dir / f"trial-{trial.number:04d}"]
    if trial.user_attrs.get("report"):
        folders.append(Path(trial.user_attrs["report"]).parent)
    for folder in folders:
        if (folder / "metrics.json").is_file():
            return _read_outputs(trial.number, folder, classes)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if mlflow is None or not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        # an older run has no predictions; a run that lost its artifacts has no metrics.json either
        if tracking.download_artifact(mlflow, run_id, "metrics.json", tmp) is None:
            return None
        tracking.download_artifact(mlflow, run_id, "test_predictions.json", tmp)
        return _read_outputs(trial.number, Path(tmp), classes)


def _read_outputs(number: int, folder: Path, classes: tuple[str, ...]) -> TrialOutputs:
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    labels = predictions = None
    path = folder / "test_predictions.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        labels, predictions = np.asarray(data["labels"]), np.asarray(data["predictions"])
        classes = tuple(data.get("classes", classes))
    return TrialOutputs(number, metrics, labels, predictions, tuple(classes))


@dataclass(frozen=True)
class StudySummary:
    name: str
    objective: str
    confidence: float
    counts: dict[str, int]
    n_tested: int  # trials whose test error was computed
    m: int | None  # test-set size
    selected: int | None
    runner_up: int | None
    comparison: PairedComparison | None  # McNemar on one network each (replicate 0 when K > 1)
    metrics: dict[str, float]  # study-level numbers, also logged to the parent run
    notes: tuple[str, ...]
    replicates: int | None = None  # K: the selected trial's training seeds
    tied: tuple[TiedRow, ...] | None = None  # every other complete trial with ≥ 2 seeds; None: K < 2
    left_out: tuple[int, ...] = ()  # complete trials with one seed, which no test can tie or separate
    seed_comparison: SeedComparison | None = None  # against the runner-up, paired by seed
    test_looks: int = 0  # the ledger: networks evaluated on this test set (trials' replicates, reruns)
    rerun_looks: int = 0  # of which the reruns' retrains

    def to_dict(self) -> dict[str, Any]:
        nested = ("comparison", "tied", "seed_comparison")
        data = {k: v for k, v in self.__dict__.items() if k not in nested}
        data["tied"] = None if self.tied is None else [dataclasses.asdict(row) for row in self.tied]
        data["seed_comparison"] = (
            None if self.seed_comparison is None else dataclasses.asdict(self.seed_comparison)
        )
        if self.comparison is not None:
            c = self.comparison
            data["comparison"] = {
                "table": c.table,
                "p_value": c.p_value,
                "difference": c.difference,
                "low": c.low,
                "high": c.high,
                "verdict": c.verdict,
            }
        return data


def test_set_looks(trials) -> int:
    """Networks the trials evaluated on the test set, in any state: each trial's ``test_looks``,
    recorded when it tested (older trials: one per seed replicate of a trial with a test error)."""
    looks = 0
    for t in trials:
        if isinstance(t.user_attrs.get("test_looks"), int):
            looks += t.user_attrs["test_looks"]
        elif "test_error" in t.user_attrs:
            k = t.user_attrs.get("replicates", 1)
            looks += k if isinstance(k, int) and k >= 1 else 1
    return looks


def summarize_study(
    study: optuna.Study, cfg: StudyConfig, outputs: dict[int, TrialOutputs], rerun_looks: int = 0
) -> StudySummary:
    """The study's numbers; ``rerun_looks``: networks the reruns retrained and tested on the same
    test set (the ledger: ``test_looks`` counts every network that saw it, and the simultaneous
    bounds run over that many)."""
    confidence = cfg.bounds.confidence
    delta = 1 - confidence
    trials = study.get_trials(deepcopy=False)
    c = trial_counts(study)
    counts = {
        "complete": c.complete,
        "pruned": c.pruned,
        "failed": c.fail,
        "running": c.running,
        "waiting": c.waiting,
    }
    ranked = ranked_trials(study)
    n_tested = sum("test_error" in t.user_attrs for t in trials)
    test_looks = test_set_looks(trials) + rerun_looks
    notes: list[str] = []
    metrics: dict[str, float] = {}
    selected = ranked[0] if ranked else None
    runner = ranked[1] if len(ranked) > 1 else None
    sel_out = outputs.get(selected.number) if selected else None
    m = sel_out.m if sel_out else next((o.m for o in outputs.values()), None)
    metrics["test_looks"] = test_looks
    if selected is not None and sel_out is not None and test_looks:
        low, high = bonferroni_clopper_pearson(sel_out.k, sel_out.m, delta, test_looks)
        metrics["selected_test_error_bonferroni_low"] = low
        metrics["selected_test_error_bonferroni_high"] = high
        metrics["union_hoeffding_epsilon"] = union_hoeffding_epsilon(sel_out.m, delta, test_looks)
        metrics["selected_val_test_gap"] = sel_out.metrics["test_error"] - (1 - sel_out.metrics["val_acc"])
    elif selected is not None:
        notes.append(f"trial {selected.number}'s metrics.json was found neither in its folder nor in MLflow")
    comparison = None
    if selected is not None and runner is not None:
        a, b = sel_out, outputs.get(runner.number)
        if a is None or b is None or a.errors is None or b.errors is None:
            notes.append(
                f"the paired test predictions (test_predictions.json) of trial {selected.number} or "
                f"{runner.number} were found neither in their folders nor in their MLflow runs (trials "
                "run before the file was added lack it): no McNemar comparison"
            )
        elif a.errors.shape != b.errors.shape or not np.array_equal(a.labels, b.labels):
            notes.append(f"trials {selected.number} and {runner.number} were tested on different test sets")
        else:
            comparison = compare_paired(a.errors, b.errors, confidence)
            metrics["runner_up_mcnemar_p_value"] = comparison.p_value
            metrics["runner_up_error_difference"] = comparison.difference
            metrics["runner_up_error_difference_low"] = comparison.low
            metrics["runner_up_error_difference_high"] = comparison.high
            metrics["smallest_resolvable_difference"] = smallest_resolvable_difference(
                comparison.n_discordant, comparison.m, delta
            )
    replicates = len(objective_seeds(selected)) if selected else None
    tied, left_out, seed_cmp = None, (), None
    if replicates is not None and replicates >= 2:
        tied, left_out, seed_cmp, seed_metrics, seed_notes = _across_seeds(ranked, delta, confidence)
        metrics.update(seed_metrics)
        notes.extend(seed_notes)
    return StudySummary(
        cfg.name,
        cfg.objective,
        confidence,
        counts,
        n_tested,
        m,
        selected.number if selected else None,
        runner.number if runner else None,
        comparison,
        metrics,
        tuple(notes),
        replicates,
        tied,
        left_out,
        seed_cmp,
        test_looks,
        rerun_looks,
    )


def _across_seeds(ranked: list[FrozenTrial], delta: float, confidence: float):
    """The tied set and the seed-paired runner-up comparison of a selected trial with K ≥ 2 seeds.

    (tied rows, trials left out for having one seed, the comparison or None, metrics, notes).
    """
    selected, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    k = len(objective_seeds(selected))
    others = {t.number: objective_seeds(t) for t in ranked[1:]}
    left_out = tuple(n for n, seeds in others.items() if len(seeds) < 2)
    tied = tuple(tied_set(objective_seeds(selected), {n: s for n, s in others.items() if len(s) >= 2}, delta))
    metrics: dict[str, float] = {"tied_set_size": sum(row.tied for row in tied)}
    notes = []
    if left_out:
        one = len(left_out) == 1
        notes.append(
            f"the tied set leaves out trial{'' if one else 's'} {', '.join(map(str, left_out))} (one "
            f"seed{'' if one else ' each'}: run before [training] seeds was set)"
        )
    seed_cmp = None
    if runner is not None:
        a, b = test_error_seeds(selected), test_error_seeds(runner)
        if len(objective_seeds(runner)) != k:
            notes.append(
                f"trial {runner.number} (the runner-up) has {len(objective_seeds(runner))} seeds and trial "
                f"{selected.number} has {k}: no comparison paired by seed"
            )
        elif len(a) != k or len(b) != k:
            notes.append(
                f"trials {selected.number} and {runner.number} do not both hold {k} per-seed test errors: "
                "no comparison paired by seed"
            )
        else:
            seed_cmp = seed_paired_difference(a, b, confidence)
            metrics["runner_up_seed_difference"] = seed_cmp.difference
            metrics["runner_up_seed_difference_low"] = seed_cmp.low
            metrics["runner_up_seed_difference_high"] = seed_cmp.high
    return tied, left_out, seed_cmp, metrics, notes
