"""An MLflow-tracked Optuna study pipeline: split, train (hand-written SGD), validate, test, bound."""

__version__ = "0.1.0"
