"""Model stage: a plain multilayer perceptron whose layers the hand-written backprop can read."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.errors import UsageError

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


class WeightsError(UsageError, RuntimeError):
    """A ``model.pt`` that is not a plain state dict of tensors: refused, never unpickled."""


def load_weights(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A trial's ``model.pt`` as a state dict (into ``model`` too, if given), tensors only.

    ``weights_only=True``: a file that holds anything but tensors and plain containers is refused
    instead of unpickled, so a tampered artifact cannot run code.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: refused, not a plain state dict of tensors ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    if model is not None:
        model.load_state_dict(state)
    return state


def network_from_state(hidden: Sequence[int], activation: str, state: dict[str, torch.Tensor]) -> MLP:
    """The MLP of these hidden widths holding ``state`` (input and output widths, dtype from the
    weights), in eval mode."""
    first, last = state["linears.0.weight"], state[f"linears.{len(hidden)}.weight"]
    model = MLP(first.shape[1], hidden, last.shape[0], activation, dtype=first.dtype)
    model.load_state_dict(state)
    return model.eval()
