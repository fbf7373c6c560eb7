"""Whole-study measurements: overhead over bare training, population training, seed replicates'
cost, pruning's saving."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.bench.speed import BATCH, HIDDEN, time_interleaved
from pipeline.config import TrainingConfig, load_study, parse_study
from pipeline.data import load_split
from pipeline.model import build_mlp
from pipeline.stacked import plan_groups, train_population, train_sets
from pipeline.storage import open_storage, trial_counts
from pipeline.study.run import run_study
from pipeline.train import Hyper, replicate_seeds, train, trial_setup


def study_overhead(cfg, workdir: Path) -> dict[str, Any]:
    """Wall time of ``run_study`` (Optuna journal, MLflow on SQLite, reports, study page) vs bare
    ``train()`` of the same trials (same params, same seeds).

    A first call runs one trial and pays the one-off costs (MLflow creating its SQLite store,
    first imports); the second call resumes the study to ``cfg.trials`` and is the one measured,
    as a study that already exists runs.
    """

    storage = str(workdir / "storage" / "study.journal")
    (workdir / "mlruns").mkdir(parents=True, exist_ok=True)
    walls = []
    for total in (1, cfg.trials):
        start = time.perf_counter()
        run_study(
            cfg.with_overrides(trials=total),
            storage=storage,
            tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
            reports_root=workdir / "reports",
            progress=False,
        )
        walls.append(time.perf_counter() - start)
    trials = optuna.load_study(study_name=cfg.name, storage=open_storage(storage)).trials[1:]
    inside = sum(t.user_attrs["train_seconds"] for t in trials)  # train() as the study ran it
    split = load_split(cfg.dataset)
    bare = 0.0
    for trial in trials:  # again without Optuna, MLflow or reports; best of two
        shape, hyper = trial_setup(cfg.model, trial.params)
        times = []
        for _ in range(2):
            model = build_mlp(split.input_dim, shape.hidden, shape.activation, cfg.training.seed)
            start = time.perf_counter()
            train(model, split, hyper, cfg.training)
            times.append(time.perf_counter() - start)
        bare += min(times)
    wall = walls[1]
    return {
        "study": cfg.name,
        "trials": len(trials),
        "epochs": cfg.training.epochs,
        "first_call_s": walls[0],
        "wall_s": wall,
        "train_in_study_s": inside,
        "bare_training_s": bare,
        "overhead_pct": 100 * (wall - inside) / inside,
        "overhead_s_per_trial": (wall - inside) / len(trials),
        "overhead_vs_bare_pct": 100 * (wall - bare) / bare,
    }


def capacity_config(path: Path = Path("studies/gmm-capacity.toml")):
    """The 2-D capacity study (from its TOML when present): 200 points, full batch, 1000 epochs."""

    if path.is_file():
        return load_study(path)
    return parse_study(
        {
            "name": "gmm-capacity",
            "trials": 8,
            "dataset": {"source": "gmm", "n_train": 250, "val_fraction": 0.2, "seed": 0},
            "model": {"hidden": [5]},
            "training": {"epochs": 1000, "batch_size": 0, "shuffle": False, "seed": 0},
            "search": {
                "lr": 0.1,
                "hidden": {"choices": [5, 10, 100, 500]},
                "activation": {"choices": ["tanh", "relu"]},
            },
            "sampler": {"kind": "grid"},
        },
        str(path),
    )


def capacity_members(cfg) -> list[tuple[int, str, Hyper]]:
    """The capacity study's grid: (hidden width, activation, hyperparameters) per trial."""
    activations = cfg.search["activation"].values() if "activation" in cfg.search else (cfg.model.activation,)
    hyper = Hyper(*(cfg.search[k].values()[0] for k in ("lr", "momentum", "weight_decay")))
    return [(h, a, hyper) for h in cfg.search["hidden"].values() for a in activations]


def lr_search_members(width: int = 10, activation: str = "tanh", n: int = 8) -> list[tuple[int, str, Hyper]]:
    """A search over lr alone at one small width: n log-spaced rates from 0.01 to 1."""
    return [(width, activation, Hyper(0.01 * 100 ** (i / (n - 1)))) for i in range(n)]


def population_speed(cfg, members, epochs: int | None = None, repeats: int = 3) -> dict[str, Any]:
    """Training time of ``members`` (on ``cfg``'s data and training settings) one by one vs as one
    population, interleaved ``repeats`` times; medians."""

    training = dataclasses.replace(cfg.training, epochs=epochs or cfg.training.epochs)
    split = load_split(cfg.dataset)

    def models():
        return [build_mlp(split.input_dim, (h,), a, training.seed) for h, a, _ in members]

    def one_by_one():
        return [train(model, split, m[2], training) for model, m in zip(models(), members, strict=True)]

    def population():
        together = models()
        return together, train_population(together, split, [m[2] for m in members], training)

    timed = time_interleaved({"one": one_by_one, "population": population}, repeats, training.epochs)
    singles = timed["one"][1]
    together, results = timed["population"][1]
    one_s, pop_s = (statistics.median(timed[k][0].seconds) for k in ("one", "population"))
    groups = plan_groups(together, training.batch_size or len(split.y_train))
    drift = max(
        abs(a.history[-1].val_acc - b.history[-1].val_acc) for a, b in zip(singles, results, strict=True)
    )
    return {
        "trials": len(members),
        "epochs": training.epochs,
        "repeats": repeats,
        "one_by_one_s": one_s,
        "population_s": pop_s,
        "factor": one_s / pop_s,
        "groups": [[f"{members[i][1]}-{members[i][0]}" for i in g] for g in groups],
        "max_val_acc_difference": drift,  # float32 round-off only
    }


def replicate_cost(split, hidden, k: int = 5, epochs: int = 2, repeats: int = 3) -> dict[str, Any]:
    """What K seed replicates cost against one training run: one ``train()`` (one seed), the K
    replicates as one lockstep stacked set (how a trial with ``seeds = K`` trains them) and K
    ``train()`` calls one after another; interleaved ``repeats`` times, min / median / max."""
    training = TrainingConfig(epochs=epochs, batch_size=BATCH, seed=0, seeds=k)
    seeds = replicate_seeds(training)
    hyper = Hyper(0.01, 0.9, 1e-4)

    def models():
        return [build_mlp(split.input_dim, hidden, "relu", seed) for seed in seeds]

    def one():
        return train(models()[0], split, hyper, dataclasses.replace(training, seed=seeds[0]))

    def stacked():
        return train_sets(models(), split, [hyper] * k, training, [list(range(k))], seeds=seeds)

    def sequential():
        return [
            train(model, split, hyper, dataclasses.replace(training, seed=seed))
            for model, seed in zip(models(), seeds, strict=True)
        ]

    timed = time_interleaved({"one": one, "stacked": stacked, "sequential": sequential}, repeats, epochs)
    out: dict[str, Any] = {"k": k, "epochs": epochs, "repeats": repeats, "hidden": list(hidden)}
    for name in ("one", "stacked", "sequential"):
        seconds = timed[name][0].seconds
        out[f"{name}_s"] = {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)}
    out["stacked_vs_one"] = out["stacked_s"]["median"] / out["one_s"]["median"]
    out["sequential_vs_one"] = out["sequential_s"]["median"] / out["one_s"]["median"]
    return out


def pruning_saving(trials: int, epochs: int, fashion: bool, workdir: Path) -> dict[str, Any]:
    """The same TPE study without and with the median pruner: epochs trained, best validation accuracy.

    The two runs are not paired trial by trial (TPE learns from pruned trials, so its suggestions
    part ways); they are what a user running either would get.
    """

    out: dict[str, Any] = {"trials": trials, "epochs": epochs}
    for kind in ("none", "median"):
        wall, study = timed_study(
            f"bench-pruner-{kind}",
            fashion,
            trials,
            epochs,
            workdir,
            sampler={"kind": "tpe", "seed": 0},
            pruner={"kind": kind, "warmup_epochs": max(1, epochs // 6)},
        )
        done = study.trials
        ran = sum(int(t.user_attrs.get("epochs_run", 0)) for t in done)
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        out[kind] = {
            "wall_s": wall,
            "epochs_run": ran,
            "fraction_of_full_training": ran / (len(done) * epochs),
            "pruned": trial_counts(study).pruned,
            "best_val_acc": max((t.value for t in complete), default=math.nan),
        }
    return out


def timed_study(
    name: str, fashion: bool, trials: int, epochs: int, workdir: Path, **sections: dict[str, Any]
) -> tuple[float, optuna.Study]:
    """The bench study (Fashion-2's or the gmm's, TPE) run to ``trials`` in ``workdir``: its Optuna
    journal under storage/, MLflow on SQLite under mlruns/, reports under reports/, no progress bars.
    ``sections`` update the study's tables (``training={"device": "cuda"}``). Returns ``run_study``'s
    wall seconds and the study (read it before ``workdir`` goes)."""
    raw = _study_raw(name, fashion, trials, epochs)
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    cfg = parse_study(raw, "<bench>")
    storage = str(workdir / "storage" / f"{cfg.name}.journal")
    (workdir / "mlruns").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_study(
        cfg,
        storage=storage,
        tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        reports_root=workdir / "reports",
        progress=False,
    )
    wall = time.perf_counter() - start
    return wall, optuna.load_study(study_name=cfg.name, storage=open_storage(storage))


def _study_raw(name: str, fashion: bool, trials: int, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "trials": trials,
        "dataset": {"source": "fashion2", "download": False} if fashion else {"source": "gmm"},
        "model": {"hidden": list(HIDDEN) if fashion else [64, 64]},
        "training": {"epochs": epochs, "batch_size": BATCH, "seed": 0},
        "search": {
            "lr": {"low": 1e-3, "high": 0.1, "log": True},
            "momentum": {"low": 0.0, "high": 0.95},
            "weight_decay": {"low": 1e-5, "high": 1e-2, "log": True},
        },
    }


def overhead_study(fashion: bool, quick: bool) -> dict[str, Any]:

    raw = _study_raw("bench-overhead", fashion, trials=3 if quick else 5, epochs=2 if quick else 5)
    raw["sampler"] = {"kind": "random"}
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        return study_overhead(parse_study(raw, "<bench>"), Path(tmp))


# what each command imports before its first useful step: the light ones run whole, the heavy ones
# are timed as the import of the module they run (their work is a study, not start-up)
STARTUP = (
    ("pipeline --help", ["-m", "pipeline", "--help"]),
    ("pipeline check studies/demo.toml", ["-m", "pipeline", "check", "studies/demo.toml"]),
    ("pipeline schedule --list", ["-m", "pipeline", "schedule", "--list"]),
    ("import for study / worker", ["-c", "import pipeline.study.run"]),
    ("import for report", ["-c", "import pipeline.report.study_page"]),
    ("import for rerun", ["-c", "import pipeline.ops.rerun"]),
)


def startup_seconds(repeats: int = 3, python: str = sys.executable) -> dict[str, dict[str, float]]:
    """Wall seconds of each command's start-up in a fresh interpreter: min / median / max of repeats.

    The commands run interleaved (one of each per repeat), so a change of load hits all alike.
    ``schedule --list`` reads a stand-in crontab (``true``) so that it never touches the user's.
    """
    env = {**os.environ, "PIPELINE_CRONTAB": "true"}
    times: dict[str, list[float]] = {name: [] for name, _ in STARTUP}
    for _ in range(repeats):
        for name, argv in STARTUP:
            start = time.perf_counter()
            subprocess.run([python, *argv], env=env, capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    return {name: {"min": min(t), "median": statistics.median(t), "max": max(t)} for name, t in times.items()}
