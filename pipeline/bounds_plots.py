"""Figures for the test-error study: bootstrap histogram with intervals, true distribution, coverage.

Figures are built with matplotlib.figure.Figure (no pyplot, no global state) and written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import ArrayLike, NDArray

from pipeline.bounds import Coverage, Interval
from pipeline.files import save_figure

_STYLE = {True: dict(linestyle="-", color="tab:green"), False: dict(linestyle="--", color="tab:orange")}
_KIND = {True: "guaranteed", False: "approximate"}


def error_histogram_bins(m: int, lo: float, hi: float) -> NDArray[np.float64]:
    """Bin edges (k − 0.5)/m, one error level 1/m apart, covering [lo, hi].

    R_T only takes the values k/m, so each bin holds exactly one level (lab 2, Part 3 note).
    """
    first = math.floor(lo * m + 0.5)
    last = max(math.ceil(hi * m + 0.5), first + 1)
    return (np.arange(first, last + 1) - 0.5) / m


def plot_bounds(
    distribution: ArrayLike | None,
    empirical_error: float,
    intervals: Sequence[Interval],
    m: int,
    path: str | os.PathLike[str],
) -> None:
    """Density histogram of the bootstrap test error with R_T and each available interval on top."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    shown = [iv for iv in intervals if iv.available]
    values = [empirical_error] + [x for iv in shown for x in (iv.low, iv.high)]
    if distribution is not None:
        dist = np.asarray(distribution, dtype=float)
        edges = error_histogram_bins(m, min(dist.min(), *values), max(dist.max(), *values))
        heights, _, _ = ax.hist(dist, bins=edges, density=True, color="tab:blue", alpha=0.5)
        base, step = 1.05 * heights.max(), 0.1 * heights.max()
        ax.set_title(f"Bootstrap distribution of the test error (m = {m})")
    else:
        base, step = 1.0, 1.0
        ax.set_yticks([])
        ax.set_title(f"Intervals only: no bootstrap distribution (all errors equal, m = {m})")
    ax.axvline(empirical_error, color="black", linewidth=1)
    for i, iv in enumerate(shown):
        y = base + i * step
        # end ticks keep a zero-width interval (Chebyshev at k = 0) visible
        ax.plot([iv.low, iv.high], [y, y], linewidth=2, marker="|", markersize=8, **_STYLE[iv.guaranteed])
        ax.text(iv.high, y, f" {iv.method}", va="center", fontsize=8)
    ax.set_ylim(0, base + len(shown) * step)
    ax.set_xlabel("test error")
    ax.set_ylabel("density" if distribution is not None else "")
    handles = [
        Line2D([], [], color="black", linewidth=1, label=f"empirical error R_T = {empirical_error:.4f}")
    ]
    handles += [Line2D([], [], linewidth=2, label=f"{_KIND[g]} interval", **_STYLE[g]) for g in (True, False)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    save_figure(fig, path, dpi=100)


def plot_true_distribution(
    fresh_errors: ArrayLike,
    true_error: float,
    single_error: float,
    m: int,
    path: str | os.PathLike[str],
) -> None:
    """Density histogram of R_T over many fresh test sets, with the true error and one set's R_T."""
    errors = np.asarray(fresh_errors, dtype=float)
    edges = error_histogram_bins(m, min(errors.min(), single_error), max(errors.max(), single_error))
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    ax.hist(
        errors, bins=edges, density=True, color="tab:blue", alpha=0.5, label=f"{errors.size} fresh test sets"
    )
    ax.axvline(true_error, color="black", linewidth=1.5, label=f"true error {true_error:.4f}")
    ax.axvline(single_error, color="tab:red", linestyle="--", label=f"single test set {single_error:.4f}")
    ax.set_title(f"Empirical test error over fresh test sets (m = {m})")
    ax.set_xlabel("test error")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def plot_coverage(coverages: Sequence[Coverage], path: str | os.PathLike[str]) -> None:
    """Bar per method of the fraction of test sets whose interval held the true error, vs nominal."""
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    shown = [c for c in coverages if math.isfinite(c.coverage)]
    x = np.arange(len(shown))
    colors = [_STYLE[c.guaranteed]["color"] for c in shown]
    ax.bar(x, [c.coverage for c in shown], color=colors)
    ax.set_xticks(x, [f"{c.method}\n(n={c.n_sets})" for c in shown], fontsize=7)
    nominal = shown[0].nominal if shown else math.nan
    ax.axhline(nominal, color="black", linestyle=":")
    _limit_coverage_axis(ax, [c.coverage for c in shown] + [nominal])
    ax.set_ylabel("coverage")
    handles = [Line2D([], [], color=_STYLE[g]["color"], linewidth=6, label=_KIND[g]) for g in (True, False)]
    ax.legend(
        handles=handles + [Line2D([], [], color="black", linestyle=":", label=f"nominal {nominal:g}")],
        fontsize=8,
    )
    ax.set_title("Coverage of the true error")
    save_figure(fig, path, dpi=100)


def _limit_coverage_axis(ax: Axes, values: Sequence[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    low = min(finite, default=0.0)
    ax.set_ylim(max(0.0, low - 0.05), 1.005)
