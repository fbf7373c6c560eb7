"""Retraining the selected configuration's replicates, and the test that calls a change drift.

A rerun's replicates are tested against a frozen baseline's, never against the previous rerun:
the test set is the same every time, so what varies between reruns is the training seed, and the
question is whether the rerun's replicate test errors could come from the baseline's distribution.
The test is the two-sided permutation test of the difference in mean test error (exact over every
split of the 2K replicates when there are at most ``PERMUTATION_EXACT_LIMIT`` splits, else seeded
random splits), at the per-rerun alpha of ``[rerun]``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from pipeline import bounds
from pipeline.config import (
    PERMUTATION_EXACT_LIMIT,
    PERMUTATION_RESAMPLES,
    RerunConfig,
    StudyConfig,
    smallest_p_value,
)
from pipeline.data import Split
from pipeline.evaluate import evaluate, predict_logits, summarize
from pipeline.model import build_mlp
from pipeline.report.reruns import RerunError, params_text
from pipeline.stacked import train_population
from pipeline.train import DTYPES, train, trial_setup

_EPS = 1e-12  # float slack when testing whether a mean lies inside a recorded interval (the old rule)


VERDICTS = ("baseline", "selection_changed", "reproduced", "consistent", "drift")


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
    """The training seeds a new baseline freezes: ``first_seed``, ``first_seed + 1``, …"""
    return tuple(range(cfg.rerun.first_seed, cfg.rerun.first_seed + cfg.rerun.seeds))


def rerun_trials(cfg: StudyConfig, override: int | None = None) -> int:
    """Trial target of a rerun: the command line, else ``[rerun] trials``, else the study's ``trials``."""
    return override or cfg.rerun.trials or cfg.trials


def retrain(
    cfg: StudyConfig, split: Split, params: Mapping[str, Any], seeds: Sequence[int]
) -> tuple[list[SeedResult], NDArray]:
    """Train the params from scratch once per seed, test each model: results and test logits [K, m, C].

    Seed ``s`` seeds its model's initialisation and its batch order, as ``training.seed = s`` would
    (so seed = the study's training seed retrains a one-replicate trial). The replicates train as
    one batched computation (``pipeline.stacked.train_population``; each stops on its own), or one
    after another with the hand-written backward.
    """
    shape, hyper = trial_setup(cfg.model, params)
    training, dtype = cfg.training, DTYPES[cfg.training.dtype]
    models = [build_mlp(split.input_dim, shape.hidden, shape.activation, s, dtype=dtype) for s in seeds]
    if training.backward == "autograd":
        trained = train_population(models, split, [hyper] * len(models), training, seeds=list(seeds))
    else:
        trained = [
            train(model, split, hyper, dataclasses.replace(training, seed=s))
            for model, s in zip(models, seeds, strict=True)
        ]
    results, logits = [], []
    labels = split.y_test.cpu().numpy()
    for seed, model, result in zip(seeds, models, trained, strict=True):
        out = predict_logits(model, split.x_test).cpu()
        test = summarize(labels, out.argmax(1).numpy(), split.classes)
        val = evaluate(model, split.x_val, split.y_val, split.classes, training.loss)
        k, m = int(test.errors.sum()), len(labels)
        exact = exact_interval(k, m, cfg.bounds.confidence)
        results.append(SeedResult(seed, test.error, k, m, val.accuracy, exact, result.outcome))
        logits.append(out.numpy())
    return results, np.stack(logits)


def predictions_digest(logits: NDArray) -> list[str]:
    """SHA-256 of each replicate's test logits (dtype, shape and bytes): equal iff bitwise equal."""
    return [
        hashlib.sha256(
            f"{row.dtype.str}{row.shape}".encode() + np.ascontiguousarray(row).tobytes()
        ).hexdigest()
        for row in logits
    ]


def exact_interval(k: int, m: int, confidence: float) -> tuple[float, float]:
    """Clopper–Pearson interval for ``k`` errors out of ``m`` (the bounds stage's formula)."""
    low, high = bounds.count_intervals(k, m, confidence)["clopper_pearson"]
    return float(low), float(high)


def summarize_seeds(results: Sequence[SeedResult], confidence: float) -> dict[str, Any]:
    """Mean, spread and exact interval of the retrained models' test errors, for display.

    Diverged retrains are listed but left out of these statistics (the drift test keeps them: a
    diverged replicate's test error is its test error). The exact interval is Clopper–Pearson at
    the mean error count (k̄ rounded, out of m): the test-set sampling uncertainty of one model.
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
# The test


@functools.lru_cache(maxsize=4)
def _all_splits(n_a: int, n: int) -> NDArray:
    """Indicator rows [C(n, n_a), n]: every choice of the n_a values that form group a."""
    picks = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations(range(n), n_a)), dtype=np.intp
    ).reshape(-1, n_a)
    rows = np.zeros((len(picks), n))
    np.put_along_axis(rows, picks, 1.0, axis=1)
    rows.flags.writeable = False
    return rows


def permutation_p_values(
    a: ArrayLike,
    b: ArrayLike,
    *,
    rng: np.random.Generator | None = None,
    resamples: int = PERMUTATION_RESAMPLES,
    exact_limit: int = PERMUTATION_EXACT_LIMIT,
    chunk: int = 32,
) -> NDArray:
    """Two-sided permutation-test p-values of mean(b) − mean(a); ``a`` [n_a] or [D, n_a] row by row.

    ``scipy.stats.permutation_test``'s definition (independent samples, two-sided): p = min(1, 2 ·
    min(P(T ≤ t), P(T ≥ t))) over the statistic T under every split of the pooled values into
    groups of n_a and n_b when there are at most ``exact_limit`` splits, else under ``resamples``
    random splits drawn from ``rng`` with the observed one counted in ((count + 1) / (resamples +
    1)). T falls as group a's sum rises, so only that sum is computed, as a matmul with the splits'
    indicator rows; integer inputs (error counts) are compared exactly, floats to 1e-9 relative.
    """
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    single = a_arr.ndim == 1
    a2, b2 = np.atleast_2d(a_arr), np.atleast_2d(b_arr)
    pooled = np.concatenate([a2, b2], axis=1).astype(np.float64)
    n_a, n = a2.shape[1], pooled.shape[1]
    if math.comb(n, n_a) <= exact_limit:
        splits, adjust = _all_splits(n_a, n), 0
    else:
        if rng is None:
            raise ValueError(f"{n_a} vs {n - n_a} values have more than {exact_limit} splits: pass an rng")
        picks = rng.permuted(np.tile(np.arange(n), (resamples, 1)), axis=1)[:, :n_a]
        splits = np.zeros((resamples, n))
        np.put_along_axis(splits, picks, 1.0, axis=1)
        adjust = 1
    integral = np.issubdtype(a2.dtype, np.integer) and np.issubdtype(b2.dtype, np.integer)
    observed = pooled[:, :n_a].sum(1)
    tol = np.full(len(pooled), 0.5) if integral else 1e-9 * np.abs(pooled).sum(1)
    p = np.empty(len(pooled))
    for start in range(0, len(pooled), chunk):
        rows = slice(start, start + chunk)
        sums = splits @ pooled[rows].T  # [splits, rows]: group a's sum under each split
        at_most = np.count_nonzero(sums <= observed[rows] + tol[rows], axis=0)  # T >= t
        at_least = np.count_nonzero(sums >= observed[rows] - tol[rows], axis=0)  # T <= t
        tail = (np.minimum(at_most, at_least) + adjust) / (len(splits) + adjust)
        p[rows] = np.minimum(1.0, 2 * tail)
    return p[0:1].reshape(()) if single else p


def permutation_p_value(a: ArrayLike, b: ArrayLike, rng: np.random.Generator | None = None) -> float:
    """``permutation_p_values`` for one pair of samples."""
    return float(permutation_p_values(a, b, rng=rng))


def old_rule(base_k: ArrayLike, rerun_k: ArrayLike, m: int, confidence: float) -> tuple[NDArray, NDArray]:
    """The rule reruns used before baselines, kept for the benchmark's contrast, row by row:
    (b) the rerun's mean test error outside the previous rerun's Clopper–Pearson interval at its
    mean error count; (c) outside the previous rerun's range across seeds."""
    base, rerun = np.atleast_2d(base_k), np.atleast_2d(rerun_k)
    low, high = bounds.count_intervals(np.round(base.mean(1)).astype(int), m, confidence)["clopper_pearson"]
    mean = rerun.mean(1) / m
    outside_interval = (mean < low - _EPS) | (mean > high + _EPS)
    outside_range = (mean < base.min(1) / m - _EPS) | (mean > base.max(1) / m + _EPS)
    return outside_interval, outside_range


# ----------------------------------------------------------------------------------------------
# The verdict


@dataclass(frozen=True)
class Verdict:
    """How a rerun stands against its baseline (the fields every ``reruns.json`` record carries)."""

    verdict: str  # one of VERDICTS
    baseline: int | None  # index of the record compared with; None when this record froze a baseline
    alpha: float  # the level of this rerun's test (alpha, or alpha / planned)
    p_value: float | None = None
    reproduced: bool | None = None  # every replicate's test logits bitwise equal to the baseline's
    froze_baseline: bool = False
    baseline_reason: str = ""  # why this record froze a baseline
    previous_baseline: int | None = None  # the baseline in force before this record froze one
    comparison: int | None = None  # 1 for the first rerun tested against this baseline, 2, …
    label_changes: tuple[int, ...] | None = None  # per replicate: test predictions that changed class
    changes: tuple[str, ...] = ()  # provenance that differs from the baseline's
    reasons: tuple[str, ...] = ()  # what the verdict rests on, in words

    @property
    def drift(self) -> bool:
        return self.verdict == "drift"

    def to_dict(self) -> dict[str, Any]:
        """The fields as ``reruns.json`` holds them (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def freeze(
    reason: str,
    alpha: float,
    previous: Mapping[str, Any] | None = None,
    previous_index: int | None = None,
    current: Mapping[str, Any] | None = None,
) -> Verdict:
    """A record that freezes a new baseline; ``previous``: the baseline it replaces, if any."""
    if previous is None or current is None:
        return Verdict("baseline", None, alpha, froze_baseline=True, baseline_reason=reason)
    moved = dict(previous["selected_params"]) != dict(current["selected_params"])
    reasons = ()
    if moved:
        reasons = (
            f"selected configuration changed: trial {previous['selected_trial']} "
            f"({params_text(previous['selected_params'])}) → trial {current['selected_trial']} "
            f"({params_text(current['selected_params'])}); a new baseline is frozen for it",
        )
    return Verdict(
        "selection_changed" if moved else "baseline",
        None,
        alpha,
        froze_baseline=True,
        baseline_reason=reason,
        previous_baseline=previous_index,
        changes=changes(previous, current),
        reasons=reasons,
    )


def compare(
    baseline: Mapping[str, Any],
    index: int,
    current: Mapping[str, Any],
    logits: NDArray,
    baseline_logits: NDArray | None,
    rerun: RerunConfig,
    comparison: int,
    rng: np.random.Generator,
) -> Verdict:
    """Test ``current`` (a record of the baseline's configuration, trained with its seeds) against
    the baseline record at ``index``; ``baseline_logits``: its stored test logits (None if lost)."""
    alpha = rerun.alpha_per_rerun
    base_k = _counts(baseline)
    p = permutation_p_value(base_k, np.asarray(current["test_k"]), rng)
    if baseline_logits is not None and baseline_logits.shape == logits.shape:
        same = baseline_logits.dtype == logits.dtype and np.array_equal(  # bits, so NaN == NaN too
            np.ascontiguousarray(baseline_logits).view(np.uint8), np.ascontiguousarray(logits).view(np.uint8)
        )
        flips = tuple(int(n) for n in (baseline_logits.argmax(-1) != logits.argmax(-1)).sum(-1))
    else:  # the predictions file is gone: the digests still say whether they are bitwise equal
        same = list(baseline.get("predictions_sha256") or ()) == list(current["predictions_sha256"])
        flips = None
    same = bool(same and list(baseline["seeds"]) == list(current["seeds"]))
    same = same and base_k.tolist() == list(current["test_k"])  # implied by equal predictions
    mean_b, mean_c = np.mean(base_k) / current["test_m"], np.mean(current["test_k"]) / current["test_m"]
    test = f"p = {p:.3g} {'<=' if p <= alpha else '>'} alpha = {alpha:.3g}"
    moved = code_changes(baseline, current)
    if same and not moved:
        verdict, reason = "reproduced", "every replicate's test predictions are bitwise the baseline's"
    elif same:  # identical numbers from other code or versions: consistent, not a reproduction
        verdict, reason = "consistent", (
            "every replicate's test predictions are bitwise the baseline's, but from other code or "
            f"versions ({'; '.join(moved)}), {test}"
        )
    elif p <= alpha:
        verdict, reason = "drift", f"mean test error {mean_b:.4f} → {mean_c:.4f}, {test}"
    else:
        verdict, reason = "consistent", f"mean test error {mean_b:.4f} → {mean_c:.4f}, {test}"
    reasons = [reason]
    floor = smallest_p_value(len(base_k))
    if floor > alpha:
        reasons.append(
            f"{len(base_k)} replicates per group give no p-value below {floor:.3g} > alpha: this test "
            "can never flag drift; rebaseline with more [rerun] seeds (>= 5 at alpha = 0.01)"
        )
    if rerun.alpha_spending == "bonferroni" and comparison > rerun.planned:
        reasons.append(
            f"rerun {comparison} against this baseline, beyond the {rerun.planned} planned: the "
            "schedule's alpha is spent; rebaseline (pipeline rerun --rebaseline) or raise planned"
        )
    return Verdict(
        verdict,
        index,
        alpha,
        p_value=p,
        reproduced=same,
        comparison=comparison,
        label_changes=flips,
        changes=changes(baseline, current),
        reasons=tuple(reasons),
    )


def _counts(record: Mapping[str, Any]) -> NDArray:
    """A record's replicate error counts (from its test errors where it predates ``test_k``)."""
    if "test_k" in record:
        return np.asarray(record["test_k"])
    return np.round(np.asarray(record["test_errors"]) * record["test_m"]).astype(int)


# provenance that names the code and the versions a reproduction must share (not host, device or threads)
CODE_KEYS = ("git_commit", "pipeline", "python", "torch", "numpy", "optuna", "mlflow", "scikit_learn")


def code_changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, ...]:
    """The code and package versions that differ between two records' provenance."""
    old, new = previous.get("provenance", {}), current.get("provenance", {})
    return tuple(f"{k}: {old.get(k)} → {new.get(k)}" for k in CODE_KEYS if old.get(k) != new.get(k))


def changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, ...]:
    """What differs between two records' setups: data, config, seeds, trial target, provenance."""
    notes = []
    for key in ("split_hash", "config_hash", "seeds", "trials_target"):
        if previous.get(key) != current.get(key):
            notes.append(f"{key}: {previous.get(key)} → {current.get(key)}")
    old, new = previous.get("provenance", {}), current.get("provenance", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            notes.append(f"{key}: {old.get(key)} → {new.get(key)}")
    return tuple(notes)


def environment() -> dict[str, str]:
    """Where the replicates trained, beside ``tracking.provenance(device)``: host and CPU threads."""
    return {
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }


def describe_test(seeds: int) -> str:
    """The drift test in words, for the record and the page."""
    splits = math.comb(2 * seeds, seeds)
    how = (
        f"exact over all {splits:,} splits"
        if splits <= PERMUTATION_EXACT_LIMIT
        else f"{PERMUTATION_RESAMPLES:,} seeded random splits"
    )
    return (
        f"two-sided permutation test of the difference in mean test error, {seeds} vs {seeds} "
        f"replicates ({how})"
    )
