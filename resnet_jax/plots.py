"""The pictures a run leaves in --output: training curves and a confusion matrix, as PNG files.

Drawn with matplotlib's object API on a bare ``Figure``, which renders with
the Agg backend: no display is ever needed, and pyplot's global state (its
current figure, its backend choice) is left alone for whoever imported us.
matplotlib is imported inside the functions, so ``import resnet_jax`` and
training runs that draw nothing never pay for it.

The two plotting functions write atomically (a temporary file in the same folder, then
``os.replace``): a reader never sees half a PNG, and a failure leaves the
previous picture in place and no temporary file behind. Each PNG names what it is in a text
chunk (:func:`made_here`): ``train.py evaluate --confusion-png`` replaces a file only when it is
a confusion matrix of ours, never a picture of the user's that happens to have the name.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from resnet_jax.files import atomic_write

# The chapter's d2l.Animator: one axis, its default styles; the chapter plots the first three,
# val_acc (--val-split) takes the fourth.
_CURVES = (
    ("train_loss", "train loss", "-", "C0"),
    ("train_acc", "train acc", "--", "m"),
    ("test_acc", "test acc", "-.", "g"),
    ("val_acc", "val acc", ":", "r"),
)


def epoch_axis(log: list[dict], steps_per_epoch: int) -> list[dict]:
    """metrics.jsonl's records for :func:`plot_curves`: step records (--log-every) at their fraction of an epoch.

    A step record carries the global step, which a run started from a PyTorch
    checkpoint counts on from the file's; the run's first step is found from
    its epoch records (epoch e ends at step first + e * steps_per_epoch).

    In an epoch with step records, the train curves are theirs alone: the epoch record's train
    loss, the epoch's average, sits at the same x as the last step record's, the average of the
    last few steps, and the line jumped between the two at every epoch's end. An epoch without
    step records (a run resumed with another --log-every) keeps its epoch record's.
    """
    # Only train.py's records are curves: a checkpoint of a loop of one's own, resumed by train.py,
    # may hold records of its own (Checkpoints.save takes any dicts), which failed here at the run's end.
    log = [r for r in log if r.get("kind") == "epoch" or (r.get("kind") == "steps" and "step" in r)]
    epochs = [r for r in log if r["kind"] == "epoch"]
    step0 = epochs[0]["step"] - epochs[0]["epoch"] * steps_per_epoch if epochs else 0
    # The epochs that have step records: step s ends inside epoch ceil((s - step0) / steps_per_epoch).
    logged = {math.ceil((r["step"] - step0) / steps_per_epoch) for r in log if r["kind"] == "steps"}
    return [{**r, "epoch": (r["step"] - step0) / steps_per_epoch} if r["kind"] == "steps"
            else {k: v for k, v in r.items() if k not in ("train_loss", "train_acc")} if r.get("epoch") in logged
            else dict(r) for r in log]


def plot_curves(history: list[dict], path: str | Path) -> None:
    """The chapter's training plot: train loss, train acc and test acc against epochs, in one axis.

    ``history`` holds records like ``training.fit``'s: ``epoch`` plus any of
    ``train_loss``, ``train_acc``, ``test_acc`` and (when a validation split
    is used) ``val_acc``. Each curve takes the records that have its key with
    a finite value, at x = ``epoch``; so records logged every N steps with a
    fractional ``epoch`` and train metrics only (as d2l's Animator plots them)
    fit in too, and an epoch-0 record with ``train_loss: None`` is skipped.
    Raises OSError if ``path`` cannot be written (nothing is left behind).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.0, 3.5), dpi=100)  # d2l's default figure size is (3.5, 2.5); a bit larger to read
    ax = fig.add_subplot()
    last_epoch, first_epoch = 0.0, float("inf")
    for key, label, style, colour in _CURVES:
        points = [
            (float(r["epoch"]), float(r[key]))
            for r in history
            if r.get("epoch") is not None and _finite(r.get(key))
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, color=colour, label=label, marker="." if len(points) == 1 else None)
            last_epoch, first_epoch = max(last_epoch, max(xs)), min(first_epoch, min(xs))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, however the axis is scaled
    # From epoch 1, as the chapter's plot; from 0 when step records fall inside the first epoch.
    ax.set_xlim(1 if last_epoch > 1 and first_epoch >= 1 else 0, max(last_epoch, 1))
    ax.grid(True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    _save_atomically(fig, path, CURVES)


def plot_confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str | None = None
) -> None:
    """A labelled heatmap of ``cm`` (rows: true class, columns: predicted) with the count in every cell.

    Each row is coloured by its share of that true class (row-normalised), so
    classes of different sizes read alike, while the cells print the raw
    counts. Raises ValueError if ``cm`` is not square or does not match
    ``class_names``, OSError if ``path`` cannot be written.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    n = len(class_names)
    if cm.ndim != 2 or cm.shape != (n, n):
        raise ValueError(f"the confusion matrix has shape {cm.shape}; {n} class names need ({n}, {n})")
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape, np.float64), where=totals > 0)

    side = max(4.0, 0.55 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fontsize = 8 if n <= 12 else 6
    for i in range(n):
        for j in range(n):
            # White text on dark cells, black on light ones.
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=fontsize,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title if title is not None else f"Confusion matrix ({int(cm.sum())} examples)")
    fig.tight_layout()
    _save_atomically(fig, path, CONFUSION)


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


# The text chunk's key and values (a PNG's tEXt, which image viewers list as its properties).
MAKER_KEY = "resnet_jax"
CURVES = "training curves"
CONFUSION = "confusion matrix"


def made_here(path: str | Path, what: str) -> bool:
    """Whether ``path`` is a PNG this module wrote as ``what`` (:data:`CURVES` or :data:`CONFUSION`).
    (PNGs of versions before 2026-12-07 carry no such chunk: False.)"""
    from PIL import Image

    # The chunk is read from the header (matplotlib writes it before the pixels): ``image.text``
    # decoded the whole picture to look for later ones, and a user's photo over Pillow's size limit
    # printed Python's DecompressionBombWarning, two lines, before the one-line refusal.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.format == "PNG" and image.info.get(MAKER_KEY) == what
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # not an image; a damaged PNG
        return False


def _save_atomically(fig, path: str | Path, what: str) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", metadata={MAKER_KEY: what})
