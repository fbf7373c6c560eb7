"""Retraining the selected configuration with fixed seeds, and the rule that calls a change drift."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import bounds
from pipeline.config import StudyConfig
from pipeline.data import Split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.report.reruns import RerunError, params_text
from pipeline.train import DTYPES, train, trial_setup

_EPS = 1e-12  # float slack when testing whether a mean lies inside a recorded interval


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

    The model follows the trial's own (``pipeline.train.trial_setup``).
    """
    shape, hyper = trial_setup(cfg.model, params)
    training = dataclasses.replace(cfg.training, seed=seed)
    model = build_mlp(split.input_dim, shape.hidden, shape.activation, seed, dtype=DTYPES[training.dtype])
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
            f"{params_text(previous['selected_params'])} → trial {current['selected_trial']} "
            f"{params_text(current['selected_params'])}"
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
