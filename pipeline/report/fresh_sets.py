"""The lab's figure for the selected trial: its test error over ``[bounds] fresh_sets`` fresh test sets.

Only a ground-truth study (``dataset.source = "gmm"``) can draw fresh test sets, and only the
selected trial, at the end of the study, gets the full number; each trial's own report keeps the
exact coverage and a small simulated check (``report.trial.ground_truth_check``). The selected
trial's network (its ``model.pt``) classifies S fresh sets of the study's test size m; their test
errors R_T are set against the exact Binomial(m, R)/m, R the trial's true error from its
``metrics.json``, and each interval method's share of sets whose interval holds R against its exact
coverage. The sets come from ``derive_seed(dataset.seed, "fresh-sets", trial)``, so the page keeps
its bytes when rebuilt.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from optuna.trial import FrozenTrial

from pipeline import bounds, tracking
from pipeline.config import StudyConfig
from pipeline.data import GaussianMixture, load_split
from pipeline.evaluate import predict_logits
from pipeline.model import WeightsError, load_weights, network_from_state
from pipeline.report.figures import plot_true_distribution
from pipeline.report.html import Figure, figure
from pipeline.report.study_summary import TrialOutputs
from pipeline.seeds import derive_seed
from pipeline.train import trial_setup

CHUNK_POINTS = 2_000_000  # fresh points drawn and classified at once (≈ 40 MB); it fixes the draws too
FORWARD_FLOATS = 2**21  # activations per forward pass (8 MB, cache-sized): rows = this / widest layer
SIMULATED = ("clopper_pearson", "wilson", "hoeffding", "chebyshev", "bernstein", "empirical_bernstein")
R_GRID = 21  # R values across R ± 2·SD(R) at which the exact coverage's range is taken
FIGURE = "selected_fresh_sets.png"


@dataclass(frozen=True)
class MethodCoverage:
    """One interval method over the fresh sets, beside its exact coverage of R."""

    method: str
    guaranteed: bool
    exact: float  # Σ_k Binom(k; m, R)·[R ∈ I(k)], as the trial's metrics.json holds it
    exact_low: float  # the same sum, least and greatest over R ± 2·SD(R) (R is a Monte Carlo estimate)
    exact_high: float
    simulated: float  # share of the S sets whose interval holds R
    mc_sd: float  # √(c(1 − c)/S) at c = the exact coverage: the simulated one's SD about it


@dataclass(frozen=True, eq=False)  # holds an array: compare by identity
class FreshSets:
    """S fresh test sets of m points, classified by one network: their error counts and coverage."""

    m: int
    seed: int
    confidence: float
    true_error: float  # R
    true_error_sd: float  # its Monte Carlo SD (0: known exactly)
    k: NDArray[np.int64]  # errors on each set
    coverage: tuple[MethodCoverage, ...]

    @property
    def n_sets(self) -> int:
        return int(self.k.size)

    @property
    def errors(self) -> NDArray[np.float64]:
        """R_T of each set."""
        return self.k / self.m

    @property
    def mean(self) -> float:
        return float(self.errors.mean())

    @property
    def sd(self) -> float:
        return float(self.errors.std(ddof=1))

    @property
    def binomial_sd(self) -> float:
        """SD of Binomial(m, R)/m."""
        return math.sqrt(self.true_error * (1 - self.true_error) / self.m)

    @property
    def mean_mc_sd(self) -> float:
        """SD of the mean of S sets' R_T about R."""
        return self.binomial_sd / math.sqrt(self.n_sets)

    @property
    def sd_mc_sd(self) -> float:
        """SD of the sets' sample SD, ≈ σ/√(2(S − 1)) (normal approximation; the binomial is near it)."""
        return self.binomial_sd / math.sqrt(2 * (self.n_sets - 1))


@dataclass(frozen=True)
class FreshSection:
    """The study page's section: the selected trial's fresh sets and figure, or why there are none."""

    trial: int
    result: FreshSets | None
    figure: Figure
    note: str = ""

    @property
    def rows(self) -> tuple[tuple[str | float, ...], ...]:
        """The coverage table: method, guaranteed, exact, its range over R ± 2 SD(R), simulated, MC SD."""
        return tuple(
            (
                c.method,
                "yes" if c.guaranteed else "no",
                c.exact,
                f"{c.exact_low:.4g} – {c.exact_high:.4g}",
                c.simulated,
                c.mc_sd,
            )
            for c in (self.result.coverage if self.result is not None else ())
        )


def error_counts(
    model: torch.nn.Module, truth: GaussianMixture, m: int, n_sets: int, seed: int
) -> NDArray[np.int64]:
    """Errors of ``model`` on each of ``n_sets`` fresh test sets of ``m`` points (labels sampled),
    drawn in chunks of whole sets of at most CHUNK_POINTS points from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    per_chunk = max(1, CHUNK_POINTS // m)
    # rows per forward pass by the widest layer: at width 500, 4× faster than predict_logits' 8192
    rows = max(1024, FORWARD_FLOATS // max(p.shape[0] for p in model.parameters()))
    k = np.empty(n_sets, dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n_sets, per_chunk):
            sets = min(per_chunk, n_sets - start)
            x, y = truth.sample(sets * m, gen)
            wrong = predict_logits(model, x, rows).argmax(1) != y
            k[start : start + sets] = wrong.view(sets, m).sum(1).numpy()
    return k


def simulate(
    model: torch.nn.Module,
    truth: GaussianMixture,
    m: int,
    n_sets: int,
    seed: int,
    true_error: float,
    confidence: float,
    exact: dict[str, float] | None = None,
    true_error_sd: float = 0.0,
) -> FreshSets:
    """The fresh sets and, per SIMULATED method (``bounds.count_intervals``), their coverage of R.

    ``exact``: each method's exact coverage of R as the trial's metrics.json holds it; a method
    missing there gets the same sum computed here (``bounds.exact_coverage``).
    """
    k = error_counts(model, truth, m, n_sets, seed)
    spread = np.linspace(-2, 2, R_GRID) * true_error_sd if true_error_sd > 0 else np.zeros(1)
    around = [  # the closed-form methods' exact coverage at each R of the grid, in METHODS order
        {c.method: c.coverage for c in bounds.exact_coverage(m, r, confidence, bca="skip")}
        for r in np.clip(true_error + spread, 0.0, 1.0)
    ]
    at_r = around[len(around) // 2]  # the grid's middle is R itself
    exact = {**at_r, **(exact or {})}
    rows = []
    for method, (low, high) in bounds.count_intervals(k, m, confidence).items():
        simulated = float(((low <= true_error) & (true_error <= high)).mean())
        values = [cov[method] for cov in around]
        rows.append(
            MethodCoverage(
                method,
                bounds.GUARANTEED[method],
                exact[method],
                min(values),
                max(values),
                simulated,
                math.sqrt(exact[method] * (1 - exact[method]) / n_sets),
            )
        )
    return FreshSets(m, seed, confidence, true_error, true_error_sd, k, tuple(rows))


def ground_truth(cfg: StudyConfig) -> GaussianMixture | None:
    """The study's ground truth; None for image data (read nothing then)."""
    return load_split(cfg.dataset).ground_truth if cfg.dataset.source == "gmm" else None


def selected_section(
    cfg: StudyConfig,
    trial: FrozenTrial | None,
    outputs: TrialOutputs | None,
    page_dir: Path,
    mlflow,
    folder: Path,
) -> FreshSection | None:
    """The selected trial's section, its figure written into ``folder``; None without a ground
    truth or without the trial's ground-truth numbers (nothing to compare with)."""
    if trial is None or outputs is None or "ground_truth" not in outputs.metrics:
        return None
    truth = ground_truth(cfg)
    if truth is None:
        return None
    state, where = _weights(trial, page_dir, mlflow)
    if state is None:
        return FreshSection(trial.number, None, Figure(""), where)
    block = outputs.metrics["ground_truth"]
    exact = {r["method"]: r["exact_coverage"] for r in block.get("coverage", ())}
    result = simulate(
        _network(cfg, trial, state),
        truth,
        outputs.m,
        cfg.bounds.fresh_sets,
        derive_seed(cfg.dataset.seed, "fresh-sets", trial.number),
        block["true_error"],
        outputs.metrics.get("confidence", cfg.bounds.confidence),
        {method: v for method, v in exact.items() if method in SIMULATED and v is not None},
        block.get("true_error_sd", 0.0),
    )
    path = folder / FIGURE
    plot_true_distribution(result.m, result.true_error, outputs.metrics["test_error"], path, result.errors)
    return FreshSection(trial.number, result, figure(path))


def _weights(trial: FrozenTrial, page_dir: Path, mlflow) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The trial's model.pt (its report folder, else its MLflow run), or None and why not."""
    folders = [page_dir / f"trial-{trial.number:04d}"]
    if trial.user_attrs.get("report"):
        folders.append(Path(trial.user_attrs["report"]).parent)
    found = next((f / "model.pt" for f in folders if (f / "model.pt").is_file()), None)
    run_id = trial.user_attrs.get("mlflow_run_id")
    with tempfile.TemporaryDirectory() as tmp:
        if found is None and mlflow is not None and run_id:
            found = tracking.download_artifact(mlflow, run_id, "model.pt", tmp)
        if found is None:
            return None, (
                f"trial {trial.number}'s model.pt was found neither in its report folder nor in its "
                "MLflow run: no fresh test sets"
            )
        try:  # weights_only: a file holding anything but tensors is refused, not unpickled
            state = load_weights(found)
        except (WeightsError, RuntimeError, OSError) as exc:
            return None, f"trial {trial.number}'s model.pt could not be read ({exc}): no fresh test sets"
    return state, ""


def _network(cfg: StudyConfig, trial: FrozenTrial, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trial's MLP (shape from its params, widths and dtype from the weights) holding ``state``."""
    shape, _ = trial_setup(cfg.model, trial.params)
    return network_from_state(shape.hidden, shape.activation, state)
