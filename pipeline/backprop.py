"""Backward stage: the MLP's gradients by a hand-written, vectorized backpropagation.

Autograd could do this in one call; the backward pass is written out layer by layer on purpose,
because showing it (and checking it against autograd and finite differences) is what the product
exists for. Everything runs under ``torch.no_grad()``: no graph is built, nothing is mutated
except ``p.grad`` in ``set_manual_gradients``.

For a net with layers l = 1..L, a_0 = x, z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l) (l < L) and
logits = z_L, the reverse sweep is

    dz_L = dL/dlogits
    dL/dW_l = dz_l^T a_{l-1}        (the per-example outer products, summed over the batch)
    dL/db_l = sum over the batch of dz_l
    dz_{l-1} = (dz_l W_l) * act'(z_{l-1})     relu: [z > 0],  tanh: 1 - tanh(z)^2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import MLP

LOSSES = ("ce", "mse")


@dataclass(frozen=True)
class ManualBackward:
    """One hand-written forward + backward pass over a batch."""

    loss: torch.Tensor  # 0-d, the mean loss over the batch (model dtype)
    logits: torch.Tensor  # (batch, classes), the forward pass's output
    gradients: tuple[torch.Tensor, ...]  # aligned with model.parameters(): W1, b1, W2, b2, ...


def _forward(model: MLP, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's input a_{l-1} (what dL/dW_l needs) and the logits."""
    inputs: list[torch.Tensor] = []
    a = x
    *hidden, last = model.linears
    for layer in hidden:
        inputs.append(a)
        z = torch.addmm(layer.bias, a, layer.weight.t())
        a = torch.relu(z) if model.activation == "relu" else torch.tanh(z)
    inputs.append(a)
    return inputs, torch.addmm(last.bias, a, last.weight.t())


def _activation_derivative(activation: str, a: torch.Tensor) -> torch.Tensor:
    """act'(z) written in terms of a = act(z): relu [a > 0] (same as [z > 0]), tanh 1 - a^2."""
    if activation == "relu":
        return (a > 0).to(a.dtype)
    return 1 - a * a


def _loss_and_logit_gradient(
    logits: torch.Tensor, y: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss and dL/dlogits, without autograd.

    ce: log-softmax with the row max subtracted (no overflow), gradient (softmax - onehot) / N.
    mse: mean over all N * C elements of (logits - onehot)^2, gradient 2 (logits - onehot) / (N C).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    n, classes = logits.shape
    onehot = torch.zeros_like(logits).scatter_(1, y.view(-1, 1), 1.0)
    if loss == "ce":
        shifted = logits - logits.max(dim=1, keepdim=True).values
        log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
        value = -(log_probs * onehot).sum() / n
        return value, (log_probs.exp() - onehot) / n
    diff = logits - onehot
    return (diff * diff).sum() / (n * classes), diff * (2 / (n * classes))


@torch.no_grad()
def manual_loss_and_gradients(
    model: MLP, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> ManualBackward:
    """Loss, logits and every parameter's gradient of the batch mean loss, by hand.

    ``y`` holds integer class labels; ``loss`` is "ce" (like F.cross_entropy) or "mse" (like
    F.mse_loss against one-hot targets), both averaged as PyTorch's reduction="mean" does.
    """
    inputs, logits = _forward(model, x)
    value, dz = _loss_and_logit_gradient(logits, y, loss)
    reversed_grads: list[torch.Tensor] = []
    for index in range(len(model.linears) - 1, -1, -1):
        layer = model.linears[index]
        reversed_grads.append(dz.sum(dim=0))  # dL/db
        reversed_grads.append(dz.t() @ inputs[index])  # dL/dW: outer products summed over batch
        if index > 0:
            a_prev = inputs[index]  # = act(z_{index}) of the layer below
            dz = (dz @ layer.weight) * _activation_derivative(model.activation, a_prev)
    return ManualBackward(value, logits, tuple(reversed(reversed_grads)))


def manual_gradients(
    model: MLP, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> tuple[torch.Tensor, ...]:
    """Gradients of the batch mean loss aligned with ``model.parameters()`` (W1, b1, W2, ...)."""
    return manual_loss_and_gradients(model, x, y, loss).gradients


@torch.no_grad()
def set_manual_gradients(
    model: MLP, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the hand-written gradients into each ``p.grad``; return ``(loss, logits)``.

    The trainer calls this instead of ``loss.backward()`` so an optimizer's ``step()`` uses them.
    Unlike ``backward()`` it overwrites ``p.grad`` rather than accumulating into it.
    """
    result = manual_loss_and_gradients(model, x, y, loss)
    for p, g in zip(model.parameters(), result.gradients, strict=True):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)
    return result.loss, result.logits
