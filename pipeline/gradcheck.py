"""Gradient check: directional finite differences against the hand-written and autograd gradients.

For each parameter tensor w, a seeded random unit direction u and the symmetric difference

    g(eps) = (L(w + eps u) - L(w - eps u)) / (2 eps),   error(eps) = |g(eps) - <grad L, u>|

which is O(eps^2) when the gradient is right (and stays put as eps shrinks when it is wrong).
The backward pass under test is the hand-written one in ``pipeline.backprop`` (written by hand on
purpose); autograd's error is reported beside it as the reference.

Round-off: an L evaluated in floating point is off by about machine_eps * |L|, so g(eps) carries
about machine_eps * |L| / eps of noise. A row stores that estimate as ``roundoff``; an error below
ROUNDOFF_MARGIN times it says nothing about the gradient and is left out of the order fit.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pipeline.backprop import manual_gradients
from pipeline.files import save_figure, write_text
from pipeline.model import MLP

ROUNDOFF_MARGIN = 10.0  # an error within this factor of the round-off estimate is noise


@dataclass(frozen=True)
class GradcheckRow:
    """One parameter tensor at one eps and dtype."""

    name: str  # the lab's name: W1, b1, W2, b2, ... (layer index from 1)
    param: str  # torch's name: linears.0.weight, ...
    dtype: str  # float32 | float64
    eps: float
    finite_difference: float  # g(eps)
    directional_manual: float  # <manual gradient, u>
    directional_autograd: float  # <autograd gradient, u>
    error_manual: float  # |g(eps) - <manual gradient, u>|
    error_autograd: float  # |g(eps) - <autograd gradient, u>|
    roundoff: float  # machine_eps(dtype) * |L| / eps: the error floor from rounding alone


@dataclass(frozen=True)
class GradcheckResult:
    """Every row of one check plus the fitted orders; the float64 maxima decide pass/fail."""

    rows: tuple[GradcheckRow, ...]
    order: Mapping[str, float]  # per parameter: slope of log error_manual vs log eps, float32
    order64: Mapping[str, float]  # the same over the float64 rows (nan with fewer than 2 eps)
    loss: str
    seed: int
    examples: int  # how many data points L averaged over

    @property
    def max_error64(self) -> float:
        """The largest float64 error (manual or autograd); nan when no float64 eps was run."""
        errors = [max(r.error_manual, r.error_autograd) for r in self.rows if r.dtype == "float64"]
        return max(errors, default=math.nan)

    @property
    def max_disagreement64(self) -> float:
        """The largest float64 |<manual - autograd, u>|: immune to finite-difference noise.

        With relu a perturbation can move a pre-activation across the kink at 0, so g(eps) itself
        can be off by ~1e-6 at any eps; this number still checks the hand-written pass exactly.
        """
        rows = [r for r in self.rows if r.dtype == "float64"]
        return max((abs(r.directional_manual - r.directional_autograd) for r in rows), default=math.nan)


def _loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss by torch.nn.functional, independent of the hand-written one under test."""
    if loss == "ce":
        return F.cross_entropy(logits, y)
    if loss == "mse":
        return F.mse_loss(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype))
    raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")


def _layer_input(model: MLP, x: torch.Tensor, index: int) -> torch.Tensor:
    """a_{index}: the input of linears[index] (perturbing that layer leaves it unchanged)."""
    act = torch.relu if model.activation == "relu" else torch.tanh
    a = x
    for layer in model.linears[:index]:
        a = act(layer(a))
    return a


def _loss_from(model: MLP, index: int, a: torch.Tensor, y: torch.Tensor, loss: str) -> float:
    """L from layer ``index`` on, given that layer's input: one (partial) forward pass."""
    act = torch.relu if model.activation == "relu" else torch.tanh
    *hidden, last = model.linears[index:]
    for layer in hidden:
        a = act(layer(a))
    return _loss(last(a), y, loss).item()


def _directions(model: MLP, seed: int) -> list[torch.Tensor]:
    """One Uniform[-1, 1] direction per parameter tensor, scaled to unit L2 norm (float64, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    directions = []
    for p in model.parameters():
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1
        directions.append(u / u.norm())
    return directions


def _check_dtype(
    model: MLP,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    directions: Sequence[torch.Tensor],
    dtype: torch.dtype,
    epsilons: Sequence[float],
) -> list[GradcheckRow]:
    """Rows for every parameter and eps in ``dtype``; ``model`` is perturbed and restored exactly."""
    x = x.to(dtype)
    params = list(model.parameters())
    manual = manual_gradients(model, x, y, loss)
    value = _loss(model(x), y, loss)
    autograd = torch.autograd.grad(value, params)
    base = abs(value.item())
    machine_eps = torch.finfo(dtype).eps
    rows = []
    with torch.no_grad():
        for index, layer in enumerate(model.linears):
            a = _layer_input(model, x, index)
            for k, kind, p in ((2 * index, "W", layer.weight), (2 * index + 1, "b", layer.bias)):
                u = directions[k].to(device=p.device)
                slope_manual = float((manual[k].double() * u).sum())
                slope_autograd = float((autograd[k].double() * u).sum())
                u = u.to(dtype)
                saved = p.clone()
                try:
                    for eps in epsilons:
                        p.copy_(saved + eps * u)
                        plus = _loss_from(model, index, a, y, loss)
                        p.copy_(saved - eps * u)
                        minus = _loss_from(model, index, a, y, loss)
                        p.copy_(saved)  # restore exactly, not w + eps u - eps u
                        g = (plus - minus) / (2 * eps)
                        rows.append(
                            GradcheckRow(
                                name=f"{kind}{index + 1}",
                                param=f"linears.{index}.{'weight' if kind == 'W' else 'bias'}",
                                dtype=str(dtype).removeprefix("torch."),
                                eps=eps,
                                finite_difference=g,
                                directional_manual=slope_manual,
                                directional_autograd=slope_autograd,
                                error_manual=abs(g - slope_manual),
                                error_autograd=abs(g - slope_autograd),
                                roundoff=machine_eps * base / eps,
                            )
                        )
                finally:
                    p.copy_(saved)
    return rows


def fit_order(rows: Sequence[GradcheckRow], error: str = "error_manual") -> float:
    """Slope of log(error) against log(eps) by numpy.polyfit (degree 1), for one parameter/dtype.

    Only rows whose error exceeds ROUNDOFF_MARGIN * roundoff take part; with fewer than two such
    eps the slope is nan. About 2 means the gradient is right; about 0 means it is wrong.
    """
    points = [(r.eps, getattr(r, error)) for r in rows if getattr(r, error) > ROUNDOFF_MARGIN * r.roundoff]
    if len({eps for eps, _ in points}) < 2:
        return math.nan
    eps, err = np.log(np.array(points)).T
    return float(np.polyfit(eps, err, 1)[0])


def _orders(rows: Sequence[GradcheckRow], dtype: str) -> dict[str, float]:
    names = dict.fromkeys(r.name for r in rows)  # in parameter order
    return {n: fit_order([r for r in rows if r.name == n and r.dtype == dtype]) for n in names}


def gradient_check(
    model: MLP,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "ce",
    seed: int = 0,
    eps32: Sequence[float] = (1e-2, 1e-3, 1e-4),
    eps64: Sequence[float] = (1e-5,),
) -> GradcheckResult:
    """The lab's directional-derivative check of every parameter on the data (x, y).

    Runs in float32 for ``eps32`` and in float64 for ``eps64``; the caller's model is perturbed in
    place only in its own dtype (and restored bit for bit), otherwise a converted copy is used.
    Each L is one forward pass under no_grad, from the perturbed layer on (earlier layers cached).
    """
    if not (eps32 or eps64) or min((*eps32, *eps64)) <= 0:
        raise ValueError(f"need at least one eps, all > 0: eps32={eps32}, eps64={eps64}")
    directions = _directions(model, seed)
    model_dtype = next(model.parameters()).dtype
    rows: list[GradcheckRow] = []
    for dtype, epsilons in ((torch.float32, eps32), (torch.float64, eps64)):
        if not epsilons:
            continue
        work = model if model_dtype == dtype else copy.deepcopy(model).to(dtype)
        rows += _check_dtype(work, x, y, loss, directions, dtype, epsilons)
    return GradcheckResult(
        rows=tuple(rows),
        order=_orders(rows, "float32"),
        order64=_orders(rows, "float64"),
        loss=loss,
        seed=seed,
        examples=len(x),
    )


def format_table(result: GradcheckResult) -> str:
    """The lab's "Grad error in W1: 0.0007544" lines per dtype and eps, then the fitted orders."""
    lines: list[str] = []
    groups = dict.fromkeys((r.dtype, r.eps) for r in result.rows)
    for dtype, eps in groups:
        lines.append(f"{dtype}, eps = {eps:g} (manual backprop; autograd in brackets)")
        for r in result.rows:
            if (r.dtype, r.eps) == (dtype, eps):
                lines.append(f"Grad error in {r.name}: {r.error_manual:.4g} ({r.error_autograd:.4g})")
        lines.append("")
    for label, orders in (("float32", result.order), ("float64", result.order64)):
        if any(r.dtype == label for r in result.rows):
            shown = ", ".join(f"{n} {v:.2f}" for n, v in orders.items())
            lines.append(f"Order of the error in eps ({label}; nan = within round-off): {shown}")
    return "\n".join(lines).rstrip() + "\n"


def _json_safe(value: float) -> float | None:
    return None if math.isnan(value) else value


STYLES = {  # float32 points joined by a line; the float64 point(s) as stars
    "float32": {"marker": "o", "linestyle": "-"},
    "float64": {"marker": "*", "linestyle": "none", "markersize": 12},
}


def _figure(result: GradcheckResult) -> Figure:
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    names = list(dict.fromkeys(r.name for r in result.rows))
    colors = [f"C{i % 10}" for i in range(len(names))]
    for name, color in zip(names, colors, strict=True):
        for dtype, style in STYLES.items():
            rows = [r for r in result.rows if r.name == name and r.dtype == dtype]
            if not rows:
                continue
            errors = [r.error_manual if r.error_manual > 0 else math.nan for r in rows]
            label = f"{name} ({dtype})" if dtype == "float64" else name
            ax.plot([r.eps for r in rows], errors, color=color, label=label, **style)
    all_eps = np.array(sorted({r.eps for r in result.rows}))
    first = [r for r in result.rows if r.eps == all_eps.max()]
    anchor = float(np.exp(np.mean([np.log(max(r.error_manual, 1e-300)) for r in first])))
    reference = anchor * (all_eps / all_eps.max()) ** 2
    ax.plot(all_eps, reference, "k--", linewidth=1, label="slope 2 (eps²)")
    floor32 = sorted({(r.eps, r.roundoff) for r in result.rows if r.dtype == "float32"})
    if floor32:
        eps32, roundoff32 = np.array(floor32).T
        ax.plot(eps32, roundoff32, ":", color="gray", label="float32 round-off")
    ax.set(xscale="log", yscale="log", xlabel="eps", ylabel="|g(eps) - <grad, u>|")
    ax.set_title(f"Directional gradient check, manual backprop ({result.loss}, {result.examples} points)")
    ax.legend(fontsize="small", ncols=2)
    return fig


def save_gradcheck(result: GradcheckResult, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``gradcheck.json`` (rows, orders; nan as null) and ``gradcheck.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "loss": result.loss,
        "seed": result.seed,
        "examples": result.examples,
        "max_error64": _json_safe(result.max_error64),
        "max_disagreement64": _json_safe(result.max_disagreement64),
        "order": {n: _json_safe(v) for n, v in result.order.items()},
        "order64": {n: _json_safe(v) for n, v in result.order64.items()},
        "rows": [
            {k: _json_safe(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
            for r in result.rows
        ],
    }
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    json_path, png_path = folder / "gradcheck.json", folder / "gradcheck.png"
    write_text(json_path, text)
    save_figure(_figure(result), png_path, dpi=120, tight=False)
    return json_path, png_path
