"""Train stage: seeded and reproducible, manual backprop = autograd, divergence is an outcome."""

import dataclasses

import pytest
import torch

from pipeline.config import TrainingConfig
from pipeline.data import load_split
from pipeline.model import build_mlp
from pipeline.train import Hyper, train
from tests.conftest import tiny_study


@pytest.fixture(scope="module")
def split():
    return load_split(tiny_study().dataset)


DEFAULT_HYPER = Hyper(0.1, 0.9, 1e-3)


def _fit(split, hyper=DEFAULT_HYPER, **training):
    config = dataclasses.replace(TrainingConfig(epochs=4, batch_size=32, seed=3), **training)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    model = build_mlp(split.input_dim, (16, 8), "tanh", seed=config.seed, dtype=dtype)
    result = train(model, split, hyper, config)
    return model, result


def test_same_seed_same_weights_and_history(split):
    (m1, r1), (m2, r2) = _fit(split), _fit(split)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert r1.history == r2.history
    m3, _ = _fit(split, seed=4)
    assert not torch.equal(next(m1.parameters()), next(m3.parameters()))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_manual_backward_trains_identically_to_autograd(split, loss):
    """Oracle: autograd. Several epochs of shuffled mini-batches, float64, parameters equal to 1e-10."""
    m_auto, r_auto = _fit(split, dtype="float64", loss=loss, backward="autograd")
    m_manual, r_manual = _fit(split, dtype="float64", loss=loss, backward="manual")
    for a, b in zip(m_auto.parameters(), m_manual.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for a, b in zip(r_auto.history, r_manual.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-10)
        assert a.val_acc == b.val_acc


def test_history_matches_an_independent_evaluation(split):
    model, result = _fit(split)
    with torch.no_grad():
        val_acc = (model(split.x_val).argmax(1) == split.y_val).double().mean().item()
        val_loss = torch.nn.functional.cross_entropy(model(split.x_val), split.y_val).item()
    assert result.history[-1].val_acc == pytest.approx(val_acc)
    assert result.history[-1].val_loss == pytest.approx(val_loss, rel=1e-5)
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]


def test_divergence_stops_with_the_epoch_named(split):
    model = build_mlp(split.input_dim, (16, 8), "relu", seed=0)
    result = train(model, split, Hyper(1e12), TrainingConfig(epochs=4, batch_size=32, seed=0))
    assert result.diverged_at is not None and result.diverged_at <= 4
    assert result.outcome == f"diverged: non-finite loss at epoch {result.diverged_at}"
    assert len(result.history) == result.diverged_at


def test_callback_can_stop_training(split):
    config = TrainingConfig(epochs=5, batch_size=32, seed=0)
    model = build_mlp(split.input_dim, (8,), "relu", seed=0)
    seen = []
    result = train(model, split, Hyper(0.1), config, lambda r: seen.append(r.epoch) or r.epoch == 2)
    assert seen == [1, 2] and result.stopped_at == 2 and len(result.history) == 2


def test_full_batch_without_shuffle_is_plain_gradient_descent(split):
    """Oracle: the same steps written with autograd on the whole training split."""
    config = TrainingConfig(epochs=3, batch_size=0, shuffle=False, seed=0, dtype="float64")
    model = build_mlp(split.input_dim, (8,), "tanh", seed=0, dtype=torch.float64)
    train(model, split, Hyper(0.5), config)
    ref = build_mlp(split.input_dim, (8,), "tanh", seed=0, dtype=torch.float64)
    x = split.x_train.double()
    for _ in range(3):
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), split.y_train).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
