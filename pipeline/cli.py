"""Command line: ``pipeline <command>`` (also ``python -m pipeline``); the top floor.

Each command imports what it runs when it runs (the lazy imports below, each marked): ``--help``,
``check`` and ``schedule`` start without torch, optuna or mlflow.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.config import ConfigError, load_study
from pipeline.errors import UsageError
from pipeline.ops import schedule
from pipeline.signals import exit_code, sigint_note, signal_in, stop_name, stop_on_signals
from pipeline.threads import apply_threads, omp_environment
from pipeline.urls import redact

EXIT_USAGE = 2  # bad study file, bad data, refused resume


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_file", type=Path, metavar="STUDY.toml", help="study file, e.g. studies/demo.toml")
    p.add_argument("--trials", type=int, help="total number of trials (overrides the file)")
    p.add_argument("--epochs", type=int, help="epochs per trial (overrides the file)")
    p.add_argument("--name", help="study name (overrides the file; a new name starts a new study)")
    p.add_argument(
        "--storage",
        help="Optuna storage: a database URL or a journal file path "
        "(default $OPTUNA_STORAGE, else storage/<name>.journal)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)",
    )


def _where_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_file", type=Path, metavar="STUDY.toml", help="study file, e.g. studies/demo.toml")
    p.add_argument("--name", help="study name (overrides the file)")
    p.add_argument("--storage", help="Optuna storage (default $OPTUNA_STORAGE, else storage/<name>.journal)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else mlruns/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="MLflow-tracked Optuna hyperparameter studies."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("study", help="run or resume a study until it holds its number of trials")
    _study_args(p)
    p = sub.add_parser("gradcheck", help="check the hand-written backprop against finite differences")
    _study_args(p)
    p = sub.add_parser(
        "worker",
        help="one of several processes sharing a study (make workers N=4; or OPTUNA_STORAGE=postgresql+"
        "psycopg://… on many machines); stops when the study holds its number of trials",
    )
    _study_args(p)
    p.add_argument(
        "--create-only",
        action="store_true",
        help="create the study (Optuna storage, MLflow experiment, parent run) and exit; "
        "run it once before starting workers",
    )
    p.add_argument("--index", type=int, help="this worker's number, varies the sampler seed (default: pid)")
    p = sub.add_parser("best", help="the selected trial: params, objective, test error, report and weights")
    _where_args(p)
    p = sub.add_parser(
        "export",
        help="write the selected trial to --out DIR: config.toml (retrains it), model.pt, metrics.json, "
        "MODEL.md; and register it in the MLflow model registry as <study>-best, alias best",
    )
    _where_args(p)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder to write (new, empty, or an earlier export of the same study, which is replaced)",
    )
    registry = p.add_mutually_exclusive_group()
    registry.add_argument(
        "--register",
        metavar="NAME",
        help="the registered model name (default: <study>-best); each export logs the model to the "
        "trial's MLflow run, registers a new version and moves the alias best to it",
    )
    registry.add_argument(
        "--no-register",
        action="store_true",
        help="leave MLflow unchanged: no logged model, no registry version (MLflow is only read)",
    )
    p = sub.add_parser(
        "studies",
        help="list every study in storage/ (and in --storage): trials done/target, best, last update",
    )
    p.add_argument("--name", help="only this study")
    p.add_argument(
        "--storage",
        help="also list this storage's studies: a journal file or database URL (default $OPTUNA_STORAGE)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI, where each study's trial target is read "
        "(default $MLFLOW_TRACKING_URI, else mlruns/)",
    )
    p = sub.add_parser("delete", help="remove a study's storage, MLflow experiment and reports (needs --yes)")
    _where_args(p)
    p.add_argument("--yes", action="store_true", help="really remove them (without: say what would go)")
    p = sub.add_parser("storage", help="print the Optuna storage a study uses (its password hidden)")
    p.add_argument("study_file", type=Path, metavar="STUDY.toml")
    p.add_argument("--name", help="study name (overrides the file)")
    p.add_argument("--storage", help="Optuna storage (default $OPTUNA_STORAGE, else storage/<name>.journal)")
    p = sub.add_parser(
        "dashboard",
        help="serve optuna-dashboard over a study's Optuna storage (its URL never on a command line)",
    )
    p.add_argument("study_file", type=Path, metavar="STUDY.toml")
    p.add_argument("--name", help="study name (overrides the file)")
    p.add_argument("--storage", help="Optuna storage (default $OPTUNA_STORAGE, else storage/<name>.journal)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p = sub.add_parser("check", help="validate a study file and print the resolved configuration")
    p.add_argument("study_file", type=Path, metavar="STUDY.toml")
    p = sub.add_parser(
        "bench", help="time the seed-style loop vs ours against this machine's matmul rate (reports/bench/)"
    )
    p.add_argument("--quick", action="store_true", help="one short repeat of everything (a smoke run)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = cores)")
    p.add_argument("--repeats", type=int, help="timed repeats per loop (default 3; median reported)")
    p.add_argument("--epochs", type=int, help="epochs per timed repeat (default 2)")
    p.add_argument("--out", type=Path, default=Path("reports/bench"), help="output folder")
    p.add_argument(
        "--pruning",
        action="store_true",
        help="also: 40-trial Fashion-2 studies without and with the median pruner",
    )
    p = sub.add_parser(
        "rerun",
        help="for cron: continue the study, retrain its selection's replicates, test them against the "
        "baseline (exit 0 reproduced, consistent or new baseline; 1 failed; 2 bad input; 3 drift; "
        "4 another rerun holds the lock)",
    )
    _study_args(p)
    p.add_argument(
        "--rebaseline",
        action="store_true",
        help="freeze this rerun's replicates as the new baseline instead of testing against the old one",
    )
    p = sub.add_parser("schedule", help="install, list or remove a crontab entry that reruns a study")
    schedule.add_arguments(p)
    p = sub.add_parser("report", help="rebuild the study page reports/<study>/index.html, no training")
    p.add_argument("study_file", type=Path, metavar="STUDY.toml")
    p.add_argument("--name", help="study name (overrides the file)")
    p.add_argument("--storage", help="Optuna storage (default $OPTUNA_STORAGE, else storage/<name>.journal)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else mlruns/)")
    return parser


def _load(args: argparse.Namespace):
    cfg = load_study(args.study_file)
    return cfg.with_overrides(
        trials=getattr(args, "trials", None),
        epochs=getattr(args, "epochs", None),
        name=getattr(args, "name", None),
    )


def _threads(cfg) -> int:
    """The study's thread policy for this process (``pipeline.threads``): OpenMP's variables before
    torch is first imported, then torch's intra-op thread count."""
    os.environ.update(omp_environment(cfg.training.threads))
    return apply_threads(cfg.training.threads)


def cmd_study(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _threads(cfg)
    from pipeline.study.run import run_study  # lazy: start-up stays light; after the thread policy

    outcome = run_study(cfg, storage=args.storage, tracking_uri=args.tracking_uri)
    if outcome.complete_message is not None:
        print(outcome.complete_message)
        return 0
    print(
        f"study {outcome.name}: {outcome.n_complete} complete, {outcome.n_pruned} pruned, "
        f"{outcome.n_failed} failed"
    )
    if outcome.selected_line is not None:
        print(outcome.selected_line)
    print(f"reports: {outcome.reports}/")
    if outcome.page is not None:
        print(f"study page: {outcome.page}")
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _threads(cfg)
    from pipeline.study.gate import run_gradcheck  # lazy: start-up stays light; after the thread policy

    _, table, failures, folder = run_gradcheck(cfg, tracking_uri=args.tracking_uri)
    print(table)
    print(f"saved: {folder}/gradcheck.json, {folder}/gradcheck.png")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(json.dumps(cfg.to_dict(), indent=2, default=list))
    print(f"config hash {cfg.config_hash()}", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _threads(cfg)
    from pipeline.study.run import run_study  # lazy: start-up stays light; after the thread policy

    note = sigint_note()
    if note is not None and not args.create_only:
        print(f"worker (pid {os.getpid()}): {note}", file=sys.stderr, flush=True)
    index = args.index if args.index is not None else os.getpid()
    outcome = run_study(
        cfg,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        worker=index,
        create_only=args.create_only,
    )
    counted = f"{outcome.n_complete} complete, {outcome.n_pruned} pruned, {outcome.n_failed} failed"
    if args.create_only:
        print(f"study {outcome.name} ready for workers: {counted}")
    else:
        print(f"study {outcome.name} holds: {counted} (worker {index}, pid {os.getpid()})")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _threads(cfg)
    from pipeline.ops.rerun import rerun_main  # lazy: start-up stays light; after the thread policy

    return rerun_main(
        cfg,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        trials=args.trials,
        rebaseline=args.rebaseline,
    )


def cmd_schedule(args: argparse.Namespace) -> int:
    return schedule.schedule_main(args, _load(args) if args.study_file else None)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report.study_page import regenerate  # lazy: start-up stays light

    page = regenerate(_load(args), storage=args.storage, tracking_uri=args.tracking_uri)
    print(f"study page: {page}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from pipeline.ops.manage import best_main  # lazy: start-up stays light

    return best_main(_load(args), args.storage, args.tracking_uri)


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.ops.export import export_main  # lazy: start-up stays light

    return export_main(
        _load(args), args.storage, args.tracking_uri, args.out, args.register, not args.no_register
    )


def cmd_studies(args: argparse.Namespace) -> int:
    from pipeline.ops.manage import studies_main  # lazy: start-up stays light

    return studies_main(args.storage or os.environ.get("OPTUNA_STORAGE"), args.name, args.tracking_uri)


def cmd_storage(args: argparse.Namespace) -> int:
    from pipeline.storage import storage_spec  # lazy: start-up stays light

    spec = storage_spec(_load(args), args.storage)
    print(redact(spec))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pipeline.ops.dashboard import dashboard_main  # lazy: start-up stays light

    return dashboard_main(_load(args), args.storage, args.host, args.port)


def cmd_delete(args: argparse.Namespace) -> int:
    from pipeline.ops.manage import delete_main  # lazy: start-up stays light

    return delete_main(_load(args), args.storage, args.tracking_uri, args.yes)


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline import tracking  # lazy: start-up stays light
    from pipeline.bench.run import format_report, run_bench, write_reports  # lazy: start-up stays light

    for key in ("threads", "repeats", "epochs"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key} = {getattr(args, key)}: must be >= 1")
    result = run_bench(
        quick=args.quick,
        threads=args.threads,
        repeats=args.repeats,
        epochs=args.epochs,
        pruning=args.pruning,
        log=lambda line: print(line, file=sys.stderr),
    )
    paths = write_reports(result, args.out, tracking.provenance())
    print(format_report(result))  # every section, as bench.md holds it
    print(f"written: {', '.join(map(str, paths))}")
    return 0


LIGHT = ("check", "schedule")  # commands that never import torch, optuna or mlflow

COMMANDS = {
    "study": cmd_study,
    "worker": cmd_worker,
    "check": cmd_check,
    "gradcheck": cmd_gradcheck,
    "rerun": cmd_rerun,
    "schedule": cmd_schedule,
    "report": cmd_report,
    "bench": cmd_bench,
    "best": cmd_best,
    "export": cmd_export,
    "studies": cmd_studies,
    "delete": cmd_delete,
    "storage": cmd_storage,
    "dashboard": cmd_dashboard,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in LIGHT:
        _quiet_libraries()
    try:
        with stop_on_signals():  # a signal: the running trial ends FAIL and queued, its MLflow run closed
            return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Exception, KeyboardInterrupt) as exc:
        stop = signal_in(exc)
        if stop is None:
            raise
        number = getattr(stop, "trial", None)
        trial = f"trial {number} was marked FAIL and queued again; " if number is not None else ""
        print(f"stopped by {stop_name(stop)}: {trial}run the same command to resume", file=sys.stderr)
        return exit_code(stop)


def entry() -> None:
    """``pipeline`` and ``python -m pipeline``: ``main``, then the exit handlers, then ``os._exit``.

    When a command returns, everything it wrote is closed (atomic file writes; the journal and the
    MLflow store commit as they go) and the exit handlers (logging, MLflow's, the bench probe's) run
    here. What is skipped is the interpreter's teardown of torch, MLflow and their modules: about
    1.5 s of a training command's wall time (``make bench``, the whole-process breakdown's "exit").
    An exception or ``SystemExit`` from ``main`` (argparse's usage errors) exits the normal way.
    """
    rc = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere: a normal exit
    if run_exit_handlers is None:
        raise SystemExit(rc)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to say
            stream.flush()
    os._exit(rc if isinstance(rc, int) else 1)


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: MLflow/Optuna info logs and known noise off."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import optuna  # lazy: only the commands that use optuna pay for its import

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
