"""Study edge: drives Optuna over the TOML's search space; each trial runs every stage.

Trial flow: suggest → train (hand-written SGD) → validate (the objective) → test → bounds →
report, all inside one nested MLflow run. The test set is evaluated and logged for every trial
but never used to choose anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from pipeline import tracking
from pipeline.config import ModelConfig, StudyConfig
from pipeline.data import Split, load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.stages import TrialArtifacts, bounds_and_report
from pipeline.storage import StudyError, open_storage, preflight, redact, storage_spec
from pipeline.train import DTYPES, EpochRecord, Hyper, TrainResult, train

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class StudyOutcome:
    name: str
    n_complete: int
    n_pruned: int
    n_failed: int
    best_number: int | None
    best_value: float | None
    reports: Path
    parent_run_id: str
    page: Path | None = None  # the study page, reports/<study>/index.html, when it was written


def make_sampler(cfg: StudyConfig, n_existing: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The TOML's sampler, its seed derived from (seed, trials already in the study, worker).

    A re-created seeded sampler restarts its RNG, so a resumed run would otherwise repeat the
    first run's suggestions, and workers started together would repeat each other's.
    """
    seed = cfg.sampler.seed * 100_003 + n_existing
    if worker:
        import numpy as np

        seed = int(np.random.SeedSequence([cfg.sampler.seed, n_existing, worker]).generate_state(1)[0])
    if cfg.sampler.kind == "grid":
        space = {k: list(s.choices if s.kind == "choices" else (s.value,)) for k, s in cfg.search.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if cfg.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, cfg.trials // 3)))


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=cfg.pruner.warmup_epochs)
    if cfg.pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.training.epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig, spec: str, worker: int = 0) -> optuna.Study:
    """Create the study or resume it, refusing a changed direction or search space."""
    storage = open_storage(spec)
    try:
        study = optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        study = None
    n_existing = len(study.trials) if study is not None else 0
    sampler, pruner = make_sampler(cfg, n_existing, worker), make_pruner(cfg)
    if study is None:
        try:
            study = optuna.create_study(
                study_name=cfg.name,
                storage=storage,
                direction=cfg.direction,
                sampler=sampler,
                pruner=pruner,
            )
            study.set_user_attr("search_space", cfg.search_space_signature())
        except optuna.exceptions.DuplicatedStudyError:  # another worker won the race
            study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)
    else:
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)
    stored_direction = study.direction.name.lower()
    if stored_direction != cfg.direction:
        raise StudyError(
            f"{cfg.path}: study {cfg.name!r} in {redact(spec)} was created to {stored_direction} "
            f"but objective = {cfg.objective!r} asks to {cfg.direction}; use a new --name"
        )
    stored = study.user_attrs.get("search_space")
    if stored is not None and stored != cfg.search_space_signature():
        raise StudyError(
            f"{cfg.path}: the search space or objective of study {cfg.name!r} changed since it was "
            f"created in {redact(spec)}.\n  stored:  {stored}\n  now:     "
            f"{cfg.search_space_signature()}\nRun it under a new name (--name) or delete the storage."
        )
    return study


# ----------------------------------------------------------------------------------------------
# One trial


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


def begin_trial(trial: optuna.Trial, ctx: TrialContext) -> TrialPlan:
    """Suggest the trial's params and open its nested MLflow run with params and provenance."""
    cfg = ctx.cfg
    params = suggest(trial, cfg)
    hyper = Hyper(params["lr"], params["momentum"], params["weight_decay"])
    model_cfg = dataclasses.replace(
        cfg.model,
        hidden=(params["hidden"],) if "hidden" in params else cfg.model.hidden,
        activation=params.get("activation", cfg.model.activation),
    )
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
    resolved = {**cfg.to_dict(), "model": dataclasses.asdict(model_cfg)}
    resolved.pop("search")
    tracking.log(
        ctx.mlflow,
        run_id,
        params={**tracking.flatten(resolved), **params},
        metrics={"trial_number": trial.number},
    )
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
        bar = _progress(ctx.cfg.training.epochs, f"trial {trial.number}", ctx.show_epochs, leave=False)
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
    tracking.log(
        ctx.mlflow, run_id, metrics=logged, tags={"trial_state": "COMPLETE"}, step=len(result.history)
    )
    for path in artifacts.files:
        ctx.mlflow.log_artifact(run_id, str(path))
    _log_weights(ctx, run_id, model)
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
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StudyError(f"{path}: refused, not a plain state dict of tensors ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudyError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    if model is not None:
        model.load_state_dict(state)
    return state


def _progress(total: int, desc: str, enabled: bool, leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, disable=not enabled, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The study


def counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {
        s.name.lower(): states.count(s)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }


def run_study(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    reports_root: Path = Path("reports"),
    progress: bool | None = None,
    worker: int | None = None,
    create_only: bool = False,
) -> StudyOutcome:
    """Run (or resume) the study until it holds ``cfg.trials`` complete-or-pruned trials.

    ``worker``: this process is one of several sharing the study (the index varies the sampler
    seed; one log line per trial instead of progress bars). ``create_only``: create the study,
    its MLflow experiment and parent run, then return (run once before starting workers).
    """
    from pipeline import worker as workers

    if progress is None:
        progress = sys.stderr.isatty() and worker is None
    spec = storage_spec(cfg, storage)
    reports = preflight(cfg.name, spec, tracking.tracking_uri(tracking_uri), reports_root)
    split = load_split(cfg.dataset)  # data errors stop the study before anything is written
    study = open_study(cfg, spec, worker or 0)
    if cfg.gradcheck.enabled:
        _, table, failures, _ = run_gradcheck(cfg, tracking_uri=tracking_uri, reports_root=reports_root)
        if failures:
            reasons = "\n".join(failures)
            raise GradcheckFailed(f"{cfg.path}: gradient check failed, no trial run:\n{table}{reasons}")
    reports.mkdir(parents=True, exist_ok=True)
    mlflow = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(mlflow, cfg.name)
    prov = tracking.provenance()
    parent = tracking.study_run(
        mlflow,
        exp_id,
        cfg.name,
        {
            "config_hash": cfg.config_hash(),
            "split_hash": split.split_hash,
            "optuna_storage": redact(spec),
            "study_file": cfg.path,
            "trials_target": cfg.trials,
            "epochs": cfg.training.epochs,
            **prov,
        },
        params=_study_params(cfg),
    )
    ctx = TrialContext(
        cfg, split, mlflow, exp_id, parent, reports, prov, show_epochs=progress and cfg.training.epochs >= 20
    )
    done = sum(counts(study)[k] for k in ("complete", "pruned"))
    remaining = max(0, cfg.trials - done)
    bar = _progress(remaining, cfg.name, progress)

    # one study page per study, not per worker: written by the worker whose trial completed the study
    last = {"page": worker is None}

    def on_trial(trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        if worker is not None:
            workers.print_err(workers.trial_line(trial, worker))
            last["page"] = sum(counts(study)[k] for k in ("complete", "pruned")) >= cfg.trials

    status = "FAILED"
    try:
        if not create_only and cfg.training.population > 1:  # K trials at once, one batched computation
            from pipeline.population import optimize_population

            optimize_population(
                study,
                ctx,
                cfg.trials,
                spec=spec,
                sweep=lambda: workers.sweep(study, spec, mlflow, exp_id),
                on_trial=on_trial,
            )
        elif not create_only:  # exactly cfg.trials in total, across workers, restarts and dead workers
            workers.optimize(
                study,
                cfg.trials,
                lambda trial: run_trial(trial, ctx),
                spec=spec,
                sweep=lambda: workers.sweep(study, spec, mlflow, exp_id),
                on_trial=on_trial,
            )
        status = "FINISHED"
    finally:
        bar.close()
        _finish_parent(mlflow, parent, study, status)
    page = None
    if not create_only and last["page"]:  # the study page; if it fails it warns, the trials stay
        from pipeline.study_report import write_after_study

        page = write_after_study(cfg, study, mlflow, parent, reports, spec)
    c = counts(study)
    best = _best(study)
    return StudyOutcome(
        cfg.name,
        c["complete"],
        c["pruned"],
        c["fail"],
        best.number if best else None,
        best.value if best else None,
        reports,
        parent,
        page,
    )


def _study_params(cfg: StudyConfig) -> dict[str, Any]:
    params = tracking.flatten({k: v for k, v in cfg.to_dict().items() if k != "search"})
    for key, spec in cfg.to_dict()["search"].items():
        params[f"search.{key}"] = ", ".join(f"{k}={v}" for k, v in spec.items())
    return params


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def _finish_parent(mlflow, parent: str, study: optuna.Study, status: str) -> None:
    c = counts(study)
    metrics: dict[str, float] = {"n_complete": c["complete"], "n_pruned": c["pruned"], "n_failed": c["fail"]}
    best = _best(study)
    if best is not None:
        metrics["best_val_acc"] = best.user_attrs.get("val_acc", best.value)
        metrics["best_trial_number"] = best.number
        for key, value in best.user_attrs.items():
            if key.startswith("test_error") and isinstance(value, float):
                metrics[f"selected_{key}"] = value
    tracking.log(mlflow, parent, metrics=metrics)
    mlflow.set_terminated(parent, status)


# ----------------------------------------------------------------------------------------------
# Gradient check, as its own MLflow run in the study's experiment


class GradcheckFailed(StudyError):
    """The hand-written backward pass disagrees with autograd or the finite differences."""


def run_gradcheck(cfg: StudyConfig, *, tracking_uri: str | None = None, reports_root: Path = Path("reports")):
    """The lab's directional gradient check of the study's model at its initial weights.

    Pass/fail: the float64 disagreement between the manual and autograd directional derivatives
    must be within ``gradcheck.tolerance``; for a smooth (tanh) net the float64 finite-difference
    error must be too. (With ReLU a perturbation can cross the kink at 0, which makes the finite
    difference itself off by more than round-off, however right the gradient is.)
    """
    from pipeline.gradcheck import format_table, gradient_check, save_gradcheck

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
        tags={"pipeline_role": "gradcheck", "optuna_study": cfg.name, **tracking.provenance()},
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
