"""The directional gradient check: its arithmetic against known truths, not against itself.

Oracles: bit-equality for restoring weights; the O(eps^2) law of the symmetric difference on a
smooth (tanh) net; a gradient known to be wrong (scaled by 1.01) must be flagged; JSON re-read.
"""

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import pipeline.gradcheck as gc
from pipeline.model import build_mlp


def _lab_data(n=200, d=2, seed=1):
    """The lab's setting: 2-D points, two classes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = ((x[:, 0] * x[:, 1] + 0.3 * torch.randn(n, generator=gen)) > 0).long()
    return x, y


def _errors(result, dtype, name=None, error="error_manual"):
    return [getattr(r, error) for r in result.rows if r.dtype == dtype and name in (None, r.name)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_restored_bit_for_bit(dtype, monkeypatch):
    x, y = _lab_data(64)
    model = build_mlp(2, (16, 8), "tanh", seed=0, dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    perturbed = []  # proves the caller's own tensors were perturbed (else the test proves nothing)
    real_loss_from = gc._loss_from

    def spy(m, index, a, yy, loss):
        if m is model:
            perturbed.append(any(not torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True)))
        return real_loss_from(m, index, a, yy, loss)

    monkeypatch.setattr(gc, "_loss_from", spy)
    gc.gradient_check(model, x, y, seed=3)
    assert perturbed and all(perturbed)
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.dtype == dtype
        assert torch.equal(p, b)
        assert p.grad is None


def test_partial_forward_from_any_layer_equals_the_model():
    x, y = _lab_data(50)
    model = build_mlp(2, (6, 5, 4), "relu", seed=0, dtype=torch.float64)
    with torch.no_grad():
        expected = F.cross_entropy(model(x.double()), y).item()
        for index in range(len(model.linears)):
            a = gc._layer_input(model, x.double(), index)
            assert gc._loss_from(model, index, a, y, "ce") == pytest.approx(expected, rel=1e-14)


def test_lab_setup_float64_error_is_tiny_and_matches_autograd():
    x, y = _lab_data()
    model = build_mlp(2, (500,), "tanh", seed=0)
    result = gc.gradient_check(model, x, y)
    assert list(dict.fromkeys(r.name for r in result.rows)) == ["W1", "b1", "W2", "b2"]
    assert list(dict.fromkeys(r.param for r in result.rows))[:2] == ["linears.0.weight", "linears.0.bias"]
    assert {(r.dtype, r.eps) for r in result.rows} == {
        ("float32", 1e-2),
        ("float32", 1e-3),
        ("float32", 1e-4),
        ("float64", 1e-5),
    }
    assert result.max_error64 <= 1e-8
    assert result.max_disagreement64 <= 1e-14
    assert max(_errors(result, "float32")) < 1e-2  # float32: round-off bound, not O(eps^2)
    assert next(model.parameters()).dtype == torch.float32  # the float64 pass used a copy
    text = gc.format_table(result)
    assert "Grad error in W1: " in text and "float64, eps = 1e-05" in text


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_error_is_second_order_in_eps_float64(loss):
    x, y = _lab_data(100)
    model = build_mlp(2, (20, 10), "tanh", seed=0, dtype=torch.float64)
    result = gc.gradient_check(model, x, y, loss, eps32=(), eps64=(1e-1, 1e-2, 1e-3))
    fitted = [v for v in result.order64.values() if not math.isnan(v)]
    # mse's last layer is quadratic, so its g(eps) is exact (error at round-off, order nan)
    assert len(fitted) >= (6 if loss == "ce" else 4)
    assert all(1.7 <= v <= 2.3 for v in fitted), result.order64
    assert all(math.isnan(v) for v in result.order.values())  # no float32 eps were run


def test_error_is_second_order_in_eps_float32_above_roundoff():
    # a small net with large inputs: curved enough that float32 truncation error beats round-off
    x, y = _lab_data(32)
    x, y = x * 3, (x[:, 0] > 0).long()
    model = build_mlp(2, (4,), "tanh", seed=0)
    result = gc.gradient_check(model, x, y, eps32=(1e-1, 5e-2, 2.5e-2), eps64=())
    fitted = [v for v in result.order.values() if not math.isnan(v)]
    assert fitted, "no parameter had float32 errors above round-off"
    assert all(1.7 <= v <= 2.3 for v in fitted), result.order
    assert math.isnan(result.max_error64)


def test_fit_order_skips_roundoff_points():
    row = gc.GradcheckRow("W1", "linears.0.weight", "float64", 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    # error 3 eps^2 against a round-off floor 1e-9 / eps: above it for eps >= 1e-2 only
    rows = [replace(row, eps=e, error_manual=3 * e**2, roundoff=1e-9 / e) for e in (1e-1, 1e-2, 1e-3, 1e-6)]
    assert gc.fit_order(rows) == pytest.approx(2.0, abs=1e-9)
    assert math.isnan(gc.fit_order(rows[2:]))  # fewer than two eps left: no slope


def test_wrong_gradient_is_caught(monkeypatch):
    real = gc.manual_gradients
    monkeypatch.setattr(gc, "manual_gradients", lambda *a: tuple(1.01 * g for g in real(*a)))
    x, y = _lab_data(100)
    model = build_mlp(2, (20,), "tanh", seed=0, dtype=torch.float64)
    result = gc.gradient_check(model, x, y, eps32=(), eps64=(1e-2, 1e-3, 1e-4, 1e-5))
    assert all(abs(v) < 0.3 for v in result.order64.values()), result.order64  # error does not shrink
    for name in result.order64:
        ours = [r for r in result.rows if r.name == name]
        assert 1.7 <= gc.fit_order(ours, "error_autograd") <= 2.3  # the reference still converges
    assert result.max_error64 > 1e-6
    assert result.max_disagreement64 > 1e-6


def test_save_gradcheck_round_trips(tmp_path):
    x, y = _lab_data(60)
    model = build_mlp(2, (8,), "tanh", seed=0)
    result = gc.gradient_check(model, x, y)
    json_path, png_path = gc.save_gradcheck(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gradcheck.json", "gradcheck.png"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_nan(token):
        raise ValueError(f"non-standard JSON constant {token}")

    data = json.loads(json_path.read_text(), parse_constant=no_nan)
    assert len(data["rows"]) == len(result.rows)
    for saved, row in zip(data["rows"], result.rows, strict=True):
        assert saved == asdict(row)  # floats are written with repr: exact round trip
    assert data["max_error64"] == result.max_error64
    for name, value in result.order.items():
        assert data["order"][name] == (None if math.isnan(value) else value)


def test_bad_eps_rejected():
    x, y = _lab_data(8)
    model = build_mlp(2, (3,), "tanh", seed=0)
    for eps32, eps64 in (((), ()), ((0.0,), (1e-5,))):
        with pytest.raises(ValueError, match="eps"):
            gc.gradient_check(model, x, y, eps32=eps32, eps64=eps64)
