"""A seed-style training script for the Fashion-2 study, the way a student would write it.

``python -m pipeline.bench.seed_script --root data --epochs 5``: torchvision's ``FashionMNIST`` with
per-sample transforms (ToTensor + Normalize), the two classes of ``studies/fashion2.toml``
(T-shirt/top vs Shirt), a seeded 80/20 train/validation split of the pipeline's sizes, a shuffling
``DataLoader``, an ``nn.Sequential`` MLP 784-512-128-32-2 and ``torch.optim.SGD`` with momentum and
weight decay. It validates every epoch, tests once at the end and prints the test error.

``pipeline.bench.process`` times it as a whole process against ``pipeline study``; so that the
comparison is with plain PyTorch, it imports nothing from the pipeline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, random_split
from torchvision import datasets, transforms

CLASSES = (0, 6)  # Fashion-MNIST label ids of T-shirt/top and Shirt, as in studies/fashion2.toml
VAL_FRACTION = 0.2  # share of the two classes' training images held out for validation
BATCH_SIZE = 256  # examples per step
EPOCHS = 30  # passes over the training split, as a Fashion-2 trial
LR = 0.01  # learning rate, per step
MOMENTUM = 0.9  # heavy-ball momentum
WEIGHT_DECAY = 1e-3  # L2 coefficient SGD adds to every gradient
SEED = 0  # seeds the split, the initial weights and the shuffling


class Relabel:
    """Label id -> 0 or 1, its position in ``classes`` (a class, not a lambda, so it pickles)."""

    def __init__(self, classes: Sequence[int]) -> None:
        self.classes = tuple(classes)

    def __call__(self, label: int) -> int:
        return self.classes.index(int(label))


def load_data(
    root: str, classes: Sequence[int] = CLASSES, seed: int = SEED
) -> tuple[Dataset, Dataset, Dataset]:
    """Train, validation and test sets of the two classes, every image transformed when it is read."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    relabel = Relabel(classes)
    kept = torch.tensor(classes)

    def two_classes(train: bool) -> Subset:
        full = datasets.FashionMNIST(
            root, train=train, download=False, transform=transform, target_transform=relabel
        )
        return Subset(full, torch.isin(full.targets, kept).nonzero().flatten().tolist())

    pool, test = two_classes(True), two_classes(False)
    n_val = round(VAL_FRACTION * len(pool))
    train, val = random_split(pool, [len(pool) - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return train, val, test


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 512),
        nn.ReLU(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, int, int]:
    """Mean cross-entropy, number of wrong predictions and number of examples."""
    model.eval()
    loss, wrong, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            wrong += (logits.argmax(1) != y).sum().item()
            n += len(y)
    return loss / n, wrong, n


def train_and_test(
    root: str,
    epochs: int = EPOCHS,
    classes: Sequence[int] = CLASSES,
    seed: int = SEED,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, int, int]:
    """Train, validating every epoch, then test: the model, its wrong test predictions and the test size."""
    torch.manual_seed(seed)
    train_set, val_set, test_set = load_data(root, classes, seed)
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=BATCH_SIZE)
    test_loader = DataLoader(test_set, batch_size=BATCH_SIZE)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        running, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        val_loss, val_wrong, n_val = evaluate(model, val_loader)
        log(
            f"epoch {epoch}/{epochs}: train_loss {running / seen:.4f} train_acc {correct / seen:.4f} "
            f"val_loss {val_loss:.4f} val_acc {1 - val_wrong / n_val:.4f}"
        )
    _, wrong, m = evaluate(model, test_loader)
    log(f"test_error {wrong / m:.4f} ({wrong} of {m} test images wrong)")
    return model, wrong, m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="folder holding FashionMNIST/raw/ (default: data)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs (default: {EPOCHS})")
    parser.add_argument(
        "--classes", type=int, nargs=2, default=CLASSES, metavar=("ID0", "ID1"), help="two label ids"
    )
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default: {SEED})")
    args = parser.parse_args(argv)
    train_and_test(args.root, args.epochs, tuple(args.classes), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
