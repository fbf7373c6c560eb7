"""Population driver: ask K trials, train them as one stacked computation, tell each its outcome.

Each trial still gets its own MLflow run and report (``pipeline.study.trial``'s ``begin_trial``,
``epoch_callback`` and ``finish_trial``); the training is ``pipeline.stacked.train_sets``, each
trial's seed replicates one lockstep set. It shares the workers' allocation lock, worker id and
sweep, so populations and single-trial workers can share one study.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from pipeline import tracking
from pipeline.signals import Terminated, signal_in, stop_reason
from pipeline.stacked import train_sets
from pipeline.storage import AllocationLock, Retry, StudyError, trial_counts, write_error
from pipeline.study import workers
from pipeline.study.trial import begin_trial, build_models, epoch_callback, finish_trial
from pipeline.train import replicate_seeds


@contextlib.contextmanager
def _optimize_loop(study) -> Iterator[None]:
    """Run under the flag ``Study.optimize`` sets, so ``study.stop()`` works as it does there.

    Optuna's GridSampler calls ``study.stop()`` from ``tell`` once its grid is used up, and
    ``stop`` raises outside ``optimize``; inside, it sets the flag this driver then honours.
    """
    local = study._thread_local
    before = local.in_optimize_loop
    local.in_optimize_loop, study._stop_flag = True, False
    try:
        yield
    finally:
        local.in_optimize_loop = before


@contextlib.contextmanager
def _heartbeats(study, trials) -> Iterator[None]:
    """On a database storage with a heartbeat, beat for every trial of the round while it trains
    (what ``Study.optimize`` does for its one trial), so other workers never fail them as stale."""
    with contextlib.ExitStack() as stack:
        for trial in trials:
            stack.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        yield


def optimize_population(
    study,
    ctx,
    total: int,
    *,
    spec: str,
    sweep: Callable[[], Any] | None = None,
    on_trial: Callable[[Any], None] | None = None,
    before_trial: Callable[[], None] | None = None,
) -> None:
    """Run trials ``training.population`` at a time until the study holds ``total`` finished ones.

    Like ``pipeline.study.workers.optimize``, and sharing its allocation lock, worker id and sweep: each
    round asks as many trials as there are free slots (``total`` - complete - pruned - running),
    at most K, trains them as one population and tells each its own outcome. A process with no
    free slot returns rather than wait for other workers' trials. Interrupted trials (a signal,
    Ctrl-C, a disk error) end FAIL and are queued to run again.
    """
    lock = AllocationLock(spec, study.study_name)
    try:
        with _optimize_loop(study):
            while not study._stop_flag:
                if sweep is not None:
                    sweep()
                if before_trial is not None:
                    before_trial()
                lock.acquire()
                try:
                    counted = trial_counts(study)
                    size = min(ctx.cfg.training.population, total - counted.finished - counted.running)
                    if size <= 0:
                        return
                    trials = [study.ask() for _ in range(size)]
                finally:
                    lock.release()
                for trial in trials:
                    trial.set_user_attr("worker", workers.worker_id())
                _run_round(study, trials, ctx, on_trial)
    finally:
        lock.close()


def _run_round(study, trials, ctx, on_trial: Callable[[Any], None] | None) -> None:
    """Begin every trial's MLflow run, train them together, then finish, report and tell each."""

    plans: dict[int, Any] = {}  # trial number -> TrialPlan
    closed: set[int] = set()  # trials told, their MLflow run ended
    failure: BaseException | None = None
    try:
        for trial in trials:
            plans[trial.number] = begin_trial(trial, ctx)
        members = [plans[t.number] for t in trials]
        replicas = [build_models(ctx, plan) for plan in members]  # each trial's K seed replicates
        k = len(replicas[0])
        buffers = [tracking.MetricBuffer(ctx.mlflow, plan.run_id) for plan in members]
        callbacks = [epoch_callback(t, ctx, b) for t, b in zip(trials, buffers, strict=True)]
        try:
            with _heartbeats(study, trials):
                flat = train_sets(
                    [model for models in replicas for model in models],
                    ctx.split,
                    [plan.hyper for plan in members for _ in range(k)],
                    ctx.cfg.training,
                    [list(range(t * k, (t + 1) * k)) for t in range(len(trials))],
                    callbacks,
                    seeds=replicate_seeds(ctx.cfg.training) * len(trials),
                )
        finally:
            for buffer in buffers:
                buffer.flush()
        results = [flat[t * k : (t + 1) * k] for t in range(len(trials))]
        for trial, plan, models, result in zip(trials, members, replicas, results, strict=True):
            status = "FAILED"
            try:
                value = finish_trial(trial, ctx, plan, models, result)
                study.tell(trial, value)
                status = "FINISHED"
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                status = "FINISHED"
            except Exception as exc:  # this trial fails; the round's others still finish
                with contextlib.suppress(Exception):
                    trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:1000])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                failure = failure or exc
            finally:
                ctx.mlflow.set_terminated(plan.run_id, status)
                closed.add(trial.number)
            if on_trial is not None:
                on_trial(_frozen(study, trial.number))
    except (Terminated, KeyboardInterrupt, StudyError, OSError) as exc:
        # Interrupted: every trial not yet told is failed and queued to run again.
        open_trials = [t for t in trials if t.number not in closed]
        stop = signal_in(exc)
        for trial in open_trials if stop is not None else ():
            with contextlib.suppress(Exception):
                trial.set_user_attr("reason", stop_reason(stop))
        _fail(study, open_trials, plans, ctx)
        for trial in open_trials:
            Retry()(study, _frozen(study, trial.number))
        numbers = ", ".join(str(t.number) for t in open_trials)
        if isinstance(exc, OSError):
            raise StudyError(write_error(exc, f"trials {numbers}")) from exc
        with contextlib.suppress(AttributeError):
            exc.trial = numbers  # for the exit message
        raise
    except BaseException:
        _fail(study, [t for t in trials if t.number not in closed], plans, ctx)
        raise
    if isinstance(failure, OSError):
        raise StudyError(write_error(failure, "a trial's report")) from failure
    if failure is not None:
        raise failure


def _frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _fail(study, trials, plans, ctx) -> None:
    """Tell FAIL and end the MLflow run of each trial: no trial left RUNNING, no run left open."""
    for trial in trials:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if trial.number in plans:
            ctx.mlflow.set_terminated(plans[trial.number].run_id, "FAILED")
