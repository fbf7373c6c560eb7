"""The training loops timed side by side (the seed-style DataLoader loop, ``train()``, bf16) and the
machine's matmul rate they are measured against."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from pipeline.config import DatasetConfig, TrainingConfig
from pipeline.data import DataError, Split, load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.optim import ManualSGD
from pipeline.train import Hyper, batch_order_seed, train

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


class SeedStyleDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 / FashionMNIST do per item: uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor) -> None:

        channels = 1 if images.ndim == 3 else images.shape[-1]
        self.images, self.labels = images, labels.tolist()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class EpochPermutation(torch.utils.data.Sampler):
    """``torch.randperm(n)`` from one seeded generator each epoch: the order ``train()`` draws.

    (``RandomSampler`` draws a second, unused permutation per epoch, so it would drift from it.)
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(batch_order_seed(seed))

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


def bf16_accuracy(work: Workload, epochs: int, seeds: Sequence[int]) -> dict[str, Any]:
    """Validation and test accuracy after training in full precision and under bf16, per seed."""

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
