"""Model stage: a plain multilayer perceptron whose layers the hand-written backprop can read."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Linear layers with one activation between them; the last layer gives raw logits.

    ``linears`` and ``activation`` are public so ``pipeline.backprop`` can walk the layers
    without autograd.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int = 2,
        activation: str = "relu",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        widths = [in_features, *hidden, out_features]
        self.activation = activation
        self.linears = nn.ModuleList(
            nn.Linear(a, b, dtype=dtype) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self._act = ACTIVATIONS[activation]()
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """nn.Linear's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) drawn from ``generator``."""
        for layer in self.linears:
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.linears
        for layer in hidden:
            x = self._act(layer(x))
        return last(x)


def build_mlp(
    in_features: int,
    hidden: Sequence[int],
    activation: str,
    seed: int,
    out_features: int = 2,
    dtype: torch.dtype = torch.float32,
) -> MLP:
    """An MLP whose initial weights depend only on ``seed`` (not on torch's global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return MLP(in_features, hidden, out_features, activation, generator=generator, dtype=dtype)
