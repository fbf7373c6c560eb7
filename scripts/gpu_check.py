"""``make gpu-check``: the CPU oracles rerun on the GPU, then what the GPU buys, in trials per second.

Without a CUDA device it says so and exits 0. With one it checks, on the device in float64:
  1. ``ManualSGD`` (the hand-written update) against ``torch.optim.SGD``, to 1e-12;
  2. ``pipeline.stacked.train_population`` against separate ``train()`` runs, to 1e-12;
then times trials per second for one-by-one training against populations of 8 and 64 on the
Fashion-2 shape (784-512-128-32-2, random data of Fashion-2's size, so no files are needed), 30
epochs unless that would take the script past ``--budget`` seconds (then fewer, said in the
report); then times a 16-trial Fashion-2 study end to end (``run_study``: data, Optuna journal,
MLflow on SQLite, trial reports, study page) with ``[training] device`` set to the GPU, once one trial
at a time and once in populations of 8: wall time, trials per second and each stage's median time
per trial. Real Fashion-MNIST when Debian's copy is installed, else random data of its size. The
studies share the budget and the epochs with the timings. Writes ``reports/bench/gpu.md``; exit 1
when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import files, tracking
from pipeline.config import TrainingConfig
from pipeline.data import DEBIAN_FASHION_DIR, FASHION_FILES, Split
from pipeline.device import resolve, set_precision
from pipeline.model import build_mlp
from pipeline.optim import ManualSGD
from pipeline.stacked import train_population
from pipeline.train import Hyper, train

FASHION2 = {"train": 9600, "val": 2400, "test": 2000, "dim": 784}  # two Fashion-MNIST classes
HIDDEN = (512, 128, 32)  # 784-512-128-32-2
TOL = 1e-12
FASHION2_PER_CLASS = (6000, 1000)  # Fashion-MNIST images of each class: training pool, test
FASHION2_LABELS = (0, 6)  # T-shirt/top, Shirt: the pair of studies/fashion2.toml
STUDY_TRIALS = 16
STUDY_POPULATIONS = (1, 8)
# each stage's time_<stage>_s, then time_trial_s (pipeline.bench.process's STAGE_KEYS and TRIAL_KEY)
STUDY_KEYS = (
    "time_train_s",
    "time_evaluate_s",
    "time_bounds_s",
    "time_report_s",
    "time_tracking_s",
    "time_trial_s",
)


def random_split(
    n_train: int, n_val: int, n_test: int, dim: int, device: torch.device, seed: int = 0
) -> Split:
    """A two-class split of Gaussian inputs with labels from a random linear rule, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=gen)
    parts = []
    for n in (n_train, n_val, n_test):
        x = torch.randn(n, dim, generator=gen)
        parts += [x, (x @ w > 0).long()]
    split = Split(*parts, classes=("class 0", "class 1"), source="random", split_hash="random")
    return split.to(device)


def check_sgd(device: torch.device) -> float:
    """Largest |ManualSGD - torch.optim.SGD| over the parameters after 50 steps (float64)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 32, generator=gen).double(), torch.randint(0, 2, (256,), generator=gen)
    x, y = x.to(device), y.to(device)
    ours = build_mlp(32, (64, 16), "tanh", 0, dtype=torch.float64).to(device)
    ref = build_mlp(32, (64, 16), "tanh", 0, dtype=torch.float64).to(device)
    opt_ours = ManualSGD(ours.parameters(), 0.05, 0.9, 1e-3)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(50):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters(), strict=True))


def check_population(device: torch.device) -> float:
    """Largest weight difference between one population of 4 and 4 separate ``train()`` runs."""
    split = random_split(600, 200, 200, 16, device, seed=2)
    config = TrainingConfig(epochs=3, batch_size=64, dtype="float64")
    hypers = [Hyper(0.1), Hyper(0.05, 0.9), Hyper(0.2, 0.5, 1e-3), Hyper(0.02, 0.0, 1e-2)]
    widths = [(8,), (16,), (16,), (32,)]
    separate = [build_mlp(16, w, "relu", i) for i, w in enumerate(widths)]
    together = [build_mlp(16, w, "relu", i) for i, w in enumerate(widths)]
    for model, hyper in zip(separate, hypers, strict=True):
        train(model, split, hyper, config)
    train_population(together, split, hypers, config)
    return max(
        (a - b).abs().max().item()
        for m1, m2 in zip(separate, together, strict=True)
        for a, b in zip(m1.parameters(), m2.parameters(), strict=True)
    )


def trials_per_second(split: Split, config: TrainingConfig, k: int, together: bool) -> float:
    """``k`` trials (different lr) trained one by one with ``train()`` or as one population."""
    models = [build_mlp(FASHION2["dim"], HIDDEN, "relu", i) for i in range(k)]
    hypers = [Hyper(0.01 * (1 + i % 8), 0.9) for i in range(k)]
    torch.cuda.synchronize(split.device)
    started = time.perf_counter()
    if together:
        train_population(models, split, hypers, config)
    else:
        for model, hyper in zip(models, hypers, strict=True):
            train(model, split, hyper, config)
    torch.cuda.synchronize(split.device)
    return k / (time.perf_counter() - started)


def fashion_data(root: Path, per_class: tuple[int, int] | None = None, seed: int = 0) -> str:
    """Make ``root`` a Fashion-2 study's ``dataset.root``; says what data it holds.

    ``per_class`` None with Debian's Fashion-MNIST installed: the real images (the first study
    decompresses them into ``root``). Otherwise random idx files, ``per_class`` = (training pool,
    test) images of each of the two classes (Fashion-2's counts by default), labelled by a random
    linear rule on the pixels, the larger half of the scores Shirt.
    """
    names = [name for pair in FASHION_FILES.values() for name in pair]
    if per_class is None and all((DEBIAN_FASHION_DIR / f"{name}.gz").is_file() for name in names):
        return f"Fashion-MNIST ({DEBIAN_FASHION_DIR})"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(28 * 28)
    counts = per_class or FASHION2_PER_CLASS
    for is_train, n in zip((True, False), counts, strict=True):
        images = rng.integers(0, 256, (2 * n, 28, 28), dtype=np.uint8)
        labels = np.full(2 * n, FASHION2_LABELS[0], dtype=np.uint8)
        labels[np.argsort((images.reshape(2 * n, -1) - 127.5) @ w)[n:]] = FASHION2_LABELS[1]
        images_name, labels_name = FASHION_FILES[is_train]
        (raw / images_name).write_bytes(struct.pack(">IIII", 2051, 2 * n, 28, 28) + images.tobytes())
        (raw / labels_name).write_bytes(struct.pack(">II", 2049, 2 * n) + labels.tobytes())
    return f"random data ({2 * counts[0]} training-pool / {2 * counts[1]} test images)"


def study_end_to_end(
    device: str, trials: int, epochs: int, population: int, data_root: Path
) -> dict[str, Any]:
    """A Fashion-2 bench study (``pipeline.bench.studies``: TPE, 784-512-128-32-2, batch 256) of
    ``trials`` x ``epochs`` with ``[training] device`` and ``population``, on ``data_root``'s data, in
    a fresh workspace: the wall time of the whole ``run_study``, trials per second, and each stage's
    median over the complete trials (their ``time_<stage>_s`` Optuna user attributes)."""
    from optuna.trial import TrialState  # lazy, like the next: the no-CUDA path stays light

    from pipeline.bench.studies import timed_study

    with tempfile.TemporaryDirectory(prefix="gpu-check-study-") as tmp:
        wall, study = timed_study(
            f"gpu-check-population-{population}",
            True,
            trials,
            epochs,
            Path(tmp),
            dataset={"root": str(data_root)},
            training={"device": device, "population": population},
        )
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    stages = {
        key: statistics.median(float(t.user_attrs.get(key, 0.0)) for t in complete) if complete else math.nan
        for key in STUDY_KEYS
    }
    return {
        "device": device,
        "population": population,
        "trials": trials,
        "complete": len(complete),
        "epochs": epochs,
        "wall_s": wall,
        "trials_per_s": trials / wall,
        "stages": stages,
    }


def study_cost(warm: dict[str, Any], trials: int, seconds_per_trial_epoch: float) -> tuple[float, float]:
    """A study's estimated seconds as (fixed, per epoch), from a warm-up study's result: what lies
    outside its trials, what a trial spends besides training, and the timings' training speed."""
    trial, train = warm["stages"]["time_trial_s"], warm["stages"]["time_train_s"]
    outside = max(0.0, warm["wall_s"] - warm["complete"] * trial)
    return outside + trials * max(0.0, trial - train), trials * seconds_per_trial_epoch


def fit_epochs(budget: float, asked: int, costs: list[tuple[float, float]]) -> int:
    """The most epochs, up to ``asked`` and at least 1, whose (fixed, per epoch) costs fit ``budget``."""
    fixed, per_epoch = (math.fsum(c) for c in zip(*costs, strict=True))
    return max(1, min(asked, int((budget - fixed) / per_epoch)))


def study_lines(results: list[dict[str, Any]], data: str, scaled: str = "", skipped: str = "") -> list[str]:
    """The studies' section of gpu.md, one row per study; ``scaled``: why the epochs are fewer than
    asked, ``skipped``: which study did not run and why."""
    skipped = f" {skipped}" if skipped else ""
    if not results:
        return [f"Study end to end: not run.{skipped}", ""]
    first = results[0]
    heads = " | ".join(STUDY_KEYS)
    return [
        f"Study end to end: {first['trials']} trials of a Fashion-2 study (TPE, 784-512-128-32-2, batch "
        f"256, float32), {first['epochs']} epochs{scaled}, on {data}, "
        f'`[training] device = "{first["device"]}"`; each in a fresh workspace (Optuna journal, MLflow '
        "on SQLite, trial reports, study page), after a warm-up study that paid the one-off costs "
        "(imports, unpacking the data). Wall: the whole `run_study`; stages: medians over the complete "
        f"trials, in seconds (in a population a trial's time_train_s is its set's, shared).{skipped}",
        "",
        f"| population | trials complete | wall s | trials/s | {heads} |",
        "|---|---|---|---|" + "---|" * len(STUDY_KEYS),
        *(
            f"| {r['population']} | {r['complete']}/{r['trials']} | {r['wall_s']:.2f} | "
            f"{r['trials_per_s']:.3f} | " + " | ".join(f"{r['stages'][k]:.3f}" for k in STUDY_KEYS) + " |"
            for r in results
        ),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per timed trial (at most)")
    parser.add_argument("--budget", type=float, default=240, help="seconds the timings and studies may take")
    parser.add_argument("--study-trials", type=int, default=STUDY_TRIALS, help="trials of each timed study")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/gpu.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = resolve("cuda")
    set_precision("full")
    for name in ("mlflow", "alembic"):  # the studies' info logs: this script prints its own lines
        logging.getLogger(name).setLevel(logging.WARNING)
    import optuna  # lazy: see study_end_to_end

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sgd, population = check_sgd(device), check_population(device)
    checks = [
        ("ManualSGD = torch.optim.SGD (float64, 50 steps)", sgd),
        ("population of 4 = 4 separate train() runs (float64, 3 epochs)", population),
    ]
    for name, diff in checks:
        print(f"{'ok  ' if diff <= TOL else 'FAIL'} {name}: max |difference| {diff:.3g} (tolerance {TOL:g})")

    split = random_split(FASHION2["train"], FASHION2["val"], FASHION2["test"], FASHION2["dim"], device)
    base = TrainingConfig(epochs=1, batch_size=256)
    trials_per_second(split, base, 2, together=True)  # warm-up: CUDA context, cuBLAS handles, kernels
    # one epoch of each, to fit the epochs into the budget (every measurement scales with epochs)
    probes = {
        (k, together): trials_per_second(split, base, k, together)
        for k, together in ((8, False), (8, True), (64, True))
    }
    per_epoch = sum(k / rate for (k, _), rate in probes.items())
    # the studies: a warm-up study (2 trials, 1 epoch) pays the one-off costs (imports, MLflow's
    # first store, unpacking the data) and gives what a trial costs besides training
    data_dir = tempfile.TemporaryDirectory(prefix="gpu-check-data-")
    data_root = Path(data_dir.name)
    data = fashion_data(data_root)
    warm = study_end_to_end(str(device), 2, 1, 1, data_root)
    speed = {1: 1 / probes[(8, False)], 8: 1 / probes[(8, True)]}  # seconds per trial-epoch
    studies = list(STUDY_POPULATIONS)

    def costs(pops):
        return [(0.0, per_epoch), *(study_cost(warm, args.study_trials, speed[p]) for p in pops)]

    while studies and sum(f + e for f, e in costs(studies)) > args.budget:  # not even at 1 epoch
        studies.pop()
    skipped = [p for p in STUDY_POPULATIONS if p not in studies]
    epochs = fit_epochs(args.budget, args.epochs, costs(studies))
    config = dataclasses.replace(base, epochs=epochs)
    rates = {key: trials_per_second(split, config, key[0], key[1]) for key in probes}
    one_by_one = rates[(8, False)]
    rows = [
        ("one by one (train())", 8, rates[(8, False)], 1.0),
        ("population of 8", 8, rates[(8, True)], rates[(8, True)] / one_by_one),
        ("population of 64", 64, rates[(64, True)], rates[(64, True)] / one_by_one),
    ]
    for name, k, rate, speedup in rows:
        print(f"{name:22s} {k:3d} trials: {rate:8.2f} trials/s ({speedup:.1f}x)")
    results = [study_end_to_end(str(device), args.study_trials, epochs, p, data_root) for p in studies]
    data_dir.cleanup()
    for r in results:
        print(
            f"study, population {r['population']}: {r['complete']}/{r['trials']} trials in "
            f"{r['wall_s']:.1f} s ({r['trials_per_s']:.3f} trials/s)"
        )
    scaled = "" if epochs == args.epochs else f" (scaled down from {args.epochs} to fit {args.budget:g} s)"
    left_out = (
        f"Population {', '.join(map(str, skipped))} not run: over {args.budget:g} s even at 1 epoch."
        if skipped
        else ""
    )

    prov = tracking.provenance(device)
    lines = [
        "# GPU check",
        "",
        f"Device: {prov.get('device_name')} ({prov.get('device')}), CUDA {prov.get('cuda')}, "
        f"driver {prov.get('cuda_driver')}, cuDNN {prov.get('cudnn')}, torch {prov['torch']}, "
        f"commit {prov['git_commit']}.",
        "",
        "| check (on the device) | max abs difference | tolerance | result |",
        "|---|---|---|---|",
        *(f"| {name} | {diff:.3g} | {TOL:g} | {'ok' if diff <= TOL else 'FAIL'} |" for name, diff in checks),
        "",
        f"Trials per second, Fashion-2 shape 784-512-128-32-2 on random data of Fashion-2's size "
        f"({FASHION2['train']} train / {FASHION2['val']} val), batch 256, float32, {epochs} epochs"
        + scaled
        + ":",
        "",
        "| training | trials | trials/s | vs one by one |",
        "|---|---|---|---|",
        *(f"| {name} | {k} | {rate:.2f} | {speedup:.1f}x |" for name, k, rate, speedup in rows),
        "",
        *study_lines(results, data, scaled, left_out),
    ]
    files.write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(diff <= TOL for _, diff in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
