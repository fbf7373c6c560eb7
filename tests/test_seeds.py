"""derive_seed: one derivation for every derived seed. Oracles: SHA-256 itself, and the batches
that ``train()`` and stacked training actually draw."""

import hashlib

import pytest
import torch

from pipeline import stacked, train
from pipeline.config import DatasetConfig, TrainingConfig
from pipeline.data import load_split
from pipeline.model import build_mlp
from pipeline.seeds import derive_seed
from pipeline.train import Hyper, batch_order_seed


def test_derive_seed_is_sha256_of_its_labels_and_base():
    digest = hashlib.sha256(b"sampler:3:1:7").digest()
    assert derive_seed(7, "sampler", 3, 1) == int.from_bytes(digest[:8], "big") >> 1
    assert derive_seed(7, "sampler", 3, 1, bits=32) == int.from_bytes(digest[:8], "big") >> 32
    assert derive_seed(7, "sampler", 3, 1, bits=32) < 2**32


def test_nearby_bases_and_purposes_give_unrelated_seeds():
    seeds = {derive_seed(base, label) for base in range(50) for label in ("batch-order", "bootstrap", "init")}
    assert len(seeds) == 150
    assert batch_order_seed(0) != 1 and batch_order_seed(0) != batch_order_seed(1)
    with pytest.raises(ValueError, match="bits"):
        derive_seed(0, bits=64)


def test_train_and_stacked_training_draw_the_same_batches(monkeypatch):
    split = load_split(DatasetConfig(source="gmm", n_train=120, n_test=50, seed=0))
    config = TrainingConfig(epochs=3, batch_size=16, seed=5, dtype="float64")
    seen: dict[str, list[torch.Tensor]] = {"train": [], "stacked": []}

    def spy(name, real):
        def batches(x, y, order, batch):
            seen[name].append(order.clone())
            return real(x, y, order, batch)

        return batches

    monkeypatch.setattr(train, "batches", spy("train", train.batches))
    monkeypatch.setattr(stacked, "batches", spy("stacked", stacked.batches))
    hyper = Hyper(0.05, 0.9, 1e-3)
    train.train(build_mlp(2, (8,), "tanh", seed=5, dtype=torch.float64), split, hyper, config)
    models = [build_mlp(2, (8,), "tanh", seed=5, dtype=torch.float64) for _ in range(2)]
    stacked.train_population(models, split, [hyper, hyper], config)
    assert len(seen["train"]) == len(seen["stacked"]) == 3
    for a, b in zip(seen["train"], seen["stacked"], strict=True):
        assert torch.equal(a, b)
    # and the order is the batch-order stream, not the initialisation's (seed 5) or seed + 1's
    gen = torch.Generator().manual_seed(batch_order_seed(5))
    assert torch.equal(seen["train"][0], torch.randperm(len(split.y_train), generator=gen))
    assert not torch.equal(seen["train"][0], torch.randperm(120, generator=torch.Generator().manual_seed(6)))
