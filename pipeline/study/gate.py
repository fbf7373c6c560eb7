"""The pre-study gate: the lab's gradient check of the study's model, as its own MLflow run.

A study with ``[gradcheck] enabled`` runs no trial until the hand-written backward pass agrees
with autograd and the finite differences (``pipeline.gradcheck``); ``pipeline gradcheck`` runs
the same check on its own. It runs on the CPU whatever ``[training] device`` says: it checks the
hand-written backward pass in float64, which does not depend on where the trials train.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import device as devices
from pipeline import tracking
from pipeline.config import StudyConfig
from pipeline.data import load_split
from pipeline.gradcheck import format_table, gradient_check, save_gradcheck
from pipeline.model import build_mlp
from pipeline.storage import StudyError


class GradcheckFailed(StudyError):
    """The hand-written backward pass disagrees with autograd or the finite differences."""


def run_gradcheck(cfg: StudyConfig, *, tracking_uri: str | None = None, reports_root: Path = Path("reports")):
    """The lab's directional gradient check of the study's model at its initial weights.

    Pass/fail: the float64 disagreement between the manual and autograd directional derivatives
    must be within ``gradcheck.tolerance``; for a smooth (tanh) net the float64 finite-difference
    error must be too. (With ReLU a perturbation can cross the kink at 0, which makes the finite
    difference itself off by more than round-off, however right the gradient is.)
    """
    split = load_split(cfg.dataset)
    model = build_mlp(split.input_dim, cfg.model.hidden, cfg.model.activation, cfg.training.seed)
    n = min(cfg.gradcheck.max_examples, len(split.x_train))
    result = gradient_check(
        model,
        split.x_train[:n],
        split.y_train[:n],
        cfg.training.loss,
        seed=cfg.training.seed,
        eps64=(1e-2, 1e-3, 1e-4, 1e-5),
    )
    folder = reports_root / cfg.name / "gradcheck"
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = save_gradcheck(result, folder)
    tol = cfg.gradcheck.tolerance
    rows64 = [r for r in result.rows if r.dtype == "float64" and r.eps == 1e-5]
    at_1e5 = max((max(r.error_manual, r.error_autograd) for r in rows64), default=math.nan)
    failures = []
    if not result.max_disagreement64 <= tol:
        failures.append(f"manual vs autograd differ by {result.max_disagreement64:.3g} > {tol:g}")
    if cfg.model.activation == "tanh" and not at_1e5 <= tol:
        failures.append(f"float64 finite-difference error {at_1e5:.3g} > {tol:g} at eps = 1e-5")
    mlflow = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(mlflow, cfg.name)
    run_id = mlflow.create_run(
        exp_id,
        run_name="gradcheck",
        tags={
            "pipeline_role": "gradcheck",
            "optuna_study": cfg.name,
            **tracking.provenance(devices.resolve("cpu")),
        },
    ).info.run_id
    metrics = {"max_error64_eps1e-5": at_1e5, "max_disagreement64": result.max_disagreement64}
    for r in result.rows:
        metrics[f"error_{r.name}_{r.dtype}_eps{r.eps:g}"] = r.error_manual
    metrics.update({f"order_{k}_float64": v for k, v in result.order64.items() if math.isfinite(v)})
    tracking.log(
        mlflow,
        run_id,
        params={"examples": n, "loss": cfg.training.loss, "seed": cfg.training.seed, "tolerance": tol},
        metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
        tags={"passed": not failures},
    )
    for path in (json_path, png_path):
        mlflow.log_artifact(run_id, str(path))
    mlflow.set_terminated(run_id, "FINISHED" if not failures else "FAILED")
    return result, format_table(result), failures, folder
