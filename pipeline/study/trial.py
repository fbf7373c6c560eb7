"""One trial's life: suggest → train → validate → test → bounds → report, inside one MLflow run.

``begin_trial`` suggests the params and opens the trial's nested MLflow run; ``finish_trial``
evaluates, bounds, reports and logs a trained model; ``run_trial`` is the Optuna objective that
joins them around ``train``. The population driver reuses ``begin_trial`` and ``finish_trial``
around its own batched training. The test set is evaluated and logged for every trial but never
used to choose anything.

Where a trial's time goes is measured here and logged with it (``STAGES``): ``time_train_s``
(building the models and training, the pruner's questions included), ``time_evaluate_s`` (the
validation and test evaluations), ``time_bounds_s`` and ``time_report_s`` (``bounds_and_report``),
``time_tracking_s`` (recording: MLflow runs, metrics, artifacts, weights, and the trial's Optuna
user attributes) and ``time_trial_s`` (the wall time around the whole trial). The last MLflow call,
which logs these numbers, and the run's closing are not in them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from pipeline import tracking
from pipeline.config import ModelConfig, StudyConfig
from pipeline.data import Split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.report.study_page import STAGES  # time_<stage>_s: the page reads what is logged here
from pipeline.report.trial import Replicates, TrialArtifacts, bounds_and_report
from pipeline.stacked import train_sets
from pipeline.study.progress import epoch_bar
from pipeline.train import DTYPES, EpochRecord, Hyper, TrainResult, replicate_seeds, train, trial_setup


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
    started: float = field(default_factory=time.perf_counter)  # when the trial began (perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage so far (STAGES)


@contextlib.contextmanager
def timed(plan: TrialPlan, stage: str):
    """Add the wall time of the block to ``plan.timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        plan.timings[stage] = plan.timings.get(stage, 0.0) + time.perf_counter() - start


# the few keys beside the searched params that a comparison across trial runs needs
COMPARED = (
    "training.epochs",
    "training.batch_size",
    "training.seed",
    "training.population",
    "training.seeds",
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
    started = time.perf_counter()
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
    recording = time.perf_counter()
    run_id = tracking.trial_run(ctx.mlflow, ctx.experiment_id, ctx.parent_run_id, name, tags)
    trial.set_user_attr("mlflow_run_id", run_id)
    resolved = tracking.flatten({**cfg.to_dict(), "model": dataclasses.asdict(model_cfg)})
    compared = {key: resolved[key] for key in COMPARED if key in resolved}  # the study's constants
    tracking.log(  # are on the parent run: a trial run holds what tells it apart, and what compares it
        ctx.mlflow, run_id, params={**compared, **params}, metrics={"trial_number": trial.number}
    )
    tracking.log_dataset(ctx.mlflow, run_id, *dataset_input(cfg, ctx.split))
    return TrialPlan(run_id, params, hyper, model_cfg, started, {"tracking": time.perf_counter() - recording})


def build_models(ctx: TrialContext, plan: TrialPlan) -> list[torch.nn.Module]:
    """The trial's MLPs, one per seed replicate; each one's initial weights depend only on its seed.

    Built on the CPU from the seeded CPU generator, then moved to the split's device: CPU and CUDA
    runs start from the same weights."""
    return [
        build_mlp(
            ctx.split.input_dim,
            plan.model.hidden,
            plan.model.activation,
            seed,
            dtype=DTYPES[ctx.cfg.training.dtype],
        ).to(ctx.split.device)
        for seed in replicate_seeds(ctx.cfg.training)
    ]


def mean_record(records: Sequence[EpochRecord]) -> EpochRecord:
    """One epoch's numbers averaged over the replicates (the curve the pruner judges)."""
    if len(records) == 1:
        return records[0]
    fields = ("train_loss", "train_acc", "val_loss", "val_acc")
    means = {f: math.fsum(getattr(r, f) for r in records) / len(records) for f in fields}
    return EpochRecord(records[0].epoch, **means)


def epoch_callback(trial: optuna.Trial, ctx: TrialContext, buffer: tracking.MetricBuffer, bar=None):
    """Per epoch of all the trial's replicates: buffer the metrics for MLflow (the mean curve, and
    replicate 0's as ``*_seed0`` when K > 1), report the mean objective to Optuna, ask the pruner."""

    def on_epoch(records: list[EpochRecord]) -> bool:
        record = mean_record(records)
        metrics = record.metrics()
        if len(records) > 1:
            metrics |= {f"{key}_seed0": value for key, value in records[0].metrics().items()}
        buffer.add(metrics, step=record.epoch)
        if bar is not None:
            bar.update(1)
        trial.report(record.val_acc if ctx.cfg.objective == "val_acc" else record.val_loss, record.epoch)
        return trial.should_prune()

    return on_epoch


def train_replicates(ctx: TrialContext, plan: TrialPlan, models, on_epoch) -> list[TrainResult]:
    """Train the trial's replicates; ``on_epoch`` sees each epoch of all of them.

    One replicate trains with ``train``. K replicates train as one lockstep set of the stacked
    computation (``pipeline.stacked.train_sets``); with the hand-written backward they train one
    after another and the pruner is asked epoch by epoch afterwards, on the mean curve.
    """
    config, split = ctx.cfg.training, ctx.split
    if len(models) == 1:
        return [train(models[0], split, plan.hyper, config, lambda record: on_epoch([record]))]
    seeds = replicate_seeds(config)
    if config.backward == "autograd":
        k = len(models)
        return train_sets(models, split, [plan.hyper] * k, config, [list(range(k))], [on_epoch], seeds=seeds)
    results = [
        train(model, split, plan.hyper, dataclasses.replace(config, seed=seed))
        for model, seed in zip(models, seeds, strict=True)
    ]
    for epoch in range(min(len(r.history) for r in results)):
        records = [r.history[epoch] for r in results]
        if not all(math.isfinite(r.val_loss) for r in records):
            break
        if on_epoch(records):
            return [
                dataclasses.replace(r, history=r.history[: epoch + 1], stopped_at=epoch + 1) for r in results
            ]
    return results


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float:
    """The Optuna objective: every stage of one trial inside its MLflow run."""
    plan = begin_trial(trial, ctx)
    status = "FAILED"
    try:
        buffer = tracking.MetricBuffer(ctx.mlflow, plan.run_id)
        bar = epoch_bar(ctx.cfg.training.epochs, f"trial {trial.number}", ctx.show_epochs)
        try:
            with timed(plan, "train"):
                models = build_models(ctx, plan)
                results = train_replicates(ctx, plan, models, epoch_callback(trial, ctx, buffer, bar))
        finally:
            with timed(plan, "tracking"):
                buffer.flush()
            bar.close()
        value = finish_trial(trial, ctx, plan, models, results)
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
    trial: optuna.Trial,
    ctx: TrialContext,
    plan: TrialPlan,
    models: Sequence[torch.nn.Module],
    results: Sequence[TrainResult],
) -> float:
    """Validate, test, bound and report the trained replicates; raise TrialPruned if one diverged
    or they were pruned. The objective is the mean over replicates of each one's objective.

    Does not end the MLflow run: the caller does, with the status it decides.
    """
    cfg, split, run_id = ctx.cfg, ctx.split, plan.run_id
    for i, result in enumerate(results):
        if result.diverged_at is not None:
            _prune(trial, ctx, run_id, result, i if len(results) > 1 else None)
    if results[0].stopped_at is not None:
        _prune(trial, ctx, run_id, results[0])
    with timed(plan, "evaluate"):
        vals = [
            evaluate(model, split.x_val, split.y_val, split.classes, cfg.training.loss) for model in models
        ]
        tests = [
            evaluate(model, split.x_test, split.y_test, split.classes, cfg.training.loss) for model in models
        ]
    # the test-set ledger, written the moment the networks saw the test set: a trial that fails
    # after this point (report, tracking, a signal) still counts
    trial.set_user_attr("test_looks", len(tests))
    objectives = [v.accuracy if cfg.objective == "val_acc" else v.loss for v in vals]
    replicates, mean_history = None, None
    if len(models) > 1:
        counts = torch.bincount(split.y_val, minlength=len(split.classes))
        replicates = Replicates(
            seeds=tuple(replicate_seeds(cfg.training)),
            val_acc=tuple(v.accuracy for v in vals),
            val_loss=tuple(v.loss for v in vals),
            test_k=tuple(int(np.asarray(t.errors).sum()) for t in tests),
            m=len(split.y_test),
            majority=float(counts.max()) / len(split.y_val),
        )
        mean_history = tuple(mean_record(epoch) for epoch in zip(*(r.history for r in results), strict=True))
    val, test, result = vals[0], tests[0], results[0]
    folder = ctx.reports / f"trial-{trial.number:04d}"
    artifacts: TrialArtifacts = bounds_and_report(
        folder=folder,
        cfg=cfg,
        split=split,
        model=models[0],
        trial_number=trial.number,
        params=plan.params,
        result=result,
        val=val,
        test=test,
        provenance={**ctx.provenance, "run_id": run_id},
        replicates=replicates,
        mean_history=mean_history,
        timings={stage: plan.timings[stage] for stage in ("train", "evaluate") if stage in plan.timings},
    )
    plan.timings.update(artifacts.seconds)  # its own clocks split the call: bounds, then the report folder
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
    if replicates is not None:  # the configuration's numbers: means over the seeds
        final |= replicates.metrics(cfg.bounds.confidence)
        final["best_val_acc"] = max(r.val_acc for r in mean_history)
        sequential = cfg.training.backward != "autograd"  # one after another, else lockstep (one wall time)
        final["train_seconds"] = (math.fsum if sequential else max)(r.seconds for r in results)
    # val_acc / val_loss are already logged per epoch (the seed mean); the last epoch's is the final one
    logged = {k: v for k, v in final.items() if k not in ("val_acc", "val_loss")}
    recording = time.perf_counter()
    try:
        tracking.log(
            ctx.mlflow, run_id, metrics=logged, tags={"trial_state": "COMPLETE"}, step=len(result.history)
        )
        for path in artifacts.files:
            ctx.mlflow.log_artifact(run_id, str(path))
        _log_weights(ctx, run_id, models[0])
    except BaseException:  # the trial fails: its report folder must not look like a complete trial's
        shutil.rmtree(folder, ignore_errors=True)
        raise
    attrs = ("val_acc", "val_loss", "test_error", "test_acc", "epochs_run", "train_seconds")
    attrs += ("val_acc_std", "test_error_std", "stalled") if replicates is not None else ()
    for key in attrs:
        trial.set_user_attr(key, final[key])
    trial.set_user_attr("replicates", len(models))
    trial.set_user_attr("objective_seeds", objectives)
    trial.set_user_attr("test_error_seeds", [t.error for t in tests])
    for key, value in artifacts.metrics.items():
        if key.startswith("test_error_clopper_pearson"):
            trial.set_user_attr(key, value)
    trial.set_user_attr("report", str(folder / "report.html"))
    plan.timings["tracking"] = plan.timings.get("tracking", 0.0) + time.perf_counter() - recording
    _log_timings(trial, ctx, plan, results, step=len(result.history))
    value = math.fsum(objectives) / len(objectives)
    if not math.isfinite(value):  # never hand Optuna a non-finite value: it would record inf
        _prune(trial, ctx, run_id, dataclasses.replace(result, diverged_at=len(result.history)))
    return value


def _prune(trial, ctx: TrialContext, run_id: str, result: TrainResult, replicate: int | None = None) -> None:
    """Diverged or pruned: keep the partial curves, record the reason, tell Optuna PRUNED."""
    reason = (
        result.outcome
        if result.diverged_at is not None
        else (f"pruned by {ctx.cfg.pruner.kind} pruner after epoch {result.stopped_at}")
    )
    if replicate is not None:
        reason += f" (seed replicate {replicate})"
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("epochs_run", len(result.history))
    tracking.log(
        ctx.mlflow,
        run_id,
        tags={"trial_state": "PRUNED", "reason": reason},
        metrics={"epochs_run": len(result.history)},
    )
    raise optuna.TrialPruned(reason)


def stage_times(plan: TrialPlan, results: Sequence[TrainResult]) -> dict[str, float]:
    """``time_<stage>_s`` for every stage and ``time_trial_s``, in seconds, now that the trial is done.

    A trial of ``run_trial`` has one wall clock around it. A population's trials (``begin_trial``
    for all, one batched training, then ``finish_trial`` one by one) overlap: each one's training
    time is its set's wall time in the batched run, and its trial time the sum of its own stages.
    """
    timings = {stage: plan.timings.get(stage, 0.0) for stage in STAGES}
    if "train" in plan.timings:
        total = time.perf_counter() - plan.started
    else:
        timings["train"] = max(r.seconds for r in results)
        total = math.fsum(timings.values())
    return {f"time_{stage}_s": seconds for stage, seconds in timings.items()} | {"time_trial_s": total}


def _log_timings(trial, ctx: TrialContext, plan: TrialPlan, results, step: int) -> None:
    """The stage times onto the trial's MLflow run (metrics) and its Optuna trial (user attrs, which
    the study page reads)."""
    times = stage_times(plan, results)
    tracking.log(ctx.mlflow, plan.run_id, metrics=times, step=step)
    for key, seconds in times.items():
        trial.set_user_attr(key, seconds)


def _log_weights(ctx: TrialContext, run_id: str, model: torch.nn.Module) -> None:
    """The trained state dict as an artifact, as CPU tensors whatever device trained it; load it
    back with ``torch.load(weights_only=True)``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        ctx.mlflow.log_artifact(run_id, str(path))
