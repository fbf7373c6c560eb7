"""Benchmark: the seed-style training loop against the pipeline's, and both against this machine.

``pipeline bench`` (``make bench``) times, in one process, with torch's thread setting:

(a) the **seed-style loop** the student report used: a torchvision-style per-sample dataset (uint8
    image -> PIL -> ToTensor -> Normalize), ``DataLoader(batch_size=256)``, autograd and the
    hand-written update, with a ``.item()`` per batch and a DataLoader pass over the validation set
    every epoch;
(b) ``pipeline.train.train`` on the same split held as one tensor: same model (an MLP with ReLU),
    same update, same batches (both draw ``torch.randperm`` from the training seed each epoch), so
    the two end at the same weights, which the bench checks;
(b') (b) under bfloat16 autocast (``precision = "bf16"``);
and (b) again on one thread. Loops are interleaved (a, b, b', a, b, b', ...) so a change in the
machine's load hits all of them alike.

It reports seconds per epoch (median of repeats) and per 30-epoch trial, the speed-up (a)/(b), the
achieved GFLOP/s and that as a share of a large fp32 matmul timed in the same run with the same
number of threads. FLOPs per
epoch, per training example: 2*MACs forward + 2*MACs for the weight gradients + 2*(MACs - first
layer's MACs) for the input gradients (none are needed for the input itself); per validation
example: 2*MACs. Also: the study overhead (a small study with MLflow and reports vs the same
trials' bare training), bf16's accuracy cost on Fashion-2, population training on the 2-D data,
and with ``--pruning`` the median pruner's saving on a 40-trial Fashion-2 study. Results go to
``reports/bench/`` (bench.csv: the speed table; bench.md; bench.json: everything, with provenance).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import files
from pipeline.config import DatasetConfig, TrainingConfig
from pipeline.data import DataError, Split, load_split
from pipeline.model import build_mlp
from pipeline.optim import ManualSGD
from pipeline.train import Hyper, train

TRIAL_EPOCHS = 30  # a trial of the CIFAR-2 / Fashion-2 studies
HIDDEN = (512, 128, 32)  # the student report's MLP: in-512-128-32-2, ReLU
HYPER = Hyper(lr=0.01, momentum=0.9, weight_decay=1e-3)  # the report's setting (units: per step)
BATCH = 256  # the report's batch size
CIFAR_SHAPE = (8000, 2000, 32, 32, 3)  # train, validation, H, W, C: CIFAR-2's split sizes


@dataclass(frozen=True)
class Workload:
    """A split plus the uint8 images it was made from (what a torchvision dataset hands PIL)."""

    name: str
    split: Split
    images_train: np.ndarray  # uint8 [n, H, W, C] or [n, H, W]
    images_val: np.ndarray
    note: str


@dataclass(frozen=True)
class Timing:
    seconds: tuple[float, ...]  # wall time of each repeat
    epochs: int  # epochs per repeat

    @property
    def per_epoch(self) -> float:
        return statistics.median(self.seconds) / self.epochs

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.seconds) / self.epochs, max(self.seconds) / self.epochs


@dataclass
class BenchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # the speed table
    extras: dict[str, Any] = field(default_factory=dict)  # matmul, study overhead, bf16, population
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# FLOPs and the machine's matmul rate


def mlp_macs(widths: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates per example of an MLP with these layer widths (input first, output
    last), and those of its first layer."""
    pairs = list(zip(widths[:-1], widths[1:], strict=True))
    return sum(a * b for a, b in pairs), pairs[0][0] * pairs[0][1]


def epoch_flops(widths: Sequence[int], n_train: int, n_val: int) -> float:
    """FLOPs of one epoch: forward + backward on every training example, forward on validation.

    Backward = weight gradients (2*MACs) + input gradients of every layer but the first
    (2*(MACs - first)); the bias and activation terms are O(width) and left out.
    """
    macs, first = mlp_macs(widths)
    return n_train * (2 * macs + 2 * macs + 2 * (macs - first)) + n_val * 2 * macs


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n x n matmul: the best of several timed batches (the machine's ceiling)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best, deadline = math.inf, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - start) / 3)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------------------------
# Workloads


def _to_images(x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Undo ToTensor + Normalize(0.5, 0.5): flattened CHW floats back to uint8 images (HWC / HW)."""
    u = torch.round((x * 0.5 + 0.5) * 255).clamp_(0, 255).to(torch.uint8).reshape(len(x), *shape)
    return (u[:, 0] if shape[0] == 1 else u.permute(0, 2, 3, 1)).numpy()


def cifar2_workload(root: Path, seed: int = 0) -> Workload:
    """The real CIFAR-2 split when CIFAR-10 is under ``root``, else random uint8 images of its shape."""
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-10-python.tar.gz").is_file():
        split = load_split(DatasetConfig(source="cifar2", root=str(root), download=False))
        images = [_to_images(x, (3, 32, 32)) for x in (split.x_train, split.x_val)]
        return Workload("cifar2", split, *images, "CIFAR-2 (airplane vs bird), the real split")
    n_train, n_val, h, w, c = CIFAR_SHAPE
    gen = torch.Generator().manual_seed(seed)
    hwc = torch.randint(0, 256, (n_train + n_val, h, w, c), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 2, (n_train + n_val,), generator=gen)
    # as torchvision's ToTensor + Normalize(0.5, 0.5) would give them, flattened in CHW order
    x = hwc.permute(0, 3, 1, 2).reshape(len(hwc), -1).float().div_(255).sub_(0.5).div_(0.5)
    split = Split(
        x[:n_train],
        labels[:n_train],
        x[n_train:],
        labels[n_train:],
        x[n_train:],
        labels[n_train:],
        classes=("airplane", "bird"),
        source="cifar2",
        split_hash="random",
    )
    images = hwc.numpy()
    return Workload(
        "cifar2-shaped",
        split,
        images[:n_train],
        images[n_train:],
        "random uint8 images of CIFAR-2's shape and size (CIFAR-10 is not under data/)",
    )


def fashion2_workload(root: Path) -> Workload | None:
    """Fashion-2 (T-shirt/top vs Shirt) when it can be read offline, else None."""
    try:
        split = load_split(DatasetConfig(source="fashion2", root=str(root), download=False))
    except DataError:
        return None
    images = [_to_images(x, (1, 28, 28)) for x in (split.x_train, split.x_val)]
    return Workload("fashion2", split, *images, "Fashion-2 (T-shirt/top vs Shirt), the real split")


# ----------------------------------------------------------------------------------------------
# (a) the seed-style loop


class SeedStyleDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 / FashionMNIST do per item: uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor) -> None:
        from torchvision import transforms

        channels = 1 if images.ndim == 3 else images.shape[-1]
        self.images, self.labels = images, labels.tolist()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class EpochPermutation(torch.utils.data.Sampler):
    """``torch.randperm(n)`` from one seeded generator each epoch: the order ``train()`` draws.

    (``RandomSampler`` draws a second, unused permutation per epoch, so it would drift from it.)
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed + 1)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def seed_style_train(work: Workload, hyper: Hyper, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The student report's loop, per-batch ``.item()`` calls and all; returns the trained model."""
    split = work.split
    train_set = SeedStyleDataset(work.images_train, split.y_train)
    val_set = SeedStyleDataset(work.images_val, split.y_val)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=BATCH, sampler=EpochPermutation(len(train_set), seed)
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=BATCH)
    model = build_mlp(split.input_dim, HIDDEN, "relu", seed)
    optimizer = ManualSGD(model.parameters(), hyper.lr, hyper.momentum, hyper.weight_decay)
    for _ in range(epochs):
        model.train()
        running, correct = 0.0, 0
        for xb, yb in loader:
            xb = xb.view(len(xb), -1)
            optimizer.zero_grad()
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        model.eval()
        val_loss, val_correct = 0.0, 0
        with torch.no_grad():
            for xb, yb in val_loader:
                logits = model(xb.view(len(xb), -1))
                val_loss += F.cross_entropy(logits, yb).item() * len(yb)
                val_correct += (logits.argmax(1) == yb).sum().item()
    return model


def pipeline_train(work: Workload, hyper: Hyper, epochs: int, precision: str = "full", seed: int = 0):
    model = build_mlp(work.split.input_dim, HIDDEN, "relu", seed)
    config = TrainingConfig(epochs=epochs, batch_size=BATCH, seed=seed, precision=precision)
    return model, train(model, work.split, hyper, config)


def time_interleaved(
    loops: dict[str, Callable[[], Any]], repeats: int, epochs: int
) -> dict[str, tuple[Timing, Any]]:
    """Each loop once per round, ``repeats`` rounds: a change in the machine's load hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in loops.items():
            start = time.perf_counter()
            last[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: (Timing(tuple(seconds[name]), epochs), last[name]) for name in loops}


def with_threads(threads: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


SEED_LOOP = "(a) seed-style DataLoader"
OURS = "(b) pipeline train()"


def speed_rows(
    work: Workload, rates: dict[int, float], epochs: int, repeats: int, threads: int
) -> tuple[list, list]:
    """(a), (b), (b') on one workload, plus (b) on one thread when there are more: table rows and notes.

    ``rates``: the fp32 matmul rate (GFLOP/s) per thread count, measured in this run.
    """
    split = work.split
    widths = (split.input_dim, *HIDDEN, 2)
    flops = epoch_flops(widths, len(split.y_train), len(split.y_val))
    loops: dict[str, tuple[int, Callable[[], Any]]] = {
        SEED_LOOP: (threads, lambda: seed_style_train(work, HYPER, epochs)),
        OURS: (threads, lambda: pipeline_train(work, HYPER, epochs)[0]),
        "(b') pipeline train(), bf16 autocast": (
            threads,
            lambda: pipeline_train(work, HYPER, epochs, "bf16"),
        ),
    }
    if threads > 1 and 1 in rates:
        loops["(b) pipeline train(), 1 thread"] = (
            1,
            with_threads(1, lambda: pipeline_train(work, HYPER, epochs)),
        )
    timed = time_interleaved({name: fn for name, (_, fn) in loops.items()}, repeats, epochs)
    seed_time = timed[SEED_LOOP][0].per_epoch
    rows = []
    for name, (n_threads, _) in loops.items():
        timing = timed[name][0]
        low, high = timing.spread
        rows.append(
            {
                "workload": work.name,
                "loop": name,
                "threads": n_threads,
                "epochs_x_repeats": f"{epochs}x{len(timing.seconds)}",
                "s_per_epoch": timing.per_epoch,
                "s_per_epoch_min": low,
                "s_per_epoch_max": high,
                "s_per_30_epoch_trial": timing.per_epoch * TRIAL_EPOCHS,
                "speedup_vs_seed": seed_time / timing.per_epoch,
                "gflop_per_epoch": flops / 1e9,
                "gflop_s": flops / timing.per_epoch / 1e9,
                "of_fp32_matmul": flops / timing.per_epoch / 1e9 / rates[n_threads],
            }
        )
    diff = max_weight_difference(timed[SEED_LOOP][1], timed[OURS][1])
    notes = [
        f"{work.name}: {work.note}; {len(split.y_train)} train / {len(split.y_val)} validation; "
        f"MLP {'-'.join(map(str, widths))}; (a) and (b) end {diff:.2g} apart in max |weight| "
        f"after {epochs} epochs (same batches, same update)"
    ]
    return rows, notes


# ----------------------------------------------------------------------------------------------
# bf16's accuracy cost, the study overhead, population training


def bf16_accuracy(work: Workload, epochs: int, seeds: Sequence[int]) -> dict[str, Any]:
    """Validation and test accuracy after training in full precision and under bf16, per seed."""
    from pipeline.evaluate import evaluate

    split, out = work.split, {"epochs": epochs, "seeds": list(seeds)}
    for precision in ("full", "bf16"):
        val, test = [], []
        for seed in seeds:
            model, _ = pipeline_train(work, HYPER, epochs, precision, seed)
            val.append(evaluate(model, split.x_val, split.y_val, split.classes).accuracy)
            test.append(evaluate(model, split.x_test, split.y_test, split.classes).accuracy)
        out[precision] = {"val_acc": val, "test_acc": test}
    diffs = [b - f for b, f in zip(out["bf16"]["test_acc"], out["full"]["test_acc"], strict=True)]
    out["test_acc_bf16_minus_full"] = diffs
    return out


def study_overhead(cfg, workdir: Path) -> dict[str, Any]:
    """Wall time of ``run_study`` (Optuna journal, MLflow on SQLite, reports, study page) vs bare
    ``train()`` of the same trials (same params, same seeds).

    A first call runs one trial and pays the one-off costs (MLflow creating its SQLite store,
    first imports); the second call resumes the study to ``cfg.trials`` and is the one measured,
    as a study that already exists runs.
    """
    import optuna

    from pipeline.storage import open_storage
    from pipeline.study import run_study

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
        p = trial.params
        hidden = (p["hidden"],) if "hidden" in p else cfg.model.hidden
        hyper = Hyper(p["lr"], p["momentum"], p["weight_decay"])
        times = []
        for _ in range(2):
            model = build_mlp(
                split.input_dim, hidden, p.get("activation", cfg.model.activation), cfg.training.seed
            )
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
    from pipeline.config import load_study, parse_study

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
    from pipeline.population import plan_groups, train_population

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


# ----------------------------------------------------------------------------------------------
# The run and its table


def run_bench(
    *,
    quick: bool = False,
    threads: int | None = None,
    repeats: int | None = None,
    epochs: int | None = None,
    data_root: Path = Path("data"),
    pruning: bool = False,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Every measurement, in this process, with ``threads`` intra-op threads (default: torch's)."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    repeats = repeats or (1 if quick else 3)
    epochs = epochs or (1 if quick else 2)
    result = BenchResult()
    result.extras["machine"] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": os.getloadavg()[0],
    }
    log(f"fp32 and bf16 matmul rates ({threads} threads{', and 1' if threads > 1 else ''}) ...")
    budget = 0.5 if quick else 2.0  # seconds per rate
    rates = {threads: matmul_rate(torch.float32, seconds=budget)}
    if threads > 1 and not quick:
        rates[1] = with_threads(1, lambda: matmul_rate(torch.float32, seconds=budget))()
    bf16_rate = matmul_rate(torch.bfloat16, seconds=budget)
    result.extras["matmul"] = {
        "fp32_gflop_s": rates[threads],
        "fp32_gflop_s_1_thread": rates.get(1),
        "bf16_gflop_s": bf16_rate,
        "n": 2048,
    }
    workloads = [cifar2_workload(data_root)]
    fashion = fashion2_workload(data_root)
    if fashion is None:
        result.notes.append("Fashion-2 skipped: not readable offline (apt-get install dataset-fashion-mnist)")
    else:
        workloads.append(fashion)
    for work in workloads:
        log(f"{work.name}: seed-style loop, train(), bf16 ({repeats} x {epochs} epochs each) ...")
        rows, notes = speed_rows(work, rates, epochs, repeats, threads)
        result.rows += rows
        result.notes += notes
    if fashion is not None:
        log("bf16 accuracy cost on Fashion-2 ...")
        result.extras["bf16_accuracy"] = bf16_accuracy(
            fashion, epochs=2 if quick else TRIAL_EPOCHS, seeds=(0,) if quick else (0, 1, 2)
        )
    log("population training on the 2-D capacity study ...")
    capacity = capacity_config()
    for key, members in (("population", capacity_members(capacity)), ("population_lr", lr_search_members())):
        result.extras[key] = population_speed(
            capacity, members, epochs=100 if quick else None, repeats=1 if quick else 3
        )
    log("study overhead (Optuna + MLflow + reports vs bare training) ...")
    result.extras["study_overhead"] = _overhead(fashion is not None, quick)
    if pruning:
        trials, epochs_ = (6, 3) if quick else (40, TRIAL_EPOCHS)
        log(f"pruning's saving: {trials} trials x {epochs_} epochs without and with the median pruner ...")
        with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
            result.extras["pruning"] = pruning_saving(trials, epochs_, fashion is not None, Path(tmp))
    result.extras["machine"]["load_average_at_end"] = os.getloadavg()[0]
    return result


def pruning_saving(trials: int, epochs: int, fashion: bool, workdir: Path) -> dict[str, Any]:
    """The same TPE study without and with the median pruner: epochs trained, best validation accuracy.

    The two runs are not paired trial by trial (TPE learns from pruned trials, so its suggestions
    part ways); they are what a user running either would get.
    """
    import optuna
    from optuna.trial import TrialState

    from pipeline.config import parse_study
    from pipeline.storage import open_storage
    from pipeline.study import run_study

    out: dict[str, Any] = {"trials": trials, "epochs": epochs}
    for kind in ("none", "median"):
        raw = _study_raw(f"bench-pruner-{kind}", fashion, trials, epochs)
        raw["sampler"] = {"kind": "tpe", "seed": 0}
        raw["pruner"] = {"kind": kind, "warmup_epochs": max(1, epochs // 6)}
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
        done = optuna.load_study(study_name=cfg.name, storage=open_storage(storage)).trials
        ran = sum(int(t.user_attrs.get("epochs_run", 0)) for t in done)
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        out[kind] = {
            "wall_s": wall,
            "epochs_run": ran,
            "fraction_of_full_training": ran / (len(done) * epochs),
            "pruned": sum(t.state == TrialState.PRUNED for t in done),
            "best_val_acc": max((t.value for t in complete), default=math.nan),
        }
    return out


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


def _overhead(fashion: bool, quick: bool) -> dict[str, Any]:
    from pipeline.config import parse_study

    raw = _study_raw("bench-overhead", fashion, trials=3 if quick else 5, epochs=2 if quick else 5)
    raw["sampler"] = {"kind": "random"}
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        return study_overhead(parse_study(raw, "<bench>"), Path(tmp))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


COLUMNS = (
    ("workload", "workload", "{}"),
    ("loop", "loop", "{}"),
    ("threads", "threads", "{}"),
    ("s_per_epoch", "s / epoch (median)", "{:.3f}"),
    ("s_per_epoch_min", "min", "{:.3f}"),
    ("s_per_epoch_max", "max", "{:.3f}"),
    ("s_per_30_epoch_trial", "s / 30-epoch trial", "{:.1f}"),
    ("speedup_vs_seed", "(a) / this", "{:.2f}"),
    ("gflop_s", "GFLOP/s", "{:.0f}"),
    ("of_fp32_matmul", "of fp32 matmul", "{:.0%}"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The speed table as GitHub Markdown."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    """bench.md: the speed table, then matmul rates, population, study overhead, bf16 accuracy."""
    x = result.extras
    m = x["machine"]
    out = [
        "# Training speed",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; load average "
        f"{m['load_average_at_start']:.2f} at start, {m.get('load_average_at_end', math.nan):.2f} at end.",
        f"Matmul ({x['matmul']['n']}^3), the ceiling: fp32 {x['matmul']['fp32_gflop_s']:.0f} GFLOP/s"
        + (
            f" ({x['matmul']['fp32_gflop_s_1_thread']:.0f} on 1 thread)"
            if x["matmul"].get("fp32_gflop_s_1_thread")
            else ""
        )
        + f", bf16 {x['matmul']['bf16_gflop_s']:.0f} GFLOP/s.",
        "",
        format_table(result.rows),
        "",
        "FLOPs per epoch: per training example 2*MACs (forward) + 2*MACs (weight gradients) + "
        "2*(MACs - first layer's MACs) (input gradients); per validation example 2*MACs.",
        "",
    ]
    out += [f"- {note}" for note in result.notes]
    titles = {
        "population": "the capacity study's 8 trials (widths 5-500, tanh and ReLU)",
        "population_lr": "an lr search at one small width (8 rates, 10 tanh units)",
    }
    if any(key in x for key in titles):
        out += ["", "## Population training (2-D data, 200 points, full batch)", ""]
    for key, title in titles.items():
        if key not in x:
            continue
        p = x[key]
        out.append(
            f"- {title}, {p['epochs']} epochs, training only (median of {p['repeats']}): one by one "
            f"{p['one_by_one_s']:.2f} s, as one population {p['population_s']:.2f} s: "
            f"**{p['factor']:.2f}x**. Groups: {'; '.join(', '.join(g) for g in p['groups'])}. "
            f"Largest difference in final val_acc from the one-by-one runs: "
            f"{p['max_val_acc_difference']:.3g}."
        )
    if "study_overhead" in x:
        s = x["study_overhead"]
        out += [
            "",
            "## Study overhead",
            "",
            f"Study {s['study']!r} resumed for {s['trials']} trials x {s['epochs']} epochs: "
            f"{s['wall_s']:.1f} s wall (Optuna journal, MLflow on SQLite, trial reports, study page), "
            f"of which train() {s['train_in_study_s']:.1f} s: **{s['overhead_pct']:.0f} %** overhead, "
            f"{s['overhead_s_per_trial']:.2f} s per trial. The same trials trained again bare (best of "
            f"2): {s['bare_training_s']:.1f} s ({s['overhead_vs_bare_pct']:.0f} % overhead against that). "
            f"The study's first call (1 trial; MLflow creates its store) took {s['first_call_s']:.1f} s.",
        ]
    if "pruning" in x:
        p = x["pruning"]
        out += ["", "## Pruning's saving", ""]
        for kind in ("none", "median"):
            r = p[kind]
            out.append(
                f"- pruner {kind}: {p['trials']} trials x {p['epochs']} epochs, "
                f"{r['fraction_of_full_training']:.0%} of full training's epochs ({r['pruned']} pruned), "
                f"best val_acc {r['best_val_acc']:.4f}, {r['wall_s']:.0f} s"
            )
    if "bf16_accuracy" in x:
        b = x["bf16_accuracy"]
        full, bf16 = b["full"]["test_acc"], b["bf16"]["test_acc"]
        out += [
            "",
            "## bf16 autocast: accuracy cost on Fashion-2",
            "",
            f"{b['epochs']} epochs, seeds {b['seeds']}: test accuracy full {_mean_sd(full)}, "
            f"bf16 {_mean_sd(bf16)}; bf16 - full per seed: "
            f"{', '.join(f'{d:+.4f}' for d in b['test_acc_bf16_minus_full'])}.",
        ]
    return "\n".join(out) + "\n"


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n = {len(values)})"


def write_reports(result: BenchResult, folder: Path, provenance: dict[str, str] | None = None) -> list[Path]:
    """bench.csv (the speed table), bench.md and bench.json, each written to a temp name and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(result.rows[0]) if result.rows else ["workload"])
    writer.writeheader()
    writer.writerows(result.rows)
    blobs = {
        "bench.csv": buffer.getvalue(),
        "bench.md": format_report(result),
        "bench.json": json.dumps(
            {**dataclasses.asdict(result), "provenance": provenance or {}}, indent=2, default=str
        ),
    }
    paths = []
    for name, text in blobs.items():
        paths.append(files.write_text(folder / name, text))
    return paths
