"""ManualSGD against its oracle, torch.optim.SGD (dampening 0, no Nesterov)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import build_mlp
from pipeline.optim import ManualSGD


def _train(opt_factory, steps=60, seed=0):
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(256, 20, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] ** 2 > 1).long()
    model = build_mlp(20, (32, 16), "relu", seed=seed, dtype=torch.float64)
    opt = opt_factory(model.parameters())
    for step in range(steps):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("lr", "momentum", "weight_decay"),
    [(0.1, 0.0, 0.0), (0.05, 0.9, 0.0), (0.05, 0.0, 0.01), (0.01, 0.8, 0.01), (0.2, 0.99, 1e-3)],
)
def test_manual_sgd_matches_torch_sgd(lr, momentum, weight_decay):
    ours = _train(lambda p: ManualSGD(p, lr=lr, momentum=momentum, weight_decay=weight_decay))
    oracle = _train(
        lambda p: torch.optim.SGD(
            p, lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=0, nesterov=False
        )
    )
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the run must actually have moved the weights, or the comparison proves nothing
    start = [p.detach() for p in build_mlp(20, (32, 16), "relu", seed=0, dtype=torch.float64).parameters()]
    assert any((a - s).abs().max() > 1e-3 for a, s in zip(ours, start, strict=True))


def test_manual_sgd_does_not_touch_grad():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.full((3,), 2.0, dtype=torch.float64)
    ManualSGD([p], lr=0.1, momentum=0.9, weight_decay=0.5).step()
    assert torch.equal(p.grad, torch.full((3,), 2.0, dtype=torch.float64))
    # g = 2 + 0.5 * 1 = 2.5; p = 1 - 0.1 * 2.5
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.75, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"lr": 0}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1}, "weight_decay"),
    ],
)
def test_manual_sgd_rejects_bad_hyperparameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ManualSGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
