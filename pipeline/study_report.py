"""Study page: ``reports/<study>/index.html``, rebuilt from Optuna storage and MLflow alone.

It answers "which configuration, how sure, and is the winner really better" without over-claiming:
the selected trial is the best by the validation objective (never by test); its test error comes
with every interval of the bounds stage; the runner-up comparison is one exact McNemar test on the
paired test predictions; and anyone reading test errors across all N trials gets simultaneous
(Bonferroni / union-bound) intervals, since picking the best of N on one set is optimistic
(Cawley & Talbot 2010). Nothing is retrained: each trial's ``metrics.json`` and
``test_predictions.json`` are read from its report folder or, failing that, its MLflow run.

The page carries no wall-clock time, so regenerating it from the same storage gives the same bytes.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from pipeline import bounds, files, report, tracking
from pipeline.config import StudyConfig
from pipeline.evaluate import Evaluation, summarize
from pipeline.signals import signal_in
from pipeline.storage import StudyError, open_storage, redact, storage_spec

PAGE = "index.html"
FOLDER = "study"  # figures, trials.csv and study_summary.json, beside index.html
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
NO_REASON = "no reason recorded (see the worker's log)"


class StudyPageWarning(UserWarning):
    """The study page could not be written; the study's trials are unaffected."""


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same test points: model A (selected) against model B (runner-up)."""

    table: np.ndarray  # 2×2 counts; rows A wrong / right, columns B wrong / right
    p_value: float  # exact two-sided McNemar
    difference: float  # error(A) − error(B); negative means A makes fewer errors
    low: float  # Newcombe interval for the difference
    high: float
    confidence: float
    verdict: str  # "better" | "worse" | "indistinguishable at this test size"

    @property
    def m(self) -> int:
        return int(self.table.sum())

    @property
    def n_discordant(self) -> int:
        return int(self.table[0, 1] + self.table[1, 0])


def paired_table(errors_a: np.ndarray, errors_b: np.ndarray) -> np.ndarray:
    """2×2 counts of two 0/1 error vectors on the same points: rows A wrong/right, columns B wrong/right."""
    a = np.asarray(errors_a).astype(bool)
    b = np.asarray(errors_b).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired errors must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    return np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)


def paired_difference_interval(table: np.ndarray, confidence: float) -> tuple[float, float]:
    """Newcombe's (1998, method 10) square-and-add interval for p1 − p2 from a paired 2×2 table.

    p1 = (t00 + t01)/n and p2 = (t00 + t10)/n, so p1 − p2 = (t01 − t10)/n. Wilson score limits for
    each proportion are combined with the phi correlation of the pairs (its numerator shrunk by
    n/2 when positive, as Newcombe does). Approximate, not guaranteed; unlike the Wald interval it
    does not collapse to zero width when the two models rarely disagree.
    """
    t = np.asarray(table, dtype=float)
    n = t.sum()
    if t.shape != (2, 2) or n <= 0:
        raise ValueError(f"need a 2×2 table with a positive total, got {t.tolist()}")
    a, b, c, d = t.ravel()
    alpha = 1 - confidence
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = proportion_confint(a + b, n, alpha=alpha, method="wilson")
    l2, u2 = proportion_confint(a + c, n, alpha=alpha, method="wilson")
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    shrunk = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = shrunk / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, low), min(1.0, high)


def compare_paired(errors_a: np.ndarray, errors_b: np.ndarray, confidence: float) -> PairedComparison:
    """Exact McNemar test, Newcombe interval and a verdict at level δ = 1 − confidence."""
    table = paired_table(errors_a, errors_b)
    p_value = float(mcnemar(table, exact=True).pvalue)
    low, high = paired_difference_interval(table, confidence)
    difference = float(table[0, 1] - table[1, 0]) / table.sum()
    if p_value <= 1 - confidence:
        verdict = "better" if difference < 0 else "worse"
    else:
        verdict = "indistinguishable at this test size"
    return PairedComparison(table, p_value, difference, low, high, confidence, verdict)


def smallest_resolvable_difference(n_discordant: int, m: int, delta: float) -> float:
    """Smallest |error(A) − error(B)| the exact two-sided McNemar test rejects at level δ.

    Given the n_d test points on which the two models disagree, a split (b, n_d − b) of those
    points gives p = 2·P(Binomial(n_d, ½) ≤ b); the answer is (n_d − 2b)/m for the largest b with
    p ≤ δ. NaN when even a one-sided split of all n_d points is not significant.
    """
    if n_discordant <= 0:
        return math.nan
    b = np.arange(n_discordant // 2 + 1)
    significant = np.nonzero(2 * stats.binom.cdf(b, n_discordant, 0.5) <= delta)[0]
    if not significant.size:
        return math.nan
    return (n_discordant - 2 * int(b[significant[-1]])) / m


def union_hoeffding_epsilon(m: int, delta: float, n_trials: int) -> float:
    """Half-width ε = sqrt(ln(2N/δ)/(2m)) holding for all N test errors at once (union bound)."""
    return bounds.hoeffding_epsilon(m, delta / n_trials)


def bonferroni_clopper_pearson(k: int, m: int, delta: float, n_trials: int) -> tuple[float, float]:
    """Clopper–Pearson interval at confidence 1 − δ/N: N of them hold together with probability ≥ 1 − δ."""
    low, high = stats.binomtest(k, m).proportion_ci(1 - delta / n_trials, method="exact")
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# What the storage and the trial runs hold


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


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials best first by the objective (validation only), ties in trial order.

    Optuna's own best trial leads, so the page agrees with the parent run's ``best_trial_number``.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    ranked = sorted(complete, key=lambda t: (sign * t.value, t.number))
    if ranked:
        best = study.best_trial
        ranked.sort(key=lambda t: t.number != best.number)  # stable: only moves the best first
    return ranked


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
        for name in ("metrics.json", "test_predictions.json"):
            try:
                mlflow.download_artifacts(run_id, name, tmp)
            except Exception:  # an older run without predictions, or a run that lost its artifacts
                if name == "metrics.json":
                    return None
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


# ----------------------------------------------------------------------------------------------
# The summary: every number on the page, also written as study_summary.json


@dataclass(frozen=True)
class StudySummary:
    name: str
    objective: str
    confidence: float
    counts: dict[str, int]
    n_tested: int  # N: trials whose test error was computed (the union bound runs over them)
    m: int | None  # test-set size
    selected: int | None
    runner_up: int | None
    comparison: PairedComparison | None
    metrics: dict[str, float]  # study-level numbers, also logged to the parent run
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "comparison"}
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


def summarize_study(study: optuna.Study, cfg: StudyConfig, outputs: dict[int, TrialOutputs]) -> StudySummary:
    confidence = cfg.bounds.confidence
    delta = 1 - confidence
    trials = study.get_trials(deepcopy=False)
    counts = {name: sum(trial_state(t) == name for t in trials) for name in STATE_NAMES.values()}
    ranked = ranked_trials(study)
    n_tested = sum("test_error" in t.user_attrs for t in trials)
    notes: list[str] = []
    metrics: dict[str, float] = {}
    selected = ranked[0] if ranked else None
    runner = ranked[1] if len(ranked) > 1 else None
    sel_out = outputs.get(selected.number) if selected else None
    m = sel_out.m if sel_out else next((o.m for o in outputs.values()), None)
    if selected is not None and sel_out is not None and n_tested:
        low, high = bonferroni_clopper_pearson(sel_out.k, sel_out.m, delta, n_tested)
        metrics["selected_test_error_bonferroni_low"] = low
        metrics["selected_test_error_bonferroni_high"] = high
        metrics["union_hoeffding_epsilon"] = union_hoeffding_epsilon(sel_out.m, delta, n_tested)
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
    )


# ----------------------------------------------------------------------------------------------
# Figures


def varying_params(study: optuna.Study) -> list[str]:
    """Searched params that take at least two values among complete trials (what plots can show)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({k for t in complete for k in t.params})
    return [k for k in names if len({repr(t.params.get(k)) for t in complete}) > 1]


@dataclass(frozen=True)
class Plot:
    """A figure file, or None with the reason it was not drawn; ``note``: what the plotter warned."""

    path: Path | None
    note: str = ""


def optuna_figures(study: optuna.Study, folder: Path, objective: str) -> dict[str, Plot]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn says why instead.

    Optuna's plots go through pyplot and switch it to the ggplot style: each runs inside an
    ``rc_context`` (so the style does not leak into later figures) and its figure is closed.
    """
    import optuna.visualization.matplotlib as ovm

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    params = varying_params(study)
    if n_complete == 0:
        return {
            k: Plot(None, "no complete trial yet") for k in ("history", "importances", "slice", "contour")
        }
    out = {
        "history": _pyplot_png(
            lambda: ovm.plot_optimization_history(study, target_name=objective),
            folder / "history.png",
            (7, 4),
        )
    }
    if n_complete < 2 or not params:
        out["importances"] = Plot(
            None, "parameter importances need at least 2 complete trials whose parameters vary"
        )
    else:
        out["importances"] = _pyplot_png(
            lambda: ovm.plot_param_importances(study, params=params, target_name=objective),
            folder / "importances.png",
            (7, 1.2 + 0.5 * len(params)),
        )
    if not params:
        out["slice"] = Plot(None, "no searched parameter varies across complete trials")
    else:
        out["slice"] = _pyplot_png(
            lambda: ovm.plot_slice(study, params=params, target_name=objective),
            folder / "slice.png",
            (3.6 * len(params), 3.6),
        )
    if len(params) < 2 or n_complete < 2:
        out["contour"] = Plot(
            None, "a contour plot needs two varying parameters and at least 2 complete trials"
        )
    else:
        size = 3.3 * len(params) if len(params) > 2 else 6
        out["contour"] = _pyplot_png(
            lambda: ovm.plot_contour(study, params=params, target_name=objective),
            folder / "contour.png",
            (size + 1, size),
        )
    return out


def _pyplot_png(draw, path: Path, size: tuple[float, float]) -> Plot:
    """Draw with pyplot, save, close; Optuna's warnings (other than "experimental") become the note."""
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            plt.close("all")
            return Plot(None, f"not drawn: {exc}")
        fig = np.ravel(axes)[0].figure
        try:
            fig.set_size_inches(*size)
            files.save_figure(fig, path)
        finally:
            plt.close(fig)
    notes = dict.fromkeys(f"Optuna warned: {w.message}" for w in caught)  # unique, in order
    return Plot(path, " ".join(notes))


def plot_forest(
    study: optuna.Study, outputs: dict[int, TrialOutputs], summary: StudySummary, path: Path
) -> Path | None:
    """Every complete trial's test error with its exact interval (thick) and Bonferroni band (thin)."""
    rows = [t for t in ranked_trials(study) if t.number in outputs]  # by validation, never by test
    if not rows:
        return None
    delta = 1 - summary.confidence
    fig = Figure(figsize=(7.5, 1.4 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    for y, t in enumerate(reversed(rows)):
        o = outputs[t.number]
        err = o.k / o.m
        low = t.user_attrs.get("test_error_clopper_pearson_low", math.nan)
        high = t.user_attrs.get("test_error_clopper_pearson_high", math.nan)
        blow, bhigh = bonferroni_clopper_pearson(o.k, o.m, delta, max(summary.n_tested, 1))
        color = "tab:red" if t.number == summary.selected else "tab:blue"
        ax.plot([blow, bhigh], [y, y], color=color, alpha=0.35, lw=1.2)
        ax.plot([low, high], [y, y], color=color, lw=3.5, solid_capstyle="butt")
        ax.plot([err], [y], "o", color=color, ms=5, mec="black", mew=0.5)
    labels = [
        f"trial {t.number}  {summary.objective}={t.value:.4g}"
        + ("  (selected)" if t.number == summary.selected else "")
        for t in reversed(rows)
    ]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("test error")
    ax.grid(axis="x", alpha=0.3)
    pct = 100 * summary.confidence
    ax.set_title(
        f"thick: {pct:g} % Clopper–Pearson per trial; thin: Bonferroni over N = {summary.n_tested}",
        fontsize=9,
    )
    return files.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# The page


@dataclass(frozen=True)
class PageSources:
    """Where the page's data came from (provenance; URIs with passwords redacted)."""

    storage: str
    tracking_uri: str
    parent_run_id: str | None
    experiment_id: str | None


def write_study_page(
    cfg: StudyConfig,
    study: optuna.Study,
    page_dir: Path,
    sources: PageSources,
    mlflow=None,
) -> tuple[Path, StudySummary]:
    """Write ``page_dir/index.html`` and ``page_dir/study/`` (figures, trials.csv, summary)."""
    ranked = ranked_trials(study)
    classes = tuple(cfg.classes)
    outputs = {}
    for t in ranked:
        found = load_outputs(t, page_dir, classes, mlflow)
        if found is not None:
            outputs[t.number] = found
    summary = summarize_study(study, cfg, outputs)
    frame = trials_frame(study, cfg, page_dir, run_reasons(study, mlflow))
    with files.atomic_dir(page_dir / FOLDER) as tmp:
        frame.to_csv(tmp / "trials.csv", index=False)
        figures = optuna_figures(study, tmp, cfg.objective)
        forest = plot_forest(study, outputs, summary, tmp / "forest.png")
        selected = outputs.get(summary.selected) if summary.selected is not None else None
        confusion = None
        if selected is not None:
            evaluation = _evaluation(selected)
            confusion = report.plot_confusion(
                evaluation, selected.classes, tmp / "selected_confusion_matrix.png", "test set"
            )
        files.write_json(tmp / "study_summary.json", summary.to_dict())
        sections = _sections(cfg, study, summary, frame, outputs, figures, forest, confusion, sources)
        from pipeline.rerun import rerun_section_html

        reruns = rerun_section_html(page_dir)
        if reruns is not None:
            sections.insert(-1, ("Reruns", reruns))
        text = report.html_page(f"Study {cfg.name}", sections)
    page = files.write_text(page_dir / PAGE, text)
    return page, summary


def _evaluation(outputs: TrialOutputs) -> Evaluation:
    if outputs.labels is not None and outputs.predictions is not None:
        return summarize(outputs.labels, outputs.predictions, outputs.classes)
    return Evaluation(
        labels=np.array([]),
        predictions=np.array([]),
        loss=math.nan,
        confusion=np.asarray(outputs.metrics["confusion_matrix"]),
        report=outputs.metrics["classification_report"],
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value is pd.NA:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _trials_html(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for col in shown.columns:
        if col == "report":
            shown[col] = [f'<a href="{html.escape(v)}">report</a>' if v else "" for v in shown[col]]
        else:
            shown[col] = [html.escape(_fmt(v)) for v in shown[col]]
    low, high = frame["test_error_clopper_pearson_low"], frame["test_error_clopper_pearson_high"]
    shown["test_error_clopper_pearson_low"] = [
        f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else "—" for lo, hi in zip(low, high, strict=True)
    ]
    shown = shown.drop(columns="test_error_clopper_pearson_high").rename(
        columns={"test_error_clopper_pearson_low": "Clopper–Pearson", "duration_s": "duration (s)"}
    )
    table = shown.to_html(index=False, escape=False, border=0, na_rep="—")
    return f'<style>.dataframe td{{white-space:nowrap}}</style><div style="overflow-x:auto">{table}</div>'


def _figure_html(fig: Plot | Path | None, alt: str) -> str:
    plot = fig if isinstance(fig, Plot) else Plot(fig, "" if fig else "nothing to draw")
    shown = report.image_html(plot.path, alt) if plot.path is not None else ""
    if plot.note:
        shown += f'<p class="note">{html.escape(alt)}: {html.escape(plot.note)}</p>'
    return shown


def _sections(
    cfg, study, summary, frame, outputs, figures, forest, confusion, sources
) -> list[tuple[str, str]]:
    conf = summary.confidence
    pct = f"{100 * conf:g} %"
    c = summary.counts
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    sel = by_number.get(summary.selected) if summary.selected is not None else None
    sel_out = outputs.get(summary.selected) if summary.selected is not None else None
    runner = by_number.get(summary.runner_up) if summary.runner_up is not None else None
    objective = cfg.objective
    sections: list[tuple[str, str]] = []

    # --- summary
    lines = [
        f"{len(frame)} trials: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "")
        + ". The selected trial is the best by the validation objective "
        f"(<code>{objective}</code>); the test set chose nothing."
    ]
    if sel is not None and sel_out is not None:
        lines.append(
            f"Selected: <b>trial {sel.number}</b> ({html.escape(_params_text(sel))}), "
            f"{objective} = {sel.value:.4f}, "
            f"test error {sel_out.k}/{sel_out.m} = {sel_out.k / sel_out.m:.4f} "
            f"({pct} Clopper–Pearson {_interval_text(sel, 'clopper_pearson')})."
        )
    if summary.comparison is not None and runner is not None:
        cmp = summary.comparison
        lines.append(
            f"Against the runner-up, trial {runner.number}: <b>{_verdict_text(cmp.verdict)}</b> "
            f"(exact McNemar p = {cmp.p_value:.3g}, error difference {cmp.difference:+.4f}, "
            f"{pct} interval [{cmp.low:+.4f}, {cmp.high:+.4f}])."
        )
    lines += [html.escape(n) for n in summary.notes]
    sections.append(("Summary", "".join(f"<p>{line}</p>" for line in lines)))

    # --- trials
    sections.append(
        (
            "Trials",
            f'<p class="note">From the Optuna storage. Clopper–Pearson: the {pct} exact interval '
            f"of each trial's test error on its own. best_val_acc is the best epoch's; val_acc is "
            f"the final model's (the objective is {objective}). Also as "
            f'<a href="{FOLDER}/trials.csv">trials.csv</a>.</p>' + _trials_html(frame),
        )
    )

    # --- study figures
    sections.append(
        (
            "Study figures",
            _figure_html(figures.get("history"), "optimization history")
            + _figure_html(figures.get("importances"), "parameter importances")
            + '<p class="note">Importances: Optuna\'s default (PED-ANOVA) on the complete trials; '
            "with few trials they are rough.</p>"
            + _figure_html(figures.get("slice"), "slice plot")
            + _figure_html(figures.get("contour"), "contour plot"),
        )
    )

    # --- forest
    sections.append(
        (
            "Every complete trial's test error",
            f"<p>Sorted by {objective} (best at the top), the selected trial in red. The thick bar is "
            f"each trial's own {pct} exact interval; the thin bar is the Bonferroni-corrected one "
            f"(confidence 1 − δ/N, N = {summary.n_tested}), which may be read across all trials at "
            "once.</p>" + _figure_html(forest, "forest plot"),
        )
    )

    # --- selected trial
    if sel is not None and sel_out is not None:
        rows = [
            (
                iv["method"],
                iv["low"],
                iv["high"],
                iv["width"],
                "yes" if iv["guaranteed"] else "no",
                iv["note"] or "",
            )
            for iv in sel_out.metrics["intervals"]
        ]
        link = f"trial-{sel.number:04d}/report.html"
        body = (
            f"<p>Trial {sel.number}: {html.escape(_params_text(sel))}. {objective} = {sel.value:.4f}; "
            f"test error {sel_out.k}/{sel_out.m} = {sel_out.k / sel_out.m:.4f}. "
            f"Intervals at {sel_out.metrics.get('confidence', conf):g} from the bounds stage "
            f'(<a href="{link}">its report</a>):</p>'
            + report.table_html(rows, ("method", "low", "high", "width", "guaranteed", "note"))
            + _figure_html(confusion, "confusion matrix")
            + report.classification_table(_evaluation(sel_out))
        )
        sections.append(("The selected trial", body))

    # --- best vs runner-up
    sections.append(("Selected trial against the runner-up", _comparison_html(summary, sel, runner)))

    # --- simultaneous
    sections.append(("Simultaneous bounds over all trials", _simultaneous_html(summary, sel, sel_out)))

    # --- gap and resolution
    sections.append(
        ("Validation-to-test gap and test-set resolution", _gap_html(summary, sel, sel_out, outputs))
    )

    # --- provenance
    sections.append(("Provenance", _provenance_html(cfg, study, outputs, sel_out, sources)))
    return sections


def _params_text(trial: FrozenTrial) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())


def _interval_text(trial: FrozenTrial, method: str) -> str:
    low = trial.user_attrs.get(f"test_error_{method}_low", math.nan)
    high = trial.user_attrs.get(f"test_error_{method}_high", math.nan)
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _comparison_html(summary: StudySummary, sel, runner) -> str:
    if sel is None or runner is None:
        return "<p>Fewer than two complete trials: there is no runner-up to compare with.</p>"
    cmp = summary.comparison
    if cmp is None:
        return "<p>" + " ".join(html.escape(n) for n in summary.notes) + "</p>"
    pct = f"{100 * cmp.confidence:g} %"
    delta = 1 - cmp.confidence
    t = cmp.table
    table = report.table_html(
        [
            (f"trial {sel.number} wrong", int(t[0, 0]), int(t[0, 1])),
            (f"trial {sel.number} right", int(t[1, 0]), int(t[1, 1])),
        ],
        ("", f"trial {runner.number} wrong", f"trial {runner.number} right"),
    )
    tie = ""
    if sel.value == runner.value:
        tie = (
            f" They tie on {summary.objective}; the study's order (the earlier trial) ranked them, "
            "which is still independent of the test set."
        )
    resolvable = summary.metrics.get("smallest_resolvable_difference", math.nan)
    return (
        f"<p>The runner-up is the second best by {summary.objective} (trial {runner.number}, "
        f"{summary.objective} = {runner.value:.4f}).{tie} Both were ranked on validation data, so "
        "comparing them on the test set is one honest test, not a search.</p>"
        + table
        + f"<p>They disagree on {cmp.n_discordant} of {cmp.m} test points. Exact McNemar test "
        f"(statsmodels <code>mcnemar(table, exact=True)</code>: a two-sided binomial test of the "
        f"{int(t[0, 1])} vs {int(t[1, 0])} split of those points): p = {cmp.p_value:.4g}.</p>"
        f"<p>Difference in test error (selected − runner-up): {cmp.difference:+.4f}, {pct} interval "
        f"[{cmp.low:+.4f}, {cmp.high:+.4f}] by Newcombe's (1998) square-and-add method for paired "
        "proportions (Wilson limits for each error rate, combined through the correlation of the "
        "pairs). It is approximate; it is used instead of the Wald interval, which degenerates when "
        "the models rarely disagree, while the McNemar p-value above is exact.</p>"
        f"<p><b>Verdict at δ = {delta:.3g}: the selected trial is {_verdict_text(cmp.verdict)}.</b>"
        + (
            f" With {cmp.n_discordant} disagreements, the smallest error difference this test "
            f"could call significant is {_fmt(resolvable)} (see below).</p>"
            if math.isfinite(resolvable)
            else f" With only {cmp.n_discordant} disagreements, no difference could be significant.</p>"
        )
    )


def _verdict_text(verdict: str) -> str:
    if verdict in ("better", "worse"):
        return f"{verdict} than the runner-up"
    return "indistinguishable from the runner-up at this test size"


def _simultaneous_html(summary: StudySummary, sel, sel_out: TrialOutputs | None) -> str:
    if sel is None or sel_out is None or not summary.n_tested:
        return "<p>No tested trial.</p>"
    conf = summary.confidence
    delta = 1 - conf
    n, m = summary.n_tested, sel_out.m
    err = sel_out.k / m
    single_low, single_high = stats.binomtest(sel_out.k, m).proportion_ci(conf, method="exact")
    hoeff = bounds.hoeffding_epsilon(m, delta)
    union = summary.metrics["union_hoeffding_epsilon"]
    blow = summary.metrics["selected_test_error_bonferroni_low"]
    bhigh = summary.metrics["selected_test_error_bonferroni_high"]
    rows = [
        (
            "Clopper–Pearson, this trial alone",
            f"1 − δ = {conf:g}",
            single_low,
            single_high,
            single_high - single_low,
        ),
        ("Clopper–Pearson, Bonferroni over N", f"1 − δ/N = {1 - delta / n:.4g}", blow, bhigh, bhigh - blow),
        (
            "Hoeffding, this trial alone",
            f"1 − δ = {conf:g}",
            max(0.0, err - hoeff),
            min(1.0, err + hoeff),
            2 * hoeff,
        ),
        (
            "Hoeffding, union bound over N",
            f"1 − δ/N = {1 - delta / n:.4g}",
            max(0.0, err - union),
            min(1.0, err + union),
            2 * union,
        ),
    ]
    return (
        f"<p>N = {n} trials had their test error computed on the same m = {m} points. The selected "
        "trial was chosen on validation data, so its own interval (first row) is valid for it. But "
        "whoever reads the test errors of all N trials side by side — or picks the lowest — needs "
        "all N intervals to hold at once. Spending δ/N on each (Bonferroni; for Hoeffding the union "
        f"bound ε = sqrt(ln(2N/δ)/(2m)) = {union:.4f}) makes that hold with probability ≥ 1 − δ; "
        "that is why these rows are wider.</p>"
        + report.table_html(
            rows, ("interval for trial " + str(sel.number), "confidence each", "low", "high", "width")
        )
    )


def _gap_html(
    summary: StudySummary, sel, sel_out: TrialOutputs | None, outputs: dict[int, TrialOutputs]
) -> str:
    if sel is None or sel_out is None:
        return "<p>No tested trial.</p>"
    conf = summary.confidence
    val_error = 1 - sel_out.metrics["val_acc"]
    test_error = sel_out.metrics["test_error"]
    gaps = [o.metrics["test_error"] - (1 - o.metrics["val_acc"]) for o in outputs.values()]
    low, high = stats.binomtest(sel_out.k, sel_out.m).proportion_ci(conf, method="exact")
    resolvable = summary.metrics.get("smallest_resolvable_difference", math.nan)
    text = (
        f"<p>Selected trial: validation error {val_error:.4f}, test error {test_error:.4f}, gap "
        f"(test − validation) <b>{test_error - val_error:+.4f}</b>; the mean gap over all "
        f"{len(gaps)} complete trials is {np.mean(gaps):+.4f}. The selected trial's validation "
        "accuracy is the best of N noisy estimates on one validation set, so in expectation it is optimistic "
        "(Cawley &amp; Talbot 2010); its test error, which played no part in the choice, is the "
        "honest estimate.</p>"
        f"<p>Resolution of one test error at m = {sel_out.m}: the {100 * conf:g} % Clopper–Pearson "
        f"half-width at the selected error is {(high - low) / 2:.4f}.</p>"
    )
    if summary.comparison is not None:
        cmp = summary.comparison
        text += (
            "<p>Smallest resolvable difference between two trials, as defined here: the smallest "
            "|error(A) − error(B)| for which the exact two-sided McNemar test rejects at level "
            f"δ = {1 - conf:.3g}, given the number of test points on which the two disagree. For "
            f"the selected trial and the runner-up ({cmp.n_discordant} disagreements of {cmp.m}) "
            f"it is <b>{_fmt(resolvable)}</b>"
            + (
                "; no split of so few disagreements is significant"
                if not math.isfinite(resolvable)
                else f" ({round(resolvable * cmp.m)} more errors for one model than the other)"
            )
            + ". A smaller true difference needs a larger test set or models that disagree less.</p>"
        )
    return text


def _provenance_html(cfg, study, outputs, sel_out, sources: PageSources) -> str:
    prov = dict(sel_out.metrics.get("provenance", {})) if sel_out else {}
    commits = sorted({o.metrics.get("provenance", {}).get("git_commit", "unknown") for o in outputs.values()})
    config_hashes = sorted({o.metrics.get("config_hash", "") for o in outputs.values()} - {""})
    split_hashes = sorted({o.metrics.get("split_hash", "") for o in outputs.values()} - {""})
    finished = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    rows = [
        ("study", cfg.name),
        ("study file", cfg.path),
        ("config hash (this file)", cfg.config_hash()),
        ("config hash (trials)", ", ".join(config_hashes) or "—"),
        *(
            [("note", "the trials ran under another config hash: the file or the config schema changed")]
            if config_hashes and config_hashes != [cfg.config_hash()]
            else []
        ),
        ("split hash", ", ".join(split_hashes) or "—"),
        ("git commit (trials)", ", ".join(commits) or "—"),
        ("training seed", cfg.training.seed),
        ("dataset seed", cfg.dataset.seed),
        ("sampler", f"{cfg.sampler.kind}, seed {cfg.sampler.seed}"),
        ("Optuna storage", sources.storage),
        ("MLflow tracking URI", sources.tracking_uri),
        ("MLflow experiment id", sources.experiment_id or "—"),
        ("MLflow parent run", sources.parent_run_id or "— (not found)"),
        ("last trial finished", max(finished).isoformat(sep=" ", timespec="seconds") if finished else "—"),
    ]
    for key in ("python", "torch", "optuna", "mlflow", "numpy", "scikit_learn", "pipeline"):
        if key in prov:
            rows.append((f"{key} (selected trial)", prov[key]))
    return report.table_html(rows, ("", ""))


# ----------------------------------------------------------------------------------------------
# Entry points: the CLI (regenerate from storage) and the end of a study run


def find_study_run(mlflow, name: str) -> tuple[str | None, str | None]:
    """(experiment id, parent run id) of a study in MLflow, or Nones when it was never tracked."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return None, None
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.pipeline_role = '{tracking.STUDY_ROLE}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return exp.experiment_id, (runs[0].info.run_id if runs else None)


def log_to_parent(mlflow, parent_run_id: str, page: Path, summary: StudySummary) -> None:
    """The page, its folder and the study-level numbers onto the study's parent run."""
    mlflow.log_artifact(parent_run_id, str(page))
    mlflow.log_artifacts(parent_run_id, str(page.parent / FOLDER), FOLDER)
    metrics = {k: v for k, v in summary.metrics.items() if math.isfinite(v)}
    tracking.log(mlflow, parent_run_id, metrics=metrics)


def regenerate(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    reports_root: Path = Path("reports"),
) -> Path:
    """Rebuild the study page from storage and MLflow (no training) and log it to the parent run."""
    spec = storage_spec(cfg, storage)
    if "://" not in spec and not Path(spec).is_file():
        raise StudyError(
            f"{cfg.path}: no Optuna storage at {spec} for study {cfg.name!r}; run "
            f"`pipeline study {cfg.path}` first, or pass --storage"
        )
    try:
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(spec))
    except KeyError:
        raise StudyError(
            f"{cfg.path}: no study named {cfg.name!r} in {redact(spec)}; check --name and --storage"
        ) from None
    uri = tracking.tracking_uri(tracking_uri)
    mlflow = None
    if not (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()):
        mlflow = tracking.client(uri)
    exp_id, parent = find_study_run(mlflow, cfg.name) if mlflow is not None else (None, None)
    sources = PageSources(redact(spec), redact(uri), parent, exp_id)
    page, summary = write_study_page(cfg, study, reports_root / cfg.name, sources, mlflow)
    if mlflow is not None and parent is not None:
        log_to_parent(mlflow, parent, page, summary)
    else:
        warnings.warn(
            f"study {cfg.name!r} has no parent run in MLflow at {redact(uri)}: the page was written "
            "but not logged",
            StudyPageWarning,
            stacklevel=2,
        )
    return page


def write_after_study(
    cfg: StudyConfig, study: optuna.Study, mlflow, parent_run_id: str, page_dir: Path, spec: str
) -> Path | None:
    """The end of a study run: write and log the page; a failure warns and never touches the trials."""
    try:
        exp_id = mlflow.get_run(parent_run_id).info.experiment_id
        sources = PageSources(redact(spec), redact(mlflow.tracking_uri), parent_run_id, exp_id)
        page, summary = write_study_page(cfg, study, page_dir, sources, mlflow)
        log_to_parent(mlflow, parent_run_id, page, summary)
        return page
    except Exception as exc:  # the trials are safely stored; `pipeline report` can retry the page
        stop = signal_in(exc)
        if stop is not None:  # a signal is not a page failure: the command must still stop with 143
            raise stop from None
        warnings.warn(
            f"study page for {cfg.name!r} not written ({type(exc).__name__}: {exc}); the trials are "
            f"stored — run `pipeline report {cfg.path}` to retry",
            StudyPageWarning,
            stacklevel=2,
        )
        return None
