"""Hand-written backprop against its oracle, autograd on F.cross_entropy / F.mse_loss (float64)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.backprop import manual_gradients, manual_loss_and_gradients, set_manual_gradients
from pipeline.model import build_mlp


def _batch(n, d, classes=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _oracle_loss(loss, logits, y):
    if loss == "ce":
        return F.cross_entropy(logits, y)
    return F.mse_loss(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype))


def _autograd(model, x, y, loss):
    value = _oracle_loss(loss, model(x), y)
    return value.detach(), torch.autograd.grad(value, list(model.parameters()))


CASES = [
    # (hidden widths, batch size, classes)
    ((), 16, 2),  # depth 1: no hidden layer, plain logistic/linear regression
    ((7,), 1, 2),  # batch of one
    ((32,), 50, 3),
    ((12, 5, 9), 33, 2),  # depth 4
    ((3, 64, 2), 8, 4),
]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize(("hidden", "n", "classes"), CASES)
def test_manual_gradients_match_autograd(loss, activation, hidden, n, classes):
    x, y = _batch(n, 6, classes, seed=len(hidden) + n)
    model = build_mlp(6, hidden, activation, seed=n, out_features=classes, dtype=torch.float64)
    expected_loss, expected = _autograd(model, x, y, loss)
    result = manual_loss_and_gradients(model, x, y, loss)
    assert len(result.gradients) == len(list(model.parameters()))
    for (name, p), got, want in zip(model.named_parameters(), result.gradients, expected, strict=True):
        assert got.shape == p.shape, name
        assert not got.requires_grad
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(result.loss, expected_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.logits, model(x).detach(), rtol=0, atol=1e-12)
    # the comparison must not be trivially satisfied by all-zero gradients
    assert max(g.abs().max() for g in expected) > 1e-3


def test_manual_cross_entropy_is_stable_for_huge_logits():
    x, y = _batch(20, 4)
    model = build_mlp(4, (8,), "tanh", seed=1, dtype=torch.float64)
    with torch.no_grad():
        model.linears[-1].weight.mul_(1e4)  # logits of order 1e4: naive exp() overflows
    result = manual_loss_and_gradients(model, x, y, "ce")
    expected_loss, expected = _autograd(model, x, y, "ce")
    assert torch.isfinite(result.loss)
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-12, atol=0)
    for got, want in zip(result.gradients, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_manual_gradients_float32_close_to_autograd():
    x, y = _batch(64, 10)
    model = build_mlp(10, (16, 16), "relu", seed=3)
    _, expected = _autograd(model, x.float(), y, "ce")
    for got, want in zip(manual_gradients(model, x.float(), y), expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_set_manual_gradients_fills_grad_like_backward(loss):
    x, y = _batch(40, 5, 3)
    ours = build_mlp(5, (9, 4), "tanh", seed=2, out_features=3, dtype=torch.float64)
    oracle = build_mlp(5, (9, 4), "tanh", seed=2, out_features=3, dtype=torch.float64)
    _oracle_loss(loss, oracle(x), y).backward()

    value, logits = set_manual_gradients(ours, x, y, loss)  # .grad is None: allocated
    for p, q in zip(ours.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(value, _oracle_loss(loss, oracle(x), y).detach(), rtol=0, atol=1e-12)
    assert logits.shape == (40, 3)

    stale = [p.grad for p in ours.parameters()]
    for g in stale:
        g.fill_(123.0)
    set_manual_gradients(ours, x, y, loss)  # existing .grad: overwritten in place, not accumulated
    for p, q, g in zip(ours.parameters(), oracle.parameters(), stale, strict=True):
        assert p.grad is g
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10)


def test_an_optimizer_step_uses_the_manual_gradients():
    x, y = _batch(32, 4)
    ours = build_mlp(4, (6,), "relu", seed=5, dtype=torch.float64)
    oracle = build_mlp(4, (6,), "relu", seed=5, dtype=torch.float64)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    opt_oracle = torch.optim.SGD(oracle.parameters(), lr=0.5)
    for _ in range(5):
        opt_ours.zero_grad()
        set_manual_gradients(ours, x, y)
        opt_ours.step()
        opt_oracle.zero_grad()
        F.cross_entropy(oracle(x), y).backward()
        opt_oracle.step()
    for p, q in zip(ours.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_inputs_are_not_mutated():
    x, y = _batch(10, 3)
    model = build_mlp(3, (5,), "relu", seed=0, dtype=torch.float64)
    x0, y0 = x.clone(), y.clone()
    params0 = [p.detach().clone() for p in model.parameters()]
    manual_loss_and_gradients(model, x, y, "ce")
    manual_loss_and_gradients(model, x, y, "mse")
    assert torch.equal(x, x0) and torch.equal(y, y0)
    for p, p0 in zip(model.parameters(), params0, strict=True):
        assert torch.equal(p, p0)
        assert p.grad is None


def test_unknown_loss_is_rejected():
    x, y = _batch(4, 3)
    with pytest.raises(ValueError, match="loss"):
        manual_gradients(build_mlp(3, (), "relu", seed=0, dtype=torch.float64), x, y, "hinge")
