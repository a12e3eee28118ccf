"""Per-class numbers from predictions, in plain NumPy.

``train.py evaluate`` sums its confusion matrix on the device, in the pass that
computes the loss (``training.evaluate_split(..., confusion=True)``);
:func:`confusion_matrix` is the same count for predictions held on the host,
such as ``training.predict``'s.

Convention, as in scikit-learn: ``cm[i, j]`` counts examples of true class
``i`` predicted as class ``j``, so a row is one true class and the diagonal
holds the correct predictions.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: rows the true class, columns the predicted one.

    Every class gets its row and column even if it never occurs, so matrices
    from different runs or test subsets line up. Raises ValueError for
    mismatched lengths or a class index outside [0, num_classes), which would
    otherwise be dropped or wrap around silently.
    """
    labels = np.asarray(labels).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"labels ({labels.size}) and preds ({preds.size}) differ in length")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    for name, a in (("labels", labels), ("preds", preds)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be integer class indices, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} hold class {a.min() if a.min() < 0 else a.max()}, outside [0, {num_classes})")
    # minlength: every class keeps its row and column, even one absent from the batch.
    flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Each true class's accuracy (its recall): diagonal / row sum, float64; NaN for a class with no examples.

    NaN rather than 0 so that "never seen" is not reported as "always wrong".
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    totals = cm.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)
