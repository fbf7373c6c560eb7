"""Evaluate stage: predictions, confusion matrix, classification report and the 0/1 error vector.

The model runs where its weights are; inputs are moved there chunk by chunk and the logits come
back to the inputs' device, so a CPU sample (the ground truth's) works with a CUDA model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix

from pipeline.train import loss_fn


@dataclass(frozen=True)
class Evaluation:
    labels: np.ndarray  # true labels, int
    predictions: np.ndarray  # predicted labels, int
    loss: float
    confusion: np.ndarray  # [true, predicted] counts, sklearn's convention
    report: dict[str, Any]  # sklearn classification_report(output_dict=True)

    @property
    def errors(self) -> np.ndarray:
        """Per-example 0/1 loss, the input of the bounds stage."""
        return (self.labels != self.predictions).astype(np.uint8)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.labels == self.predictions))

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    weight = next(model.parameters())
    parts = [
        model(x[i : i + chunk].to(weight.device, weight.dtype)).to(x.device) for i in range(0, len(x), chunk)
    ]
    return torch.cat(parts)


def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: tuple[str, ...], loss: str = "ce"
) -> Evaluation:
    logits = predict_logits(model, x)
    predictions = logits.argmax(1).cpu().numpy()
    return summarize(y.cpu().numpy(), predictions, classes, loss_fn(loss, logits, y).item())


def summarize(
    labels: np.ndarray, predictions: np.ndarray, classes: tuple[str, ...], loss: float = float("nan")
) -> Evaluation:
    """Confusion matrix and per-class metrics from label vectors (scikit-learn does the counting)."""
    ids = list(range(len(classes)))
    return Evaluation(
        labels=np.asarray(labels),
        predictions=np.asarray(predictions),
        loss=loss,
        confusion=confusion_matrix(labels, predictions, labels=ids),
        report=classification_report(
            labels,
            predictions,
            labels=ids,
            target_names=list(classes),
            output_dict=True,
            zero_division=0,
        ),
    )
