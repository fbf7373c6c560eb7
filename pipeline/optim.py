"""Optimizer stage: SGD with momentum and L2 weight decay, written out by hand.

The rule (PyTorch's SGD with dampening = 0, nesterov = False):
    g   = p.grad + weight_decay * p
    buf = g                     on the first step
    buf = momentum * buf + g    afterwards
    p   = p - lr * buf
It is written with in-place ops so no temporary the size of a weight matrix is allocated per step
beyond ``g`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ManualSGD:
    """``torch.optim.SGD``'s momentum/weight-decay update, hand-written, same interface."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = torch.add(g, p, alpha=self.weight_decay)  # g = grad + wd * p (new tensor)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = g.clone() if g is p.grad else g
                else:
                    buf.mul_(self.momentum).add_(g)  # buf = momentum * buf + g
                g = buf
            p.add_(g, alpha=-self.lr)  # p = p - lr * buf

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
