"""Command line: ``pipeline <command>`` (also ``python -m pipeline``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.config import ConfigError, load_study

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="MLflow-tracked Optuna hyperparameter studies."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("study", help="run or resume a study until it holds its number of trials")
    _study_args(p)
    p = sub.add_parser("gradcheck", help="check the hand-written backprop against finite differences")
    _study_args(p)
    p = sub.add_parser("check", help="validate a study file and print the resolved configuration")
    p.add_argument("study_file", type=Path, metavar="STUDY.toml")
    return parser


def _load(args: argparse.Namespace):
    cfg = load_study(args.study_file)
    return cfg.with_overrides(
        trials=getattr(args, "trials", None),
        epochs=getattr(args, "epochs", None),
        name=getattr(args, "name", None),
    )


def cmd_study(args: argparse.Namespace) -> int:
    from pipeline.study import run_study

    cfg = _load(args)
    outcome = run_study(cfg, storage=args.storage, tracking_uri=args.tracking_uri)
    print(
        f"study {outcome.name}: {outcome.n_complete} complete, {outcome.n_pruned} pruned, "
        f"{outcome.n_failed} failed"
    )
    if outcome.best_number is not None:
        print(f"best trial {outcome.best_number}: {cfg.objective} = {outcome.best_value:.4f}")
    print(f"reports: {outcome.reports}/")
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from pipeline.study import run_gradcheck

    cfg = _load(args)
    _, table, failures, folder = run_gradcheck(cfg, tracking_uri=args.tracking_uri)
    print(table)
    print(f"saved: {folder}/gradcheck.json, {folder}/gradcheck.png")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_check(args: argparse.Namespace) -> int:
    import json

    cfg = _load(args)
    print(json.dumps(cfg.to_dict(), indent=2, default=list))
    print(f"config hash {cfg.config_hash()}", file=sys.stderr)
    return 0


COMMANDS = {"study": cmd_study, "check": cmd_check, "gradcheck": cmd_gradcheck}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from pipeline.data import DataError
    from pipeline.study import StudyError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, StudyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: MLflow/Optuna info logs and known noise off."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
