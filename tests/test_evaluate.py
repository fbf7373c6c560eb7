"""Confusion matrix and classification report against counts worked out by hand."""

import numpy as np
import pytest

from pipeline.evaluate import summarize


def test_confusion_counts_on_a_known_prediction_vector():
    # 6 true class-0 examples: 4 right, 2 wrong; 4 true class-1 examples: 3 right, 1 wrong
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    predictions = np.array([0, 0, 1, 0, 1, 0, 1, 0, 1, 1])
    ev = summarize(labels, predictions, ("plane", "bird"))
    assert ev.confusion.tolist() == [[4, 2], [1, 3]]  # rows: true class, columns: predicted
    assert ev.accuracy == pytest.approx(7 / 10)
    assert ev.errors.tolist() == [0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    assert ev.errors.dtype == np.uint8
    plane, bird = ev.report["plane"], ev.report["bird"]
    assert plane["precision"] == pytest.approx(4 / 5) and plane["recall"] == pytest.approx(4 / 6)
    assert bird["precision"] == pytest.approx(3 / 5) and bird["recall"] == pytest.approx(3 / 4)
    assert bird["f1-score"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert plane["support"] == 6 and bird["support"] == 4
    assert ev.report["macro avg"]["recall"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert ev.report["weighted avg"]["recall"] == pytest.approx(0.7)


def test_a_class_never_predicted_still_has_a_row():
    ev = summarize(np.array([0, 1, 1]), np.array([0, 0, 0]), ("a", "b"))
    assert ev.confusion.tolist() == [[1, 0], [2, 0]]
    assert ev.report["b"]["precision"] == 0.0
