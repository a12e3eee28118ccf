"""The confusion matrix and per-class accuracy on a hand-counted example."""

import numpy as np
import pytest

from resnet_jax.metrics import confusion_matrix, per_class_accuracy


def test_a_hand_counted_example():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 1, 0, 1, 1, 0, 2, 2, 1]
    cm = confusion_matrix(labels, preds, 4)
    assert cm.dtype == np.int64
    # Rows: true class; columns: predicted. Class 3 never occurs but has its row and column.
    assert cm.tolist() == [
        [2, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 1, 2, 0],
        [0, 0, 0, 0],
    ]
    acc = per_class_accuracy(cm)
    np.testing.assert_allclose(acc[:3], [2 / 3, 1.0, 0.5])
    assert np.isnan(acc[3])
    # The diagonal over the total is the overall accuracy.
    assert np.trace(cm) / cm.sum() == np.mean(np.asarray(labels) == np.asarray(preds))


def test_arrays_of_any_shape_and_int_type():
    labels = np.array([[1, 1], [0, 1]], np.int32)
    preds = np.array([[1, 0], [0, 1]], np.uint8)
    assert confusion_matrix(labels, preds, 2).tolist() == [[1, 0], [1, 2]]
    assert confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3


@pytest.mark.parametrize(
    "labels, preds, n, message",
    [
        ([0, 1], [0], 2, "differ in length"),
        ([0, 2], [0, 1], 2, r"labels hold class 2, outside \[0, 2\)"),
        ([0, 1], [-1, 1], 2, r"preds hold class -1"),
        ([0.0, 1.0], [0, 1], 2, "integer class indices"),
        ([0], [0], 0, "positive integer"),
    ],
)
def test_bad_input_is_refused(labels, preds, n, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(labels, preds, n)


def test_per_class_accuracy_needs_a_square_matrix():
    with pytest.raises(ValueError, match="square"):
        per_class_accuracy(np.zeros((2, 3)))
