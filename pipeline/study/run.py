"""The study run: create or resume the Optuna study, then run its trials to the target.

``run_study`` checks every output first (``storage.preflight``, the device, the data, the search
space and direction of a resumed study), runs the gradient-check gate (on the CPU: it is a float64
check of the hand-written backward, not of the device), opens the study's MLflow parent run,
hands the trials to the workers' loop (or the population driver), and writes the study page.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import device as devices
from pipeline import tracking
from pipeline.config import StudyConfig
from pipeline.data import load_split
from pipeline.journal import check_free_space
from pipeline.report.study_page import write_after_study
from pipeline.seeds import derive_seed
from pipeline.storage import (
    StudyError,
    open_storage,
    preflight,
    ranked_trials,
    redact,
    storage_spec,
    trial_counts,
)
from pipeline.study import workers
from pipeline.study.gate import GradcheckFailed, run_gradcheck
from pipeline.study.population import optimize_population
from pipeline.study.progress import Watch
from pipeline.study.trial import TrialContext, dataset_input, run_trial

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
    objective: str = "val_acc"
    page: Path | None = None  # the study page, reports/<study>/index.html, when it was written
    target: int = 0  # the study's trial target
    ran: int = 0  # trials this call finished (0: the study was already complete)
    best_seeds: tuple[float, ...] = ()  # the selected trial's objective per seed replicate

    @property
    def selected_line(self) -> str | None:
        """The selected trial and its objective (with the spread over seeds when K > 1)."""
        if self.best_number is None or self.best_value is None:
            return None
        line = f"selected trial {self.best_number}: {self.objective} = {self.best_value:.4f}"
        if len(self.best_seeds) > 1:
            sd = statistics.stdev(self.best_seeds)
            line += f" (mean of {len(self.best_seeds)} seeds, sd {sd:.4f})"
        return line

    @property
    def complete_message(self) -> str | None:
        """What to say when there was nothing left to run."""
        done = self.n_complete + self.n_pruned
        if self.ran or done < self.target:
            return None
        return f"study {self.name} is complete: {done}/{self.target} trials; raise --trials to continue"


def make_sampler(cfg: StudyConfig, n_existing: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The TOML's sampler, its seed derived from (seed, trials already in the study, worker).

    A re-created seeded sampler restarts its RNG, so a resumed run would otherwise repeat the
    first run's suggestions, and workers started together would repeat each other's.
    """
    seed = derive_seed(cfg.sampler.seed, "sampler", n_existing, worker, bits=32)
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
            study.set_user_attr("budget", cfg.budget_signature())
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
            f"{cfg.search_space_signature()}\nRun it under a new name (--name), or remove the old study with "
            f"`pipeline delete {cfg.path} --yes`."
        )
    budget = study.user_attrs.get("budget")
    if budget is None:  # a study created before budgets were recorded: its budget is this one from now on
        study.set_user_attr("budget", cfg.budget_signature())
    elif budget != cfg.budget_signature():
        raise StudyError(
            f"{cfg.path}: study {cfg.name!r} in {redact(spec)} was created with another training budget "
            f"(training.epochs, training.seeds, or --epochs); its trials could not be ranked together.\n"
            f"  stored:  {budget}\n  now:     {cfg.budget_signature()}\n"
            f"Resume with the stored budget, or run it under a new name (--name)."
        )
    return study


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
    if progress is None:
        progress = sys.stderr.isatty() and worker is None
    spec = storage_spec(cfg, storage)
    reports = preflight(cfg.name, spec, tracking.tracking_uri(tracking_uri), reports_root)
    tracking.check_reachable(tracking.tracking_uri(tracking_uri))  # before the Optuna storage exists
    device = devices.resolve(cfg.training.device, cfg.path)  # none such: exit 2, nothing written
    devices.set_precision(cfg.training.precision)
    split = load_split(cfg.dataset).to(device)  # data errors stop the study before anything is written
    study = open_study(cfg, spec, worker or 0)
    if cfg.gradcheck.enabled:
        _, table, failures, _ = run_gradcheck(cfg, tracking_uri=tracking_uri, reports_root=reports_root)
        if failures:
            reasons = "\n".join(failures)
            raise GradcheckFailed(f"{cfg.path}: gradient check failed, no trial run:\n{table}{reasons}")
    reports.mkdir(parents=True, exist_ok=True)
    mlflow = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(mlflow, cfg.name, cfg.description)
    prov = tracking.provenance(device)
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
    tracking.log_dataset(mlflow, parent, *dataset_input(cfg, split))
    ctx = TrialContext(cfg, split, mlflow, exp_id, parent, reports, prov, show_epochs=progress)
    done = trial_counts(study).finished
    watch = Watch(
        study, cfg.objective, cfg.trials, done, terminal=progress and not create_only, worker=worker
    )

    # one study page per study, not per worker: written by the worker whose trial completed the study
    last = {"page": worker is None}

    def on_trial(trial: optuna.trial.FrozenTrial) -> None:
        finished = trial_counts(study).finished
        watch.trial_done(trial, finished)
        if worker is not None:
            last["page"] = finished >= cfg.trials

    # every folder a trial writes to: the journal's, the MLflow store's, the reports
    outputs = [reports] + ([Path(spec).parent] if "://" not in spec else [])
    uri = tracking.tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        outputs.append(Path(uri.removeprefix("sqlite:///")).parent)

    def space() -> None:
        check_free_space(outputs, f"study {cfg.name}")

    status = "FAILED"
    try:
        if not create_only and cfg.training.population > 1:  # K trials at once, one batched computation
            optimize_population(
                study,
                ctx,
                cfg.trials,
                spec=spec,
                sweep=lambda: workers.sweep(study, spec, mlflow, exp_id),
                on_trial=on_trial,
                before_trial=space,
            )
        elif not create_only:  # exactly cfg.trials in total, across workers, restarts and dead workers
            workers.optimize(
                study,
                cfg.trials,
                lambda trial: run_trial(trial, ctx),
                spec=spec,
                sweep=lambda: workers.sweep(study, spec, mlflow, exp_id),
                on_trial=on_trial,
                before_trial=space,
            )
        status = "FINISHED"
    finally:
        watch.close()
        try:
            _finish_parent(mlflow, parent, study, status)
        except Exception as exc:  # the store failed too: the error already on its way is the one to show
            if status == "FINISHED":
                raise
            reason = tracking.store_error(exc) or f"{type(exc).__name__}: {exc}"
            print(f"warning: the study's MLflow parent run was not closed ({reason[:200]})", file=sys.stderr)
    page = None
    if not create_only and last["page"]:  # the study page; if it fails it warns, the trials stay
        page = write_after_study(cfg, study, mlflow, parent, reports, spec)
    c = trial_counts(study)
    best = _best(study)
    return StudyOutcome(
        cfg.name,
        c.complete,
        c.pruned,
        c.fail,
        best.number if best else None,
        best.value if best else None,
        reports,
        parent,
        cfg.objective,
        page,
        cfg.trials,
        watch.ran,
        tuple(best.user_attrs.get("objective_seeds", ())) if best else (),
    )


def _study_params(cfg: StudyConfig) -> dict[str, Any]:
    params = tracking.flatten({k: v for k, v in cfg.to_dict().items() if k != "search"})
    for key, spec in cfg.to_dict()["search"].items():
        params[f"search.{key}"] = ", ".join(f"{k}={v}" for k, v in spec.items())
    return params


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The selected trial by the one selection rule (``storage.ranked_trials``), never ``best_trial``."""
    ranked = ranked_trials(study)
    return ranked[0] if ranked else None


def _finish_parent(mlflow, parent: str, study: optuna.Study, status: str) -> None:
    """The study-level metrics onto the parent run, then close it; closed even when the Optuna
    storage cannot be read any more (a database that went away)."""
    try:
        c = trial_counts(study)
        metrics: dict[str, float] = {"n_complete": c.complete, "n_pruned": c.pruned, "n_failed": c.fail}
        best = _best(study)
    except Exception as exc:
        if tracking.store_error(exc) is None:
            raise
        mlflow.set_terminated(parent, "FAILED")
        return
    if best is not None:
        metrics["best_val_acc"] = best.user_attrs.get("val_acc", best.value)
        metrics["best_value"] = best.value  # the objective: the mean over the trial's seed replicates
        metrics["best_trial_number"] = best.number
        for key in ("val_acc_std", "test_error", "test_error_std", "replicates"):
            if isinstance(best.user_attrs.get(key), (int, float)):
                metrics[f"best_{key}"] = best.user_attrs[key]
        for key, value in best.user_attrs.items():
            if key.startswith("test_error") and isinstance(value, float):
                metrics[f"selected_{key}"] = value
    tracking.log(mlflow, parent, metrics=metrics)
    mlflow.set_terminated(parent, status)
