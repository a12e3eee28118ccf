"""The curves and confusion-matrix PNGs: valid pictures, written atomically, without a display or pyplot."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from resnet_jax import plots

HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "train_acc": 0.55, "test_loss": 0.9, "test_acc": 0.66},
    {"epoch": 2, "train_loss": 0.6, "train_acc": 0.78, "test_loss": 0.5, "test_acc": 0.81},
    {"epoch": 3, "train_loss": 0.4, "train_acc": 0.86, "test_loss": 0.45, "test_acc": 0.84},
]
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _drawn(pixels, colour, tol=40):
    """How many pixels are close to ``colour`` (RGB 0..255)."""
    return int((np.abs(pixels.astype(int) - colour).sum(-1) < tol).sum())


def test_curves_png(tmp_path):
    path = tmp_path / "curves.png"
    plots.plot_curves(HISTORY, path)
    px = _png(path)
    assert 300 <= px.shape[0] <= 1000 and 400 <= px.shape[1] <= 1200
    # The test-acc curve is green ("g"), d2l's style; no red, as there is no val_acc.
    assert _drawn(px, (0, 128, 0)) > 50
    assert _drawn(px, (255, 0, 0)) == 0
    assert os.listdir(tmp_path) == ["curves.png"]


def test_curves_plot_val_acc_and_tolerate_partial_records(tmp_path):
    history = [{"epoch": 0, "train_loss": None, "train_acc": None, "test_acc": 0.1}] + [
        dict(r, val_acc=r["test_acc"] - 0.02) for r in HISTORY
    ] + [{"epoch": 3.5, "train_loss": 0.3, "step": 120}]  # a step record: train metrics only
    plots.plot_curves(history, tmp_path / "c.png")
    assert _drawn(_png(tmp_path / "c.png"), (255, 0, 0)) > 50  # the val-acc curve is red ("r")


def test_curves_of_one_epoch_and_of_none(tmp_path):
    plots.plot_curves(HISTORY[:1], tmp_path / "one.png")
    plots.plot_curves([], tmp_path / "none.png")
    assert _png(tmp_path / "one.png").shape == _png(tmp_path / "none.png").shape


def test_step_records_sit_at_their_fraction_of_the_run_even_from_a_torch_checkpoint():
    # A run imported at step 5 (--init-from-torch), 8 steps an epoch, --log-every 4.
    log = [{"kind": "steps", "step": 9}, {"kind": "steps", "step": 13}, {"kind": "epoch", "epoch": 1, "step": 13},
           {"kind": "steps", "step": 17}, {"kind": "epoch", "epoch": 2, "step": 21}]
    assert [r["epoch"] for r in plots.epoch_axis(log, 8)] == [0.5, 1.0, 1, 1.5, 2]
    fresh = [{"kind": "steps", "step": 4}, {"kind": "epoch", "epoch": 1, "step": 8}]
    assert [r["epoch"] for r in plots.epoch_axis(fresh, 8)] == [0.5, 1]


def test_records_of_other_kinds_are_not_curves():
    # Checkpoints.save takes any records (a loop of one's own); train.py resuming such a checkpoint
    # ended its run with a KeyError here.
    log = [{"x": 1}, {"kind": "note", "text": "lr halved"}, {"kind": "steps"},
           {"kind": "epoch", "epoch": 1, "step": 8, "train_loss": 1.7}]
    assert plots.epoch_axis(log, 8) == [{"kind": "epoch", "epoch": 1, "step": 8, "train_loss": 1.7}]


def test_with_step_records_the_train_curves_are_theirs_alone():
    # The epoch's average and the last steps' average at one x: the line jumped at every epoch's end.
    log = [{"kind": "steps", "step": 4, "train_loss": 2.0}, {"kind": "steps", "step": 8, "train_loss": 1.2},
           {"kind": "epoch", "epoch": 1, "step": 8, "train_loss": 1.7, "train_acc": 0.4, "test_acc": 0.5}]
    axis = plots.epoch_axis(log, 8)
    assert [r.get("train_loss") for r in axis] == [2.0, 1.2, None] and axis[2]["test_acc"] == 0.5
    epochs_only = [r for r in log if r["kind"] == "epoch"]
    assert plots.epoch_axis(epochs_only, 8) == epochs_only  # without step records: as they are


def test_an_epoch_without_step_records_keeps_its_train_curves():
    # Epoch 1 logged every 4 steps; resumed for epochs 2 and 3 without --log-every: their train
    # loss and accuracy were dropped, and curves.png ended its train curves at epoch 1.
    log = [{"kind": "steps", "epoch": 1, "step": 4, "train_loss": 2.0},
           {"kind": "steps", "epoch": 1, "step": 8, "train_loss": 1.2},
           {"kind": "epoch", "epoch": 1, "step": 8, "train_loss": 1.7, "train_acc": 0.4, "test_acc": 0.5},
           {"kind": "epoch", "epoch": 2, "step": 16, "train_loss": 0.9, "train_acc": 0.6, "test_acc": 0.6},
           {"kind": "epoch", "epoch": 3, "step": 24, "train_loss": 0.7, "train_acc": 0.7, "test_acc": 0.7}]
    axis = plots.epoch_axis(log, 8)
    assert [r.get("train_loss") for r in axis] == [2.0, 1.2, None, 0.9, 0.7]
    assert [r.get("train_acc") for r in axis] == [None, None, None, 0.6, 0.7]
    assert [r["epoch"] for r in axis] == [0.5, 1.0, 1, 2, 3]


def test_confusion_matrix_png(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 50, (10, 10)) + np.diag(rng.integers(500, 1000, 10))
    path = tmp_path / "cm.png"
    plots.plot_confusion_matrix(cm, NAMES, path, title="fashion_mnist test set")
    px = _png(path)
    assert 400 <= px.shape[0] <= 1200 and 400 <= px.shape[1] <= 1400
    # A dark blue diagonal (Blues at share ~0.95) is drawn.
    assert _drawn(px, (8, 48, 107), tol=60) > 500
    plots.plot_confusion_matrix(np.zeros((3, 3), int), ["a", "b", "c"], tmp_path / "empty.png")
    _png(tmp_path / "empty.png")


def test_each_png_names_what_it_is_and_nothing_else_passes_for_one(tmp_path):
    # evaluate --confusion-png replaces a file only when made_here says it wrote one: a user's
    # photo at that name was replaced without a word.
    plots.plot_curves(HISTORY, tmp_path / "curves.png")
    plots.plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "cm.png")
    assert plots.made_here(tmp_path / "curves.png", plots.CURVES)
    assert plots.made_here(tmp_path / "cm.png", plots.CONFUSION)
    assert not plots.made_here(tmp_path / "curves.png", plots.CONFUSION)
    assert not plots.made_here(tmp_path / "cm.png", plots.CURVES)
    Image.new("L", (28, 28)).save(tmp_path / "photo.png")  # a PNG, of no maker
    with Image.open(tmp_path / "cm.png") as marked:
        marked.convert("RGB").save(tmp_path / "as.jpg", format="JPEG")  # not a PNG, whatever its name
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cm.png").read_bytes()[:60])
    for name in ("photo.png", "as.jpg", "text.png", "cut.png", "missing.png"):
        assert not plots.made_here(tmp_path / name, plots.CONFUSION), name


def test_a_large_photo_is_told_apart_without_a_warning_or_decoding_it(tmp_path, monkeypatch):
    # A user's photo over Pillow's size limit printed DecompressionBombWarning (two lines on
    # stderr before evaluate's one-line refusal), and every picture was decoded whole to find
    # the chunk, which ours carry before the pixels.
    Image.new("L", (64, 64)).save(tmp_path / "photo.png")
    plots.plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "cm.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    assert plots.made_here(tmp_path / "cm.png", plots.CONFUSION)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # the photo is "too large" now (not twice)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not plots.made_here(tmp_path / "photo.png", plots.CONFUSION)
    assert caught == []


def test_confusion_matrix_must_match_the_class_names(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(3, 3\); 2 class names"):
        plots.plot_confusion_matrix(np.zeros((3, 3), int), ["a", "b"], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("draw", [
    lambda p: plots.plot_curves(HISTORY, p),
    lambda p: plots.plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], p),
])
def test_an_unwritable_path_raises_oserror_and_leaves_nothing(tmp_path, draw):
    with pytest.raises(OSError):
        draw(tmp_path / "no" / "such" / "dir" / "x.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        draw(tmp_path / "file" / "x.png")
    # The temporary file is written, then os.replace fails (the target is a folder): it must go.
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(OSError):
        draw(tmp_path / "taken.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken.png"]
    assert list((tmp_path / "taken.png").iterdir()) == []


def test_a_failed_write_keeps_the_previous_picture(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    plots.plot_curves(HISTORY, path)
    before = path.read_bytes()
    from matplotlib.figure import Figure

    def full_disk(self, f, **kw):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space"):
        plots.plot_curves(HISTORY[:2], path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["curves.png"]


def test_importing_the_package_does_not_import_matplotlib_or_pyplot():
    code = (
        "import sys, resnet_jax, resnet_jax.plots, resnet_jax.metrics, resnet_jax.images\n"
        "assert 'matplotlib' not in sys.modules, 'eager matplotlib'\n"
        "import numpy as np, tempfile, os\n"
        "d = tempfile.mkdtemp()\n"
        "resnet_jax.plots.plot_confusion_matrix(np.eye(2, dtype=int), ['a', 'b'], os.path.join(d, 'cm.png'))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    env = dict(os.environ, MPLBACKEND="", DISPLAY="")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
