"""One trial's life: suggest → train → validate → test → bounds → report, inside one MLflow run.

``begin_trial`` suggests the params and opens the trial's nested MLflow run; ``finish_trial``
evaluates, bounds, reports and logs a trained model; ``run_trial`` is the Optuna objective that
joins them around ``train``. The population driver reuses ``begin_trial`` and ``finish_trial``
around its own batched training. The test set is evaluated and logged for every trial but never
used to choose anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from pipeline import tracking
from pipeline.config import ModelConfig, StudyConfig
from pipeline.data import Split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.report.trial import TrialArtifacts, bounds_and_report
from pipeline.storage import StudyError
from pipeline.study.progress import epoch_bar
from pipeline.train import DTYPES, EpochRecord, Hyper, TrainResult, train, trial_setup


def suggest(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """Every searched key, fixed values included (as one-choice categoricals, so the grid sees them)."""
    values = {}
    for key, spec in cfg.search.items():
        if spec.kind == "range":
            values[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        else:
            values[key] = trial.suggest_categorical(key, list(spec.choices or (spec.value,)))
    return values


@dataclass
class TrialContext:
    cfg: StudyConfig
    split: Split
    mlflow: Any
    experiment_id: str
    parent_run_id: str
    reports: Path
    provenance: dict[str, str]
    show_epochs: bool = False


@dataclass(frozen=True)
class TrialPlan:
    """What one trial will train: its suggested params and the MLflow run that records it."""

    run_id: str
    params: dict[str, Any]
    hyper: Hyper
    model: ModelConfig


# the few keys beside the searched params that a comparison across trial runs needs
COMPARED = (
    "training.epochs",
    "training.batch_size",
    "training.seed",
    "training.population",
    "dataset.source",
    "dataset.classes",
    "model.hidden",
    "model.activation",
)


def dataset_input(cfg: StudyConfig, split: Split) -> tuple[str, str, str]:
    """(name, source, digest) of the study's data for MLflow's dataset inputs."""
    name = f"{cfg.dataset.source}:{'-vs-'.join(split.classes)}"
    return name, split.source, split.split_hash


def begin_trial(trial: optuna.Trial, ctx: TrialContext) -> TrialPlan:
    """Suggest the trial's params and open its nested MLflow run with params and provenance."""
    cfg = ctx.cfg
    params = suggest(trial, cfg)
    model_cfg, hyper = trial_setup(cfg.model, params)
    tags = {
        "optuna_trial": trial.number,
        "optuna_study": cfg.name,
        "config_hash": cfg.config_hash(),
        "split_hash": ctx.split.split_hash,
        **ctx.provenance,
    }
    name = f"trial-{trial.number:04d}"
    run_id = tracking.trial_run(ctx.mlflow, ctx.experiment_id, ctx.parent_run_id, name, tags)
    trial.set_user_attr("mlflow_run_id", run_id)
    resolved = tracking.flatten({**cfg.to_dict(), "model": dataclasses.asdict(model_cfg)})
    compared = {key: resolved[key] for key in COMPARED if key in resolved}  # the study's constants
    tracking.log(  # are on the parent run: a trial run holds what tells it apart, and what compares it
        ctx.mlflow, run_id, params={**compared, **params}, metrics={"trial_number": trial.number}
    )
    tracking.log_dataset(ctx.mlflow, run_id, *dataset_input(cfg, ctx.split))
    return TrialPlan(run_id, params, hyper, model_cfg)


def build_model(ctx: TrialContext, plan: TrialPlan) -> torch.nn.Module:
    """The trial's MLP; its initial weights depend only on the training seed."""
    return build_mlp(
        ctx.split.input_dim,
        plan.model.hidden,
        plan.model.activation,
        ctx.cfg.training.seed,
        dtype=DTYPES[ctx.cfg.training.dtype],
    )


def epoch_callback(trial: optuna.Trial, ctx: TrialContext, buffer: tracking.MetricBuffer, bar=None):
    """Per epoch: buffer the metrics for MLflow, report the objective to Optuna, ask the pruner."""

    def on_epoch(record: EpochRecord) -> bool:
        buffer.add(record.metrics(), step=record.epoch)
        if bar is not None:
            bar.update(1)
        trial.report(record.val_acc if ctx.cfg.objective == "val_acc" else record.val_loss, record.epoch)
        return trial.should_prune()

    return on_epoch


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float:
    """The Optuna objective: every stage of one trial inside its MLflow run."""
    plan = begin_trial(trial, ctx)
    status = "FAILED"
    try:
        model = build_model(ctx, plan)
        buffer = tracking.MetricBuffer(ctx.mlflow, plan.run_id)
        bar = epoch_bar(ctx.cfg.training.epochs, f"trial {trial.number}", ctx.show_epochs)
        try:
            result = train(
                model, ctx.split, plan.hyper, ctx.cfg.training, epoch_callback(trial, ctx, buffer, bar)
            )
        finally:
            buffer.flush()
            bar.close()
        value = finish_trial(trial, ctx, plan, model, result)
        status = "FINISHED"
        return value
    except optuna.TrialPruned:
        status = "FINISHED"
        raise
    except Exception as exc:  # Optuna keeps no message for a FAIL: record it for the study page
        with contextlib.suppress(Exception):
            trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:1000])
        raise
    finally:
        ctx.mlflow.set_terminated(plan.run_id, status)


def finish_trial(
    trial: optuna.Trial, ctx: TrialContext, plan: TrialPlan, model: torch.nn.Module, result: TrainResult
) -> float:
    """Validate, test, bound and report a trained model; raise TrialPruned if it diverged or was pruned.

    Does not end the MLflow run: the caller does, with the status it decides.
    """
    cfg, split, run_id = ctx.cfg, ctx.split, plan.run_id
    if result.diverged_at is not None or result.stopped_at is not None:
        _prune(trial, ctx, run_id, result)
    val = evaluate(model, split.x_val, split.y_val, split.classes, cfg.training.loss)
    test = evaluate(model, split.x_test, split.y_test, split.classes, cfg.training.loss)
    folder = ctx.reports / f"trial-{trial.number:04d}"
    artifacts: TrialArtifacts = bounds_and_report(
        folder=folder,
        cfg=cfg,
        split=split,
        model=model,
        trial_number=trial.number,
        params=plan.params,
        result=result,
        val=val,
        test=test,
        provenance={**ctx.provenance, "run_id": run_id},
    )
    final = {
        "val_acc": val.accuracy,
        "val_loss": val.loss,
        "test_acc": test.accuracy,
        "test_error": test.error,
        "best_val_acc": result.best_val_acc,
        "train_seconds": result.seconds,
        "epochs_run": len(result.history),
        **artifacts.metrics,
    }
    # val_acc / val_loss are already logged per epoch; the last epoch's value is the final one
    logged = {k: v for k, v in final.items() if k not in ("val_acc", "val_loss")}
    try:
        tracking.log(
            ctx.mlflow, run_id, metrics=logged, tags={"trial_state": "COMPLETE"}, step=len(result.history)
        )
        for path in artifacts.files:
            ctx.mlflow.log_artifact(run_id, str(path))
        _log_weights(ctx, run_id, model)
    except BaseException:  # the trial fails: its report folder must not look like a complete trial's
        shutil.rmtree(folder, ignore_errors=True)
        raise
    for key in ("val_acc", "test_error", "test_acc", "epochs_run", "train_seconds"):
        trial.set_user_attr(key, final[key])
    for key, value in artifacts.metrics.items():
        if key.startswith("test_error_clopper_pearson"):
            trial.set_user_attr(key, value)
    trial.set_user_attr("report", str(folder / "report.html"))
    value = val.accuracy if cfg.objective == "val_acc" else val.loss
    if not math.isfinite(value):  # never hand Optuna a non-finite value: it would record inf
        _prune(trial, ctx, run_id, dataclasses.replace(result, diverged_at=len(result.history)))
    return value


def _prune(trial, ctx: TrialContext, run_id: str, result: TrainResult) -> None:
    """Diverged or pruned: keep the partial curves, record the reason, tell Optuna PRUNED."""
    reason = (
        result.outcome
        if result.diverged_at is not None
        else (f"pruned by {ctx.cfg.pruner.kind} pruner after epoch {result.stopped_at}")
    )
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("epochs_run", len(result.history))
    tracking.log(
        ctx.mlflow,
        run_id,
        tags={"trial_state": "PRUNED", "reason": reason},
        metrics={"epochs_run": len(result.history)},
    )
    raise optuna.TrialPruned(reason)


def _log_weights(ctx: TrialContext, run_id: str, model: torch.nn.Module) -> None:
    """The trained state dict as an artifact; load it back with ``torch.load(weights_only=True)``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        ctx.mlflow.log_artifact(run_id, str(path))


def load_weights(path: str | Path, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A trial's ``model.pt`` as a state dict (into ``model`` too, if given), tensors only.

    ``weights_only=True``: a file that holds anything but tensors and plain containers is refused
    instead of unpickled, so a tampered artifact cannot run code.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StudyError(f"{path}: refused, not a plain state dict of tensors ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudyError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    if model is not None:
        model.load_state_dict(state)
    return state
