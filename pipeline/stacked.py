"""Stacked training: K MLPs trained together, similar ones as one batched computation.

Each layer's weights are stacked as [K, in, out] and applied with one batched matmul
(``torch.baddbmm``); lr, momentum and weight_decay are per-member tensors in the same hand-written
update as ``pipeline.optim.ManualSGD``. Every member sees the batches ``pipeline.train.train``
draws from ``training.seed`` (the trials of a study share it, so they share the order) and starts
from its own model's weights, so in float64 the population ends where K separate ``train`` calls
end, to round-off (tests/study/test_population.py).

Members of one activation are stacked in groups (``plan_groups``), trained one group after
another; within a group, narrower members are zero-padded to the widest: a padded unit has zero
weights in and out, so its output and every gradient that reaches it are exactly zero, and it
stays zero. A group's size is capped so its activations stay in cache (``CPU_GROUP_ELEMENTS``,
``MAX_PADDING``; ``group_limit=None`` lifts both): on this CPU that batches tiny models (the 2-D
studies) and leaves wide ones (CIFAR-2) one per group. On a GPU the default (``"auto"``) sets no
cap: one group per activation.
A member that diverges, or whose callback asks to stop (pruning), is written back to its model
and dropped from its group; the others go on.

Everything runs on the split's device (the members are moved there); the batch orders are drawn
on the CPU from CPU generators, as ``train`` draws them, and moved to the device.

The Optuna side, asking K trials and telling each its outcome, is ``pipeline.study.population``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import TrainingConfig
from pipeline.data import Split
from pipeline.model import MLP
from pipeline.train import (
    DTYPES,
    EpochRecord,
    Hyper,
    TrainResult,
    autocast,
    batch_order_seed,
    batches,
    loss_fn,
    step_macs,
    step_threads,
)

Callback = Callable[[EpochRecord], bool | None]
SetCallback = Callable[[list[EpochRecord]], bool | None]  # one epoch of every member of a set


# On CPU a group holds at most this many hidden activations per layer (members x batch x width).
# Measured here: past about 2**17 floats (512 KB, a core's share of L2) the batched elementwise
# ops and the skinny batched matmuls (an output width of 2) run slower per member than one model
# at a time, so wide members train in smaller groups (down to one) while tiny ones share a group.
CPU_GROUP_ELEMENTS = 1 << 17


# Nor is a member padded to more than this many times its own width: the padded units' elementwise
# work is real work (tanh costs about 6 ns per element here), so 5 and 500 units share no group.
MAX_PADDING = 4


def group_limit_for(device: torch.device) -> int | None:
    """The default group cap: ``CPU_GROUP_ELEMENTS`` on the CPU (cache-bound), none on a GPU, where
    one batched computation over every member is what fills the device."""
    return CPU_GROUP_ELEMENTS if device.type == "cpu" else None


class StackedMLP:
    """One group's parameters: per layer ``W`` [K, in, out] and ``b`` [K, 1, out], zero-padded."""

    def __init__(self, models: Sequence[MLP], dtype: torch.dtype) -> None:
        shapes = {(len(m.linears), m.linears[0].in_features, m.linears[-1].out_features) for m in models}
        activations = {m.activation for m in models}
        if len(shapes) != 1 or len(activations) != 1:
            raise ValueError(
                f"a stacked group needs one depth, input size, output size and activation; got "
                f"{sorted(shapes)} and {sorted(activations)}"
            )
        depth, k = len(models[0].linears), len(models)
        outs = [max(m.linears[i].out_features for m in models) for i in range(depth)]
        ins = [models[0].linears[0].in_features, *outs[:-1]]
        self.activation = activations.pop()
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        device = models[0].linears[0].weight.device  # the members' device (train_sets moved them)
        with torch.no_grad():
            for i in range(depth):
                w = torch.zeros(k, ins[i], outs[i], dtype=dtype, device=device)
                b = torch.zeros(k, 1, outs[i], dtype=dtype, device=device)
                for j, model in enumerate(models):
                    layer = model.linears[i]
                    w[j, : layer.in_features, : layer.out_features] = layer.weight.T
                    b[j, 0, : layer.out_features] = layer.bias
                self.weights.append(w.requires_grad_())
                self.biases.append(b.requires_grad_())

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.weights, self.biases, strict=True) for t in pair]

    def __len__(self) -> int:
        return len(self.weights[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, out] of every member on the shared batch ``x`` [B, in], or on its own
        batch ``x[k]`` when ``x`` is [K, B, in]."""
        act = torch.relu if self.activation == "relu" else torch.tanh  # = nn.ReLU / nn.Tanh
        single = len(self) == 1  # plain matmuls: on CPU faster than a batch of one
        if x.dim() == 3:  # per-member batches [K, B, in] (members with their own batch order)
            h = x.squeeze(0) if single else x
        else:
            h = x if single else x.expand(len(self), *x.shape)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.addmm(b.squeeze(0), h, w.squeeze(0)) if single else torch.baddbmm(b, h, w)
            if i < last:
                h = act(h)
        return h.unsqueeze(0) if single else h

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every member not in ``rows`` (indices into the current stacks)."""
        with torch.no_grad():
            self.weights = [w.index_select(0, rows).requires_grad_() for w in self.weights]
            self.biases = [b.index_select(0, rows).requires_grad_() for b in self.biases]

    @torch.no_grad()
    def export(self, row: int, model: MLP) -> None:
        """Copy member ``row``'s weights (without the padding) into ``model``."""
        for layer, w, b in zip(model.linears, self.weights, self.biases, strict=True):
            layer.weight.copy_(w[row, : layer.in_features, : layer.out_features].T)
            layer.bias.copy_(b[row, 0, : layer.out_features])


class StackedSGD:
    """``ManualSGD``'s hand-written rule on stacked parameters, one lr/momentum/decay per member.

    For member k (dim 0 of every tensor):
        g   = grad + weight_decay[k] * p
        buf = g                        on the first step
        buf = momentum[k] * buf + g    afterwards
        p   = p - lr[k] * buf
    With momentum 0 (or decay 0) a member's extra terms are exact zeros, so it gets ManualSGD's
    arithmetic up to the rounding of a fused multiply-add; where every member has momentum 0 (or
    decay 0) the line is skipped, as ManualSGD skips it. Each line is one ``torch._foreach_*``
    call over all tensors (per-member values broadcast over each tensor).
    """

    def __init__(self, params: list[torch.Tensor], hypers: Sequence[Hyper]) -> None:
        for h in hypers:
            if h.lr <= 0 or not 0 <= h.momentum < 1 or h.weight_decay < 0:
                raise ValueError(f"{h}: need lr > 0, momentum in [0, 1), weight_decay >= 0")
        on = {"dtype": params[0].dtype, "device": params[0].device}
        self.neg_lr = torch.tensor([-h.lr for h in hypers], **on)
        self.momentum = torch.tensor([h.momentum for h in hypers], **on)
        self.weight_decay = torch.tensor([h.weight_decay for h in hypers], **on)
        self.buffers: list[torch.Tensor] | None = None
        self._bind(params)

    def _bind(self, params: list[torch.Tensor]) -> None:
        self.params = params
        shapes = [(-1,) + (1,) * (p.dim() - 1) for p in params]  # one value per member
        self._neg_lr = [self.neg_lr.view(s) for s in shapes]
        self._momentum = [self.momentum.view(s) for s in shapes]
        self._weight_decay = [self.weight_decay.view(s) for s in shapes]
        self._decay, self._heavy_ball = bool(self.weight_decay.any()), bool(self.momentum.any())

    @torch.no_grad()
    def step(self) -> None:
        g = [p.grad for p in self.params]
        if self._decay:
            g = torch._foreach_addcmul(g, self.params, self._weight_decay)  # grad + wd * p
        if self._heavy_ball:
            if self.buffers is None:
                self.buffers = [t.clone() for t in g] if not self._decay else g  # first step: buf = g
            else:
                torch._foreach_mul_(self.buffers, self._momentum)
                torch._foreach_add_(self.buffers, g)  # momentum * buf + g
            g = self.buffers
        torch._foreach_addcmul_(self.params, g, self._neg_lr)  # p - lr * buf

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def keep(self, rows: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Follow ``StackedMLP.keep``: the surviving members' tensors, hyperparameters and buffers."""
        self.neg_lr, self.momentum, self.weight_decay = (
            t.index_select(0, rows) for t in (self.neg_lr, self.momentum, self.weight_decay)
        )
        if self.buffers is not None:
            self.buffers = [b.index_select(0, rows) for b in self.buffers]
        self._bind(params)


def member_losses(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean loss [K] on one batch (``pipeline.train.loss_fn`` per member); ``y`` is
    the shared labels [B] or each member's own [K, B]."""
    k, n, classes = logits.shape
    if name == "ce":
        target = y.reshape(-1) if y.dim() == 2 else (y if k == 1 else y.repeat(k))
        flat = F.cross_entropy(logits.reshape(k * n, classes), target, reduction="none")
        return flat.view(k, n).mean(1)
    target = F.one_hot(y, classes).to(logits.dtype).expand_as(logits)
    return F.mse_loss(logits, target, reduction="none").mean((1, 2))


def plan_groups(
    models: Sequence[MLP],
    batch: int,
    limit: int | None = CPU_GROUP_ELEMENTS,
    sets: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Which members train stacked together: one activation per group, at most ``limit`` hidden
    activations (members x ``batch`` x widest layer) per group, and no member padded to more than
    ``MAX_PADDING`` times its own width. ``limit=None``: one group per activation.

    ``sets`` (default: each member alone) are members that must train in one group, in lockstep:
    a trial's seed replicates, which the pruner judges by their mean curve. A set that alone
    exceeds ``limit`` gets a group of its own.
    """
    sets = [list(s) for s in sets] if sets is not None else [[i] for i in range(len(models))]
    for members in sets:
        if len({models[i].activation for i in members}) != 1:
            raise ValueError(f"members {members} of one set need one activation")

    def width(s: int) -> int:
        return max(max((layer.out_features for layer in models[i].linears[:-1]), default=1) for i in sets[s])

    def activation(s: int) -> str:
        return models[sets[s][0]].activation

    groups: list[list[int]] = []  # lists of set indices
    for s in sorted(range(len(sets)), key=lambda s: (activation(s), width(s))):
        group = groups[-1] if groups else None
        size = sum(len(sets[g]) for g in group) + len(sets[s]) if group else 0
        if (
            group is not None
            and activation(group[0]) == activation(s)
            and (
                limit is None
                or (size * batch * width(s) <= limit and width(s) <= MAX_PADDING * width(group[0]))
            )
        ):
            group.append(s)
        else:
            groups.append([s])
    return [[i for s in group for i in sets[s]] for group in groups]


def member_batches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, batch: int):
    """``train.batches`` for a group: shared slices, or each member's own when ``order`` is [K, n]."""
    if order is None or order.dim() == 1:
        yield from batches(x, y, order, batch)
        return
    k = len(order)
    for start in range(0, len(x), batch):
        idx = order[:, start : start + batch].reshape(-1)
        yield x.index_select(0, idx).view(k, -1, x.shape[1]), y.index_select(0, idx).view(k, -1)


class _Group:
    """Members trained as one batched computation, with their model indices."""

    def __init__(
        self, members: list[int], models: Sequence[MLP], hypers: Sequence[Hyper], seeds: Sequence[int], dtype
    ) -> None:
        self.members = members
        self.stack = StackedMLP([models[i] for i in members], dtype)
        self.optimizer = StackedSGD(self.stack.parameters, [hypers[i] for i in members])
        # train()'s batch order for each member's seed: one stream when the members share a seed
        # (a population's trials), one per member otherwise (a trial's replicates)
        streams = [seeds[i] for i in members]
        if len(set(streams)) == 1:
            streams = streams[:1]
        self.generators = [torch.Generator().manual_seed(batch_order_seed(s)) for s in streams]

    def orders(self, n: int, shuffle: bool, device: torch.device) -> torch.Tensor | None:
        """This epoch's permutation: [n] shared, [K, n] one per member, or None (no shuffling);
        drawn on the CPU (the generators are CPU ones), returned on ``device``."""
        if not shuffle:
            return None
        if len(self.generators) == 1:
            return torch.randperm(n, generator=self.generators[0]).to(device)
        return torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(device)

    def epoch(self, x, y, order, batch: int, config: TrainingConfig) -> tuple[list[float], list[float]]:
        """One epoch of steps; every member's mean training loss and accuracy."""
        n = len(x)
        loss_sum = torch.zeros(len(self.members), dtype=torch.float64, device=x.device)
        correct = torch.zeros(len(self.members), dtype=torch.long, device=x.device)
        for xb, yb in member_batches(x, y, order, batch):
            self.optimizer.zero_grad()
            with autocast(config.precision, x.device.type):
                logits = self.stack.forward(xb)
                if len(self.members) == 1:  # one member: its plain loss, no batched bookkeeping
                    total = loss_fn(config.loss, logits.squeeze(0), yb)
                    losses = total.detach().unsqueeze(0)
                else:
                    losses = member_losses(config.loss, logits, yb)
                    total = losses.sum()  # members share no parameter: each gets its own gradient
            total.backward()
            self.optimizer.step()
            loss_sum.add_(losses.detach(), alpha=yb.shape[-1])
            correct += (logits.detach().argmax(2) == yb).sum(1)
        return [s / n for s in loss_sum.tolist()], [c / n for c in correct.tolist()]

    @torch.inference_mode()
    def evaluate(self, x, y, loss: str, chunk: int = 8192) -> tuple[list[float], list[float]]:
        """Every member's mean loss and accuracy over a split (``train.loss_and_accuracy``)."""
        total = torch.zeros(len(self.members), dtype=torch.float64, device=x.device)
        correct = torch.zeros(len(self.members), dtype=torch.long, device=x.device)
        for start in range(0, len(x), chunk):
            logits = self.stack.forward(x[start : start + chunk])
            yb = y[start : start + chunk]
            total += member_losses(loss, logits, yb).double() * len(yb)
            correct += (logits.argmax(2) == yb).sum(1)
        return [t / len(x) for t in total.tolist()], [c / len(x) for c in correct.tolist()]

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.members = []
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.stack.weights[0].device)
        self.stack.keep(index)
        self.optimizer.keep(index, self.stack.parameters)
        self.members = [self.members[r] for r in rows]
        if len(self.generators) > 1:
            self.generators = [self.generators[r] for r in rows]


def train_population(
    models: Sequence[MLP],
    split: Split,
    hypers: Sequence[Hyper],
    config: TrainingConfig,
    on_epoch: Sequence[Callback | None] | None = None,
    group_limit: int | None | str = "auto",
    seeds: Sequence[int] | None = None,
) -> list[TrainResult]:
    """Train every model in place; one result per model, as ``train`` would give it.

    Members are stacked in groups (``plan_groups``); each group is one batched computation over
    train()'s batches, and the groups run one after another (each keeps its working set in cache).
    ``on_epoch[k]`` sees model k's epochs and may return True to stop that member alone. A
    result's ``seconds`` is the wall time of its group's run until that member finished.
    ``seeds[k]``: the training seed whose batch order member k draws (default ``config.seed``).
    """
    k = len(models)
    on_epoch = list(on_epoch) if on_epoch is not None else [None] * k
    if len(on_epoch) != k:
        raise ValueError(f"{k} models need as many callbacks, got {len(on_epoch)}")
    callbacks = [None if cb is None else _single(cb) for cb in on_epoch]
    return train_sets(models, split, hypers, config, [[i] for i in range(k)], callbacks, group_limit, seeds)


def _single(callback: Callback) -> SetCallback:
    return lambda records: callback(records[0])


def train_sets(
    models: Sequence[MLP],
    split: Split,
    hypers: Sequence[Hyper],
    config: TrainingConfig,
    sets: Sequence[Sequence[int]],
    on_epoch: Sequence[SetCallback | None] | None = None,
    group_limit: int | None | str = "auto",
    seeds: Sequence[int] | None = None,
) -> list[TrainResult]:
    """``train_population`` over sets of members that train in lockstep and stop together.

    A set is a trial's seed replicates: its members share one group, ``on_epoch[s]`` sees the
    records of all of set s's members for an epoch (in set order) and may return True to stop
    the set; a member that diverges stops its set too (it gets ``diverged_at``, the others
    ``stopped_at``). In float64 each member ends where a separate ``train`` with its own seed
    (``seeds[k]``: initialisation via its model, batch order here) ends, to round-off.
    """
    k = len(models)
    seeds = list(seeds) if seeds is not None else [config.seed] * k
    on_epoch = list(on_epoch) if on_epoch is not None else [None] * len(sets)
    members = sorted(i for s in sets for i in s)
    if (
        not k
        or len(hypers) != k
        or len(seeds) != k
        or members != list(range(k))
        or len(on_epoch) != len(sets)
    ):
        raise ValueError(
            f"{k} models need as many hypers and seeds, sets that hold each model once and one "
            f"callback per set; got {len(hypers)} hypers, {len(seeds)} seeds, sets {list(sets)}, "
            f"{len(on_epoch)} callbacks"
        )
    dtype, device = DTYPES[config.dtype], split.x_train.device
    limit = group_limit_for(device) if group_limit == "auto" else group_limit  # "auto": by the device
    for model in models:
        model.to(device=device, dtype=dtype)
    data = (split.x_train.to(dtype), split.y_train, split.x_val.to(dtype), split.y_val)
    batch = config.batch_size or len(split.y_train)
    set_of = {i: n for n, s in enumerate(sets) for i in s}
    results: list[TrainResult | None] = [None] * k
    for group_members in plan_groups(models, batch, limit, sets):  # type: ignore[arg-type]
        group = _Group(group_members, models, hypers, seeds, dtype)
        inside = sorted({set_of[i] for i in group_members})
        with step_threads(sum(step_macs(models[i], batch) for i in group_members)):
            for member, result in _train_group(group, models, config, sets, inside, on_epoch, data).items():
                results[member] = result
    return results  # type: ignore[return-value]


def _train_group(group: _Group, models, config, sets, inside, on_epoch, data) -> dict[int, TrainResult]:
    """``train``'s epochs for one group: the same batch orders, per-member records and outcomes."""
    x, y, x_val, y_val = data
    n = len(x)
    batch = config.batch_size or n
    histories: dict[int, list[EpochRecord]] = {member: [] for member in group.members}
    results: dict[int, TrainResult] = {}
    live = list(inside)  # the sets still training
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        train_loss, train_acc = group.epoch(x, y, group.orders(n, config.shuffle, x.device), batch, config)
        val_loss, val_acc = group.evaluate(x_val, y_val, config.loss)
        diverged = set()
        for row, member in enumerate(group.members):
            if not math.isfinite(train_loss[row]):
                record = EpochRecord(epoch, train_loss[row], train_acc[row], math.nan, math.nan)
                diverged.add(member)
            else:
                record = EpochRecord(epoch, train_loss[row], train_acc[row], val_loss[row], val_acc[row])
                if not math.isfinite(val_loss[row]):
                    diverged.add(member)
            histories[member].append(record)
        outcomes: dict[int, dict[str, Any]] = {}
        for s in live:
            if diverged.intersection(sets[s]):
                for member in sets[s]:
                    outcomes[member] = {"diverged_at" if member in diverged else "stopped_at": epoch}
            elif on_epoch[s] is not None and on_epoch[s]([histories[member][-1] for member in sets[s]]):
                outcomes.update({member: {"stopped_at": epoch} for member in sets[s]})
        keep = []
        for row, member in enumerate(group.members):
            if member in outcomes or epoch == config.epochs:
                group.stack.export(row, models[member])
                results[member] = TrainResult(
                    tuple(histories[member]), time.perf_counter() - started, **outcomes.get(member, {})
                )
            else:
                keep.append(row)
        if not keep:
            break
        live = [s for s in live if sets[s][0] not in outcomes]
        if len(keep) < len(group.members):
            group.keep(keep)
    return results
