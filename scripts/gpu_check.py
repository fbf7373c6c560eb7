"""``make gpu-check``: the CPU oracles rerun on the GPU, then what the GPU buys, in trials per second.

Without a CUDA device it says so and exits 0. With one it checks, on the device in float64:
  1. ``ManualSGD`` (the hand-written update) against ``torch.optim.SGD``, to 1e-12;
  2. ``pipeline.stacked.train_population`` against separate ``train()`` runs, to 1e-12;
then times trials per second for one-by-one training against populations of 8 and 64 on the
Fashion-2 shape (784-512-128-32-2, random data of Fashion-2's size, so no files are needed), 30
epochs unless that would take the script past ``--budget`` seconds (then fewer, said in the
report), and writes ``reports/bench/gpu.md``. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from pipeline import files, tracking
from pipeline.config import TrainingConfig
from pipeline.data import Split
from pipeline.device import resolve, set_precision
from pipeline.model import build_mlp
from pipeline.optim import ManualSGD
from pipeline.stacked import train_population
from pipeline.train import Hyper, train

FASHION2 = {"train": 9600, "val": 2400, "test": 2000, "dim": 784}  # two Fashion-MNIST classes
HIDDEN = (512, 128, 32)  # 784-512-128-32-2
TOL = 1e-12


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per timed trial (at most)")
    parser.add_argument("--budget", type=float, default=240, help="seconds the timings may take")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/gpu.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = resolve("cuda")
    set_precision("full")
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
    epochs = max(1, min(args.epochs, int(args.budget / per_epoch)))
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
        + ("" if epochs == args.epochs else f" (scaled down from {args.epochs} to fit {args.budget:g} s)")
        + ":",
        "",
        "| training | trials | trials/s | vs one by one |",
        "|---|---|---|---|",
        *(f"| {name} | {k} | {rate:.2f} | {speedup:.1f}x |" for name, k, rate, speedup in rows),
        "",
    ]
    files.write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(diff <= TOL for _, diff in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
