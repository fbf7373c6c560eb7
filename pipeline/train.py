"""Train stage: seeded mini-batch epochs over in-memory tensors with the hand-written update.

Batches are slices of a seeded permutation of the whole split held as one tensor (no per-sample
DataLoader), and the loss is summed on-device so there is one host sync per epoch, not per step.
With ``precision = "bf16"`` the forward pass and loss run under bfloat16 autocast (weights,
gradients and the update stay float32); ``pipeline bench`` measures its speed and accuracy cost.
Training runs on the split's device (``Split.to``); the batch order is drawn on the CPU from a
CPU generator, so CPU and CUDA runs see the same batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.backprop import set_manual_gradients
from pipeline.config import ModelConfig, TrainingConfig
from pipeline.data import Split
from pipeline.optim import ManualSGD
from pipeline.seeds import derive_seed

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Hyper:
    """The searched optimizer settings of one trial."""

    lr: float  # step size
    momentum: float = 0.0  # heavy-ball coefficient in [0, 1)
    weight_decay: float = 0.0  # L2 coefficient added to the gradient


def trial_setup(model: ModelConfig, params: Mapping[str, Any]) -> tuple[ModelConfig, Hyper]:
    """The model and the update a trial's params describe: the one reading of a trial's params.

    A searched ``hidden`` is one hidden layer of that width and a searched ``activation`` replaces
    the file's; ``lr``, ``momentum`` and ``weight_decay`` are always searched (fixed values too).
    """
    shaped = dataclasses.replace(
        model,
        hidden=(params["hidden"],) if "hidden" in params else model.hidden,
        activation=params.get("activation", model.activation),
    )
    return shaped, Hyper(params["lr"], params["momentum"], params["weight_decay"])


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean loss over the epoch's mini-batches (weights moving)
    train_acc: float
    val_loss: float
    val_acc: float

    def metrics(self) -> dict[str, float]:
        return {
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
        }


@dataclass(frozen=True)
class TrainResult:
    history: tuple[EpochRecord, ...]
    seconds: float
    diverged_at: int | None = None  # epoch whose loss was not finite
    stopped_at: int | None = None  # epoch after which the callback asked to stop (pruning)

    @property
    def outcome(self) -> str:
        if self.diverged_at is not None:
            return f"diverged: non-finite loss at epoch {self.diverged_at}"
        if self.stopped_at is not None:
            return f"stopped after epoch {self.stopped_at}"
        return "completed"

    @property
    def best_val_acc(self) -> float:
        finite = [r.val_acc for r in self.history if math.isfinite(r.val_acc)]
        return max(finite, default=float("nan"))


def loss_fn(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, or mean squared error against one-hot targets (the report's MSE)."""
    if name == "ce":
        return F.cross_entropy(logits, y)
    return F.mse_loss(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype))


@torch.inference_mode()
def loss_and_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce", chunk: int = 8192
) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, evaluated in chunks to bound memory."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        yb = y[start : start + chunk]
        total += loss_fn(loss, logits, yb).double() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
    return total.item() / len(x), correct.item() / len(x)


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """The context for one forward pass and loss: bf16 autocast on ``device_type`` ("cpu",
    "cuda"), or nothing for full precision."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Below this many multiply-accumulates per step, training runs on one intra-op thread.
SMALL_STEP_MACS = 1 << 22


@contextlib.contextmanager
def step_threads(macs_per_step: int) -> Iterator[None]:
    """One intra-op thread for small steps (torch's setting restored afterwards), else torch's.

    A second OpenMP thread gains a small op less than the fork/join costs, and when another
    process holds the other core every parallel op waits for it: measured on 2 busy cores, a
    2-16-8-2 MLP trained 10-100x slower on 2 threads than on 1. Large steps (CIFAR-2's MLP at
    batch 256: 4e8 MACs) keep every thread.
    """
    before = torch.get_num_threads()
    if macs_per_step >= SMALL_STEP_MACS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def step_macs(model: torch.nn.Module, batch: int) -> int:
    """Multiply-accumulates of one forward pass of ``model``'s linear layers over ``batch`` examples."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return batch * sum(m.in_features * m.out_features for m in linears)


def batch_order_seed(seed: int) -> int:
    """The batch-order stream of training seed ``seed``: separate from the initialisation's, and
    shared by ``train`` and stacked (population) training, so both draw the same batches."""
    return derive_seed(seed, "batch-order")


def replicate_seeds(config: TrainingConfig) -> list[int]:
    """The training seed of each of a trial's ``config.seeds`` replicates.

    One replicate trains from ``training.seed`` itself (the numbers of a study without the key);
    K > 1 replicates use ``derive_seed(training.seed, "replicate", i)`` for i = 0..K-1, each
    seeding its network's initialisation and its batch order. The data split is shared.
    """
    if config.seeds == 1:
        return [config.seed]
    return [derive_seed(config.seed, "replicate", i) for i in range(config.seeds)]


def batches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, batch: int):
    """Mini-batches as slices of ``order`` (a permutation), or of the data itself when None."""
    for start in range(0, len(x), batch):
        if order is None:
            yield x[start : start + batch], y[start : start + batch]
        else:
            idx = order[start : start + batch]
            yield x.index_select(0, idx), y.index_select(0, idx)


def train(
    model: torch.nn.Module,
    split: Split,
    hyper: Hyper,
    config: TrainingConfig,
    on_epoch: Callable[[EpochRecord], bool | None] | None = None,
) -> TrainResult:
    """Train ``model`` in place; ``on_epoch`` sees every epoch and may return True to stop."""
    with step_threads(step_macs(model, config.batch_size or len(split.y_train))):
        return _train(model, split, hyper, config, on_epoch)


def _train(model, split, hyper, config, on_epoch) -> TrainResult:
    dtype, device = DTYPES[config.dtype], split.x_train.device
    model.to(device=device, dtype=dtype)
    x, y = split.x_train.to(dtype), split.y_train
    x_val, y_val = split.x_val.to(dtype), split.y_val
    n = len(x)
    batch = config.batch_size or n
    order_gen = torch.Generator().manual_seed(batch_order_seed(config.seed))  # a CPU stream on every device
    optimizer = ManualSGD(model.parameters(), hyper.lr, hyper.momentum, hyper.weight_decay)
    history: list[EpochRecord] = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=order_gen).to(device) if config.shuffle else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for xb, yb in batches(x, y, order, batch):
            optimizer.zero_grad()
            if config.backward == "manual":
                loss, logits = set_manual_gradients(model, xb, yb, config.loss)
            else:
                with autocast(config.precision, device.type):
                    logits = model(xb)
                    loss = loss_fn(config.loss, logits, yb)
                loss.backward()
            optimizer.step()
            loss_sum.add_(loss.detach(), alpha=len(yb))  # float64 sum of loss * batch size
            correct += (logits.detach().argmax(1) == yb).sum()
        train_loss = loss_sum.item() / n  # the one host sync of the epoch
        model.eval()
        if not math.isfinite(train_loss):
            nan = float("nan")
            history.append(EpochRecord(epoch, train_loss, correct.item() / n, nan, nan))
            return TrainResult(tuple(history), time.perf_counter() - started, diverged_at=epoch)
        val_loss, val_acc = loss_and_accuracy(model, x_val, y_val, config.loss)
        record = EpochRecord(epoch, train_loss, correct.item() / n, val_loss, val_acc)
        history.append(record)
        if not math.isfinite(val_loss):
            return TrainResult(tuple(history), time.perf_counter() - started, diverged_at=epoch)
        if on_epoch is not None and on_epoch(record):
            return TrainResult(tuple(history), time.perf_counter() - started, stopped_at=epoch)
    return TrainResult(tuple(history), time.perf_counter() - started)
