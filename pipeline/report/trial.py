"""The per-trial report stage: intervals, the ground-truth check and ``trial-NNNN/`` (atomically).

Runs (and is tested) without Optuna or MLflow: it takes a trained model and its evaluations, and
returns the files and metrics for the trial's MLflow run to log.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from pipeline import bounds, files
from pipeline.config import StudyConfig
from pipeline.data import Split
from pipeline.evaluate import Evaluation, evaluate, predict_logits
from pipeline.report.figures import (
    plot_bounds,
    plot_confusion,
    plot_coverage,
    plot_curves,
    plot_decision_boundary,
    plot_replicates,
    plot_true_distribution,
)
from pipeline.report.html import Figure, classification_rows, figure, render
from pipeline.seeds import derive_seed
from pipeline.train import EpochRecord, TrainResult

TRUE_ERROR_SAMPLE = 250_000  # fresh points behind the true error (its Monte Carlo SD: ≈ 4e-4 at R = 0.14)


BCA_RESAMPLES = 999  # per k in BCa's exact coverage (its seed-to-seed SD ≈ 0.008 at m = 2000; 499: 0.015)


BCA_MAX_M = 5000  # BCa's exact coverage runs scipy's O(m²) jackknife ~10 times: ≈ 0.3 s at m = 2000


STALL_MARGIN = 0.02  # a replicate whose val_acc ends within this of the majority-class rate stalled


@dataclass(frozen=True)
class Replicates:
    """A trial's K seed replicates: K networks of one configuration, trained on one split."""

    seeds: tuple[int, ...]  # each replicate's training seed (initialisation and batch order)
    val_acc: tuple[float, ...]
    val_loss: tuple[float, ...]
    test_k: tuple[int, ...]  # each network's test errors, out of m
    m: int
    majority: float  # the validation set's majority-class rate: a constant predictor's accuracy

    @property
    def test_error(self) -> tuple[float, ...]:
        return tuple(k / self.m for k in self.test_k)

    @property
    def stalled(self) -> tuple[bool, ...]:
        return tuple(abs(a - self.majority) <= STALL_MARGIN for a in self.val_acc)

    def mean_interval(self, confidence: float) -> tuple[float, float]:
        """Approximate interval for the configuration's mean test error over training seeds: a
        t-interval over the K per-seed errors (the seeds a sample of training runs; the test set,
        shared by all K, adds a variance this interval does not see)."""
        e = np.asarray(self.test_error)
        sd = float(e.std(ddof=1))
        if sd == 0.0:
            return float(e.mean()), float(e.mean())
        low, high = stats.t.interval(confidence, len(e) - 1, loc=e.mean(), scale=sd / np.sqrt(len(e)))
        return float(low), float(high)

    def metrics(self, confidence: float) -> dict[str, float]:
        """The trial's MLflow summaries: per seed, the means (val_acc, test_error), their SDs, stalled."""
        out: dict[str, float] = {"replicates": len(self.seeds)}
        for i, (acc, loss, err) in enumerate(zip(self.val_acc, self.val_loss, self.test_error, strict=True)):
            out |= {f"val_acc_seed{i}": acc, f"val_loss_seed{i}": loss, f"test_error_seed{i}": err}
        for key, values in (
            ("val_acc", self.val_acc),
            ("val_loss", self.val_loss),
            ("test_error", self.test_error),
        ):
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values, ddof=1))
        out["test_acc"] = 1 - out["test_error"]
        out["stalled"] = sum(self.stalled)
        out["test_error_mean_t_low"], out["test_error_mean_t_high"] = self.mean_interval(confidence)
        return out

    def rows(self, confidence: float) -> tuple[tuple[Any, ...], ...]:
        """The replicate table: each network with its own (guaranteed) Clopper–Pearson interval."""
        low, high = bounds.count_intervals(np.asarray(self.test_k), self.m, confidence)["clopper_pearson"]
        return tuple(
            (i, seed, acc, loss, f"{k} / {self.m}", err, lo, hi, "stalled" if stall else "")
            for i, (seed, acc, loss, k, err, lo, hi, stall) in enumerate(
                zip(
                    self.seeds,
                    self.val_acc,
                    self.val_loss,
                    self.test_k,
                    self.test_error,
                    low,
                    high,
                    self.stalled,
                    strict=True,
                )
            )
        )


@dataclass(frozen=True)
class TrialArtifacts:
    files: tuple[Path, ...]  # files to log to the trial's MLflow run
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of "bounds" and "report"


@dataclass(frozen=True, eq=False)  # holds an array: compare by identity
class GroundTruth:
    """The model measured against the synthetic ground truth: its true error R and, given R, the
    exact coverage of every interval; simulated fresh test sets check both."""

    true_error: float
    true_error_sd: float  # Monte Carlo SD of true_error
    n_points: int  # fresh points behind true_error
    exact: tuple[bounds.ExactCoverage, ...]
    fresh_errors: np.ndarray  # R_T of each simulated fresh test set
    simulated: tuple[bounds.Coverage, ...]  # coverage over those sets (closed-form methods; none if no sets)


def ground_truth_check(
    model: torch.nn.Module, split: Split, m: int, n_sets: int, confidence: float, seed: int
) -> GroundTruth:
    """R on TRUE_ERROR_SAMPLE fresh points, each interval's exact coverage of it, and a check.

    R is the mean of P(Y ≠ f(x) | x) from the exact posterior (as ``bayes_error`` does): unbiased,
    with 3.2× less variance than counting the sampled labels' errors (the demo's model). The check:
    the same points, with their sampled labels, cut into up to ``n_sets`` fresh test sets of size
    m. R averages over their x's, so their R_T's variance about R is R(1 − R)/m times a factor
    between 1 − 1/S and 1 (S sets), not quite the R(1 − R)/m of independent sets.
    """
    gt = split.ground_truth
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # no autograd graph over the whole sample
        x, y = gt.sample(TRUE_ERROR_SAMPLE, gen)
        predicted = predict_logits(model, x).argmax(1)
        p1 = gt.posterior(x)
    p_wrong = torch.where(predicted == 1, 1 - p1, p1)  # P(Y ≠ f(x) | x)
    true_error = float(p_wrong.mean())
    sd = float(p_wrong.std()) / TRUE_ERROR_SAMPLE**0.5
    exact = bounds.exact_coverage(
        m,
        true_error,
        confidence,
        np.random.default_rng(seed),
        BCA_RESAMPLES,
        bca="boundaries" if m <= BCA_MAX_M else "skip",
    )
    sets = min(n_sets, TRUE_ERROR_SAMPLE // m)
    matrix = (predicted != y)[: sets * m].view(sets, m).numpy()
    simulated = bounds.coverage(matrix, true_error, confidence, bca_sets=0) if sets else ()
    simulated = tuple(c for c in simulated if c.n_sets)  # BCa is not simulated: its sum is exact
    return GroundTruth(true_error, sd, TRUE_ERROR_SAMPLE, exact, matrix.mean(axis=1), simulated)


def bounds_and_report(
    *,
    folder: Path,
    cfg: StudyConfig,
    split: Split,
    model: torch.nn.Module,
    trial_number: int,
    params: dict[str, Any],
    result: TrainResult,
    val: Evaluation,
    test: Evaluation,
    provenance: dict[str, str],
    replicates: Replicates | None = None,
    mean_history: tuple[EpochRecord, ...] | None = None,
    timings: dict[str, float] | None = None,
) -> TrialArtifacts:
    """Compute the intervals (and the ground-truth check), write the report folder atomically.

    With ``replicates`` (K > 1 seeds) the model, result and evaluations are replicate 0's, the
    network whose weights the trial keeps; the replicate table and strip plot show all K.
    ``timings``: seconds of the stages before this one (``train``, ``evaluate``), for metrics.json's
    "timings" block, which adds this call's ``bounds``; the later stages are in the MLflow run.
    """
    started = time.perf_counter()
    confidence = cfg.bounds.confidence
    rng = np.random.default_rng(derive_seed(cfg.training.seed, "bootstrap", trial_number))
    err = bounds.analyse_errors(test.errors, confidence, rng)
    m = err.m
    delta = 1 - confidence
    train_eval = evaluate(model, split.x_train, split.y_train, split.classes, cfg.training.loss)
    metrics: dict[str, float] = {
        "train_error": train_eval.error,
        "test_m": m,
        "generalization_gap": test.error - train_eval.error,
    }
    for iv in err.intervals:
        if iv.available:
            metrics[f"test_error_{iv.method}_low"] = iv.low
            metrics[f"test_error_{iv.method}_high"] = iv.high
    truth = None
    if split.ground_truth is not None:
        truth = ground_truth_check(
            model,
            split,
            m,
            cfg.bounds.fresh_sets,
            confidence,
            seed=derive_seed(cfg.dataset.seed, "ground-truth", trial_number),
        )
        metrics["true_error"] = truth.true_error
        metrics["true_error_sd"] = truth.true_error_sd
        for c in truth.exact:
            if math.isfinite(c.coverage):
                metrics[f"exact_coverage_{c.method}"] = c.coverage
        for c in truth.simulated:
            metrics[f"coverage_{c.method}"] = c.coverage
    sizes = {
        "hoeffding_epsilon": bounds.hoeffding_epsilon(m, delta),
        "hoeffding_m_1pct_99": bounds.hoeffding_test_size(0.01, 0.01),
        "exact_m_1pct_99_worst": bounds.exact_test_size(0.01, 0.01, 0.5),
        "exact_m_1pct_99_observed": bounds.exact_test_size(0.01, 0.01, max(test.error, 1e-3)),
    }
    metrics["hoeffding_epsilon"] = sizes["hoeffding_epsilon"]
    title = f"{cfg.name} trial {trial_number}"
    reporting = time.perf_counter()
    with files.atomic_dir(folder) as tmp:
        figures = {
            "curves": plot_curves(result.history, tmp / "curves.png", mean_history),
            "confusion_matrix": plot_confusion(test, split.classes, tmp / "confusion_matrix.png", "test set"),
        }
        plot_bounds(err.distribution, err.empirical_error, err.intervals, m, tmp / "bounds.png")
        figures["bounds"] = tmp / "bounds.png"
        if truth is not None:
            plot_true_distribution(
                m, truth.true_error, test.error, tmp / "true_error.png", truth.fresh_errors
            )
            plot_coverage(truth.exact, truth.simulated, tmp / "coverage.png")
            figures["true_error"] = tmp / "true_error.png"
            figures["coverage"] = tmp / "coverage.png"
        if replicates is not None:
            figures["replicates"] = plot_replicates(replicates, tmp / "replicates.png")
        if split.input_dim == 2:
            figures["decision_boundary"] = plot_decision_boundary(
                model, split, tmp / "decision_boundary.png", f"{title}: {_describe(params, cfg)}"
            )
        summary = {
            "study": cfg.name,
            "trial": trial_number,
            "params": params,
            "outcome": result.outcome,
            "epochs_run": len(result.history),
            "train_seconds": result.seconds,
            "val_acc": val.accuracy,
            "test_acc": test.accuracy,
            "test_error": test.error,
            "train_error": train_eval.error,
            "confidence": confidence,
            "test_m": m,
            "test_k": err.k,
            "intervals": [iv.__dict__ | {"width": iv.width} for iv in err.intervals],
            "test_set_sizes": sizes,
            "confusion_matrix": test.confusion,
            "classification_report": test.report,
            "history": [r.__dict__ for r in result.history],
            "config_hash": cfg.config_hash(),
            "split_hash": split.split_hash,
            "provenance": provenance,
            "timings": {
                **{f"time_{stage}_s": seconds for stage, seconds in (timings or {}).items()},
                "time_bounds_s": reporting - started,
            },
        }
        if replicates is not None:
            low, high = replicates.mean_interval(confidence)
            summary["replicates"] = {
                "seeds": replicates.seeds,
                "val_acc": replicates.val_acc,
                "val_loss": replicates.val_loss,
                "test_k": replicates.test_k,
                "test_error": replicates.test_error,
                "stalled": replicates.stalled,
                "majority_rate": replicates.majority,
                "summary": replicates.metrics(confidence),
                "test_error_mean_interval": {
                    "low": low,
                    "high": high,
                    "method": "t over seeds",
                    "guaranteed": False,
                },
                "network": "the numbers outside this block are replicate 0's (its weights are model.pt)",
            }
        if truth is not None:
            summary["ground_truth"] = {
                "true_error": truth.true_error,
                "true_error_sd": truth.true_error_sd,
                "true_error_points": truth.n_points,
                "simulated_sets": len(truth.fresh_errors),
                "coverage": _coverage_records(truth),
            }
        files.write_json(tmp / "metrics.json", summary)
        # paired test predictions: the study page compares trials on them (McNemar) without retraining
        files.write_json(
            tmp / "test_predictions.json",
            {"classes": split.classes, "labels": test.labels, "predictions": test.predictions},
        )
        page = _trial_page(
            title,
            cfg,
            split,
            params,
            result,
            val,
            test,
            train_eval,
            err,
            sizes,
            truth,
            figures,
            provenance,
            replicates,
        )
        files.write_text(tmp / "report.html", page)
        names = [p.name for p in figures.values()] + ["metrics.json", "test_predictions.json", "report.html"]
    seconds = {"bounds": reporting - started, "report": time.perf_counter() - reporting}
    return TrialArtifacts(tuple(folder / n for n in names), metrics, seconds)


def _coverage_records(truth: GroundTruth) -> list[dict[str, Any]]:
    """Per method: the exact coverage (and expected width), then the simulated one where simulated."""
    simulated = {c.method: c for c in truth.simulated}
    records = []
    for c in truth.exact:
        sim = simulated.get(c.method)
        records.append(
            {
                "method": c.method,
                "nominal": c.nominal,
                "exact_coverage": c.coverage,
                "exact_mean_width": c.mean_width,
                "exact_neglected_mass": c.neglected,
                "coverage": sim.coverage if sim else None,
                "mean_width": sim.mean_width if sim else None,
                "n_sets": sim.n_sets if sim else 0,
                "guaranteed": c.guaranteed,
                "note": c.note,
            }
        )
    return records


def _describe(params: dict[str, Any], cfg: StudyConfig) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass(frozen=True)
class TrialPage:
    """What ``trial.html.j2`` shows: rows, numbers and embedded figures, ready to lay out."""

    title: str
    confidence: float
    overview: tuple[tuple[str, Any], ...]
    classification: tuple[tuple[Any, ...], ...]
    intervals: tuple[bounds.Interval, ...]
    m: int
    sizes: dict[str, Any]  # Hoeffding's epsilon and the test-set sizes for ±1 % at 0.99
    observed_error: float  # the p the observed-error test size was computed at
    test_error: float
    truth: GroundTruth | None
    coverage: tuple[tuple[Any, ...], ...]  # the ground truth's coverage rows (none without one)
    figures: dict[str, Figure]
    provenance: tuple[tuple[str, Any], ...]
    replicates: tuple[tuple[Any, ...], ...] | None = None  # the replicate table (K > 1 seeds)
    replicate_mean: tuple[float, float, float] | None = None  # mean test error over seeds, t-interval
    replicate0_seed: int | None = None


def _trial_page(
    title,
    cfg,
    split,
    params,
    result,
    val,
    test,
    train_eval,
    err,
    sizes,
    truth,
    figures,
    provenance,
    replicates=None,
) -> str:
    of = "" if replicates is None else " (replicate 0)"
    overview: tuple[tuple[str, Any], ...] = (
        ("parameters", _describe(params, cfg)),
        ("outcome", result.outcome),
        ("epochs run", len(result.history)),
        ("training time (s)", result.seconds),
    )
    if replicates is not None:
        summary = replicates.metrics(cfg.bounds.confidence)
        overview += (
            ("seed replicates K", len(replicates.seeds)),
            (
                f"validation {cfg.objective}, mean over seeds (objective)",
                summary[cfg.objective],
            ),
            (
                "validation accuracy, mean ± sd over seeds",
                f"{summary['val_acc']:.4f} ± {summary['val_acc_std']:.4f}",
            ),
            (
                "test error, mean ± sd over seeds",
                f"{summary['test_error']:.4f} ± {summary['test_error_std']:.4f}",
            ),
            (
                "stalled replicates (val_acc at chance level)",
                f"{summary['stalled']} of {len(replicates.seeds)}",
            ),
        )
    overview += (
        (f"train error{of}", train_eval.error),
        ("validation accuracy" + (of or " (objective)"), val.accuracy),
        (f"test accuracy{of}", test.accuracy),
        (f"test error R_T{of}", f"{err.k} / {err.m} = {test.error:.4f}"),
        (f"generalization gap (test − train error){of}", test.error - train_eval.error),
    )
    coverage = tuple(
        (
            r["method"],
            r["nominal"],
            r["exact_coverage"],
            r["exact_mean_width"],
            math.nan if r["coverage"] is None else r["coverage"],
            "yes" if r["guaranteed"] else "no",
            r["note"],
        )
        for r in (_coverage_records(truth) if truth is not None else ())
    )
    prov = {
        "config hash": cfg.config_hash(),
        "split hash": split.split_hash,
        "study file": cfg.path,
        "training seed": cfg.training.seed,
        **provenance,
    }
    page = TrialPage(
        title=title,
        confidence=cfg.bounds.confidence,
        overview=overview,
        classification=classification_rows(test),
        intervals=tuple(err.intervals),
        m=err.m,
        sizes=sizes,
        observed_error=max(test.error, 1e-3),
        test_error=test.error,
        truth=truth,
        coverage=coverage,
        figures={name: figure(path) for name, path in figures.items()},
        provenance=tuple(prov.items()),
        replicates=None if replicates is None else replicates.rows(cfg.bounds.confidence),
        replicate_mean=None
        if replicates is None
        else (float(np.mean(replicates.test_error)), *replicates.mean_interval(cfg.bounds.confidence)),
        replicate0_seed=None if replicates is None else replicates.seeds[0],
    )
    return render("trial.html.j2", page=page)
