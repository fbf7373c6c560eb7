"""Every figure the reports embed: learning curves, confusion matrix, the bounds stage's plots,
decision boundaries, Optuna's study plots, the forest plot and the rerun history.

Each writes a PNG atomically (``pipeline.files.save_figure``) and returns its path. Figures are
drawn on ``matplotlib.figure.Figure`` objects (no pyplot state), except Optuna's own plots, which
are drawn through pyplot inside an ``rc_context`` and closed.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import optuna.visualization.matplotlib as ovm
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter
from numpy.typing import ArrayLike, NDArray
from optuna.trial import TrialState
from scipy import stats
from sklearn.metrics import ConfusionMatrixDisplay

from pipeline.bounds import Coverage, ExactCoverage, Interval
from pipeline.compare import bonferroni_clopper_pearson
from pipeline.data import Split
from pipeline.evaluate import Evaluation, predict_logits
from pipeline.files import save_figure
from pipeline.report.study_summary import StudySummary, TrialOutputs
from pipeline.storage import ranked_trials
from pipeline.train import EpochRecord


def plot_confusion(evaluation: Evaluation, classes: Sequence[str], path: Path, title: str) -> Path:
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(evaluation.confusion, display_labels=list(classes)).plot(
        ax=ax, colorbar=False, values_format="d"
    )
    ax.set_title(title)
    return save_figure(fig, path)


def plot_curves(
    history: Sequence[EpochRecord], path: Path, mean: Sequence[EpochRecord] | None = None
) -> Path:
    """Loss and accuracy per epoch, train and validation; with ``mean``, the mean over seeds too."""
    epochs = [r.epoch for r in history]
    fig = Figure(figsize=(9, 3.4))
    for ax, key, label in (
        (fig.add_subplot(1, 2, 1), "loss", "loss"),
        (fig.add_subplot(1, 2, 2), "acc", "accuracy"),
    ):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], "o-", ms=2, label="train")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], "o-", ms=2, label="validation")
        if mean is not None:
            ax.plot(
                [r.epoch for r in mean],
                [getattr(r, f"val_{key}") for r in mean],
                "k--",
                label="validation, seed mean",
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_replicates(replicates, path: Path) -> Path:
    """Strip plot of a trial's seed replicates: validation accuracy and test error, one dot per
    seed, the mean as a bar; stalled seeds in red."""
    fig = Figure(figsize=(6, 3))
    colors = ["tab:red" if s else "tab:blue" for s in replicates.stalled]
    for i, (values, label) in enumerate(
        ((replicates.val_acc, "validation accuracy"), (replicates.test_error, "test error")), start=1
    ):
        ax = fig.add_subplot(1, 2, i)
        x = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x, values, c=colors, zorder=3)
        ax.hlines(np.mean(values), -0.3, 0.3, color="k", label="mean")
        ax.set_xlim(-0.5, 0.5)
        ax.set_xticks([])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{len(replicates.seeds)} seeds (red: stalled at chance level)", fontsize=9)
    return save_figure(fig, path)


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
        heights, _ = np.histogram(dist, bins=edges, density=True)
        ax.stairs(heights, edges, fill=True, color="tab:blue", alpha=0.5)  # one artist, not a bar per bin
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
    m: int,
    true_error: float,
    single_error: float,
    path: str | os.PathLike[str],
    fresh_errors: ArrayLike | None = None,
) -> None:
    """The exact distribution of R_T = k/m, k ~ Binomial(m, true_error), as a density over the
    levels k/m, with the true error, one set's R_T and, if given, simulated fresh sets' R_T."""
    fresh = np.asarray(fresh_errors if fresh_errors is not None else (), dtype=float)
    k = np.arange(m + 1)
    pmf = stats.binom.pmf(k, m, true_error)
    visible = k[pmf >= 1e-4 * pmf.max()] / m  # beyond this the bars are thinner than a pixel
    values = [visible.min(), visible.max(), single_error] + ([fresh.min(), fresh.max()] if fresh.size else [])
    edges = error_histogram_bins(m, min(values), max(values))
    first = round(edges[0] * m + 0.5)
    levels = np.arange(first, first + len(edges) - 1)
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    ax.stairs(
        m * stats.binom.pmf(levels, m, true_error),
        edges,
        fill=True,
        color="tab:blue",
        alpha=0.5,
        label=f"exact: Binomial(m, R)/m at R = {true_error:.4f}",
    )
    if fresh.size:
        # a few sets per level would be mostly empty bins: group levels, about 3 bins per binomial SD
        group = max(1, round(math.sqrt(m * true_error * (1 - true_error)) / 3))
        coarse = edges[0] + np.arange(math.ceil((len(edges) - 1) / group) + 1) * group / m
        heights, _ = np.histogram(fresh, bins=coarse, density=True)
        ax.stairs(
            heights, coarse, color="black", linewidth=1, label=f"{fresh.size} simulated fresh test sets"
        )
    ax.axvline(true_error, color="black", linewidth=1.5, label=f"true error {true_error:.4f}")
    ax.axvline(single_error, color="tab:red", linestyle="--", label=f"single test set {single_error:.4f}")
    ax.set_title(f"Distribution of the test error over fresh test sets (m = {m})")
    ax.set_xlabel("test error")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def plot_coverage(
    exact: Sequence[ExactCoverage], simulated: Sequence[Coverage], path: str | os.PathLike[str]
) -> None:
    """Bar per method of its exact coverage of the true error, vs nominal; simulated coverage over
    fresh test sets, where there is one, as a dot with ± 2 binomial standard errors."""
    fig = Figure(figsize=(8, 4.4))
    ax = fig.add_subplot()
    shown = [c for c in exact if math.isfinite(c.coverage)]
    x = np.arange(len(shown))
    colors = [_STYLE[c.guaranteed]["color"] for c in shown]
    ax.bar(x, [c.coverage for c in shown], color=colors)
    ax.set_xticks(x, [c.method for c in shown], fontsize=7)
    sims = {c.method: c for c in simulated if math.isfinite(c.coverage)}
    values = [c.coverage for c in shown]
    at = [i for i, c in enumerate(shown) if c.method in sims]
    if at:
        rates = np.array([sims[shown[i].method].coverage for i in at])
        counts = np.array([sims[shown[i].method].n_sets for i in at])
        two_se = 2 * np.sqrt(rates * (1 - rates) / counts)
        ax.errorbar(at, rates, yerr=two_se, fmt="o", color="black", ms=4, capsize=3)
        values += list(rates - two_se)
    nominal = shown[0].nominal if shown else math.nan
    ax.axhline(nominal, color="black", linestyle=":")
    _limit_coverage_axis(ax, values + [nominal])
    ax.set_ylabel("coverage")
    handles = [
        Line2D([], [], color=_STYLE[g]["color"], linewidth=6, label=f"exact, {_KIND[g]}")
        for g in (True, False)
    ]
    if at:
        n = int(counts.max())
        handles.append(
            Line2D([], [], color="black", marker="o", linestyle="", label=f"simulated, {n} sets, ± 2 SE")
        )
    handles.append(Line2D([], [], color="black", linestyle=":", label=f"nominal {nominal:g}"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4)
    ax.set_title("Coverage of the true error: exact sum over k ~ Binomial(m, R)")
    save_figure(fig, path, dpi=100)


def _limit_coverage_axis(ax: Axes, values: Sequence[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    low = min(finite, default=0.0)
    ax.set_ylim(max(0.0, low - 0.05), 1.005)


def plot_decision_boundary(model: torch.nn.Module, split: Split, path: Path, title: str) -> Path:
    """p(y=1|x) as a filled contour over the data range, training points and the Bayes boundary."""
    if split.input_dim != 2:
        raise ValueError(
            f"a decision boundary needs 2-D inputs; {split.source} has {split.input_dim} features"
        )
    x = split.x_train
    lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
    gx, gy = torch.meshgrid(
        torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200), indexing="xy"
    )
    grid = torch.stack([gx.ravel(), gy.ravel()], 1)
    prob = torch.softmax(predict_logits(model, grid).double(), 1)[:, 1].view(200, 200)
    fig = Figure(figsize=(5.5, 4.6))
    ax = fig.add_subplot()
    filled = ax.contourf(gx, gy, prob, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.6)
    fig.colorbar(filled, ax=ax, label="model p(y=1 | x)")
    ax.contour(gx, gy, prob, levels=[0.5], colors="black", linewidths=1.5)
    if split.ground_truth is not None:
        bayes = split.ground_truth.posterior(grid).view(200, 200)
        ax.contour(gx, gy, bayes, levels=[0.5], colors="green", linewidths=1.5, linestyles="--")
    y = split.y_train
    ax.scatter(x[y == 0, 0], x[y == 0, 1], s=6, c="tab:blue", label=split.classes[0])
    ax.scatter(x[y == 1, 0], x[y == 1, 1], s=6, c="tab:red", label=split.classes[1])
    ax.plot([], [], "k-", label="model boundary")
    if split.ground_truth is not None:
        ax.plot([], [], "g--", label="Bayes boundary")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title)
    return save_figure(fig, path)


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


CONTOUR_MIN_TRIALS = 10  # complete trials before a contour plot is drawn


def optuna_figures(study: optuna.Study, folder: Path, objective: str) -> dict[str, Plot]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn says why instead.

    Optuna's plots go through pyplot and switch it to the ggplot style: each runs inside an
    ``rc_context`` (so the style does not leak into later figures) and its figure is closed.
    """
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
            legible_log_axes,
        )
    if len(params) < 2 or n_complete < CONTOUR_MIN_TRIALS:
        out["contour"] = Plot(
            None,
            f"contour plots are drawn from {CONTOUR_MIN_TRIALS} complete trials whose parameters vary "
            f"(this study has {n_complete}, {len(params)} varying): from fewer points the "
            "interpolated surface is mostly invented",
        )
    else:
        size = 3.3 * len(params) if len(params) > 2 else 6
        out["contour"] = _pyplot_png(
            lambda: ovm.plot_contour(study, params=params, target_name=objective),
            folder / "contour.png",
            (size + 1, size),
        )
    return out


def legible_log_axes(axes) -> None:
    """Log x axes with at most a few labelled decades: Optuna labels every minor tick, and at
    3.6 inches a panel the labels run into each other."""
    for ax in np.ravel(axes):
        if ax.get_xscale() == "log":
            ax.xaxis.set_major_locator(LogLocator(numticks=4))
            ax.xaxis.set_major_formatter(LogFormatterSciNotation())
            ax.xaxis.set_minor_formatter(NullFormatter())


def _pyplot_png(draw, path: Path, size: tuple[float, float], post=None) -> Plot:
    """Draw with pyplot, save, close; Optuna's warnings (other than "experimental") become the note.
    ``post(axes)`` adjusts the drawn axes before saving."""
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
            if post is not None:
                post(axes)
            fig.set_size_inches(*size)
            save_figure(fig, path)
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
        blow, bhigh = bonferroni_clopper_pearson(o.k, o.m, delta, max(summary.test_looks, 1))
        color = "tab:red" if t.number == summary.selected else "tab:blue"
        ax.plot([blow, bhigh], [y, y], color=color, lw=1.6)  # Bonferroni: thin, with end caps
        ax.plot([blow, bhigh], [y, y], "|", color=color, ms=11, mew=1.6)
        ax.plot([low, high], [y, y], color=color, lw=5, alpha=0.55, solid_capstyle="butt")
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
        f"thick: {pct:g} % Clopper–Pearson per trial; "
        f"thin, capped: Bonferroni over N = {summary.test_looks} test-set looks",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_reruns(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Every rerun's replicate test errors beside the baseline they were tested against.

    One column of points per record (a point per replicate, coloured by verdict; a bar at the
    mean); each baseline's range across replicates is a band, and its mean a dashed line, over the
    reruns tested against it, with each rerun's p-value above its column. Records from before
    baselines are grey. Written to a temporary file and renamed, like every other report file.
    """
    colours = {
        "baseline": "black",
        "selection_changed": "tab:orange",
        "reproduced": "tab:green",
        "consistent": "tab:blue",
        "drift": "tab:red",
        "old rule": "0.6",
    }
    dates = [f"#{i} {r['date'][:16].replace('T', ' ')}" for i, r in enumerate(history)]
    fig = Figure(figsize=(max(5.5, 0.8 * len(history) + 3), 3.8))
    ax = fig.add_subplot()
    for i, r in enumerate(history):
        verdict = r.get("verdict", "old rule")
        errors = np.asarray(r["test_errors"], dtype=float)
        offsets = np.linspace(-0.18, 0.18, len(errors)) if len(errors) > 1 else np.zeros(1)
        colour = colours.get(verdict, "0.6")
        marker = "s" if r.get("froze_baseline") else "o"
        ax.plot(i + offsets, errors, marker, color=colour, ms=4, alpha=0.75)
        ax.hlines(errors.mean(), i - 0.28, i + 0.28, color=colour, lw=2)
        if r.get("p_value") is not None:
            ax.text(
                i,
                0.97,
                f"p={r['p_value']:.2g}",
                transform=ax.get_xaxis_transform(),  # x in data, y as a fraction of the axes
                ha="center",
                va="top",
                fontsize=7,
                color=colour,
            )
    for b, base in enumerate(history):
        if not base.get("froze_baseline"):
            continue
        users = [i for i, r in enumerate(history) if r.get("baseline") == b]
        right = max(users, default=b) + 0.4
        errors = np.asarray(base["test_errors"], dtype=float)
        ax.fill_between([b - 0.4, right], errors.min(), errors.max(), color="0.5", alpha=0.12, lw=0)
        ax.hlines(errors.mean(), b - 0.4, right, color="0.25", lw=1, ls="--")
    handles = [
        Line2D([], [], marker="s" if v in ("baseline", "selection_changed") else "o", ls="", color=c, label=v)
        for v, c in colours.items()
        if any(r.get("verdict", "old rule") == v for r in history)
    ]
    handles.append(Line2D([], [], color="0.25", ls="--", label="baseline mean (band: its range)"))
    ax.set_xticks(np.arange(len(history)), dates, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(history) - 0.4)
    ax.margins(y=0.15)  # room for the p-values along the top
    ax.set_ylabel("test error (one point per replicate)")
    ax.set_title(f"{history[-1]['study']}: reruns against their baseline")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)
