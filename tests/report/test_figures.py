"""Study figures: contour plots only from enough trials, log axes a reader can read.

Oracles: the trial count the plot was given, and matplotlib's own tick labels after drawing.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from pipeline.report.figures import CONTOUR_MIN_TRIALS, legible_log_axes, optuna_figures

DIST = {"lr": FloatDistribution(1e-3, 0.5, log=True), "momentum": FloatDistribution(0.0, 0.95)}


def _study(n):
    study = optuna.create_study(direction="maximize")
    for i in range(n):
        lr, momentum = 1e-3 * 500 ** (i / max(n - 1, 1)), 0.9 * i / max(n - 1, 1)  # the demo's range
        study.add_trial(
            create_trial(value=0.5 + 0.01 * i, params={"lr": lr, "momentum": momentum}, distributions=DIST)
        )
    return study


@pytest.mark.parametrize("n", [CONTOUR_MIN_TRIALS - 1, CONTOUR_MIN_TRIALS])
def test_contour_needs_ten_complete_trials(tmp_path, n):
    figures = optuna_figures(_study(n), tmp_path, "val_acc")
    if n < CONTOUR_MIN_TRIALS:
        assert figures["contour"].path is None
        assert f"this study has {n}" in figures["contour"].note
    else:
        assert figures["contour"].path is not None and figures["contour"].path.stat().st_size > 0
    assert figures["slice"].path is not None  # the slice plot does not wait


def test_log_axes_label_a_few_decades_only():
    with matplotlib.rc_context():
        axes = optuna.visualization.matplotlib.plot_slice(_study(12), params=["lr", "momentum"])
        log_ax = next(ax for ax in axes if ax.get_xscale() == "log")
        fig = log_ax.figure
        fig.set_size_inches(7.2, 3.6)
        legible_log_axes(axes)
        fig.canvas.draw()
        labels = [t for t in log_ax.get_xticklabels(minor=False) if t.get_text() and t.get_visible()]
        lo, hi = log_ax.get_xlim()
        shown = [t for t in labels if lo <= t.get_position()[0] <= hi]
        assert 2 <= len(shown) <= 5
        minor = [
            t for t in log_ax.get_xticklabels(minor=True) if t.get_text() and lo <= t.get_position()[0] <= hi
        ]
        assert not minor  # no minor labels
        boxes = [t.get_window_extent() for t in shown]
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))  # no two labels overlap
        plt.close(fig)
