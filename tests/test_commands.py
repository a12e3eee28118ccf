"""train.py with --output/--resume, and the evaluate and predict commands, as a user runs them.

In-process through cli.main (what train.py calls) on a few hundred Fashion-MNIST
examples at 17x17; one subprocess checks the real entry point.
"""

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tree_digest
from resnet_jax import cli, console, data, rundir, training
from resnet_jax.checkpoint import Checkpoints, load_for_inference

REPO = Path(__file__).resolve().parents[1]


def _train_args(data_dir, output, *extra):
    return ["--data-dir", str(data_dir), "--offline", "--train-limit", "96", "--test-limit", "48", "--epochs", "2",
            "--resize", "17", "--batch-size", "32", "--eval-batch-size", "32", "--val-split", "32",
            "--output", str(output), "--json", *map(str, extra)]


def _main(*argv):
    """cli.main's exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(map(str, argv)))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(prepared_data_dir, tmp_path_factory):
    """A 2-epoch run with a validation split: its directory and its final JSON line."""
    output = tmp_path_factory.mktemp("run") / "out"
    rc, out, err = _main(*_train_args(prepared_data_dir, output))
    assert rc == 0, err
    return output, json.loads(out.strip().splitlines()[-1])


def test_a_run_leaves_checkpoints_metrics_and_curves(run):
    output, final = run
    assert Checkpoints(output, read_only=True).latest.all_steps() == [1, 2]
    assert len(list((output / "best").iterdir())) == 1
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert records[-1]["test_acc"] == final["test_acc"] and "val_acc" in records[-1]
    # --val-split 32 of --train-limit 96: 64 examples left to train on, 2 steps of 32 an epoch.
    assert int(load_for_inference(output).state.step) == 2 * 2
    with Image.open(output / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_evaluate_gives_the_training_loops_final_test_metrics(run, prepared_data_dir, monkeypatch):
    output, final = run
    # What the confusion matrix must hold, counted here from the network's own outputs:
    # [true class, predicted class] over the run's 48 test examples.
    _, test = data.load(data.FASHION_MNIST, prepared_data_dir, offline=True)
    ckpt = load_for_inference(output)
    logits = ckpt.state.apply_fn(training.evaluated_variables(ckpt.state),
                                 data.preprocess(test.images[:48], ckpt.config.resize), train=False)
    want = np.zeros((10, 10), np.int64)
    np.add.at(want, (test.labels[:48], np.asarray(logits).argmax(-1)), 1)

    def second_pass(*args, **kwargs):
        raise AssertionError("evaluate ran the network over the test set a second time")

    monkeypatch.setattr(training, "predict", second_pass)  # the confusion matrix comes from the metrics' pass
    rc, out, err = _main("evaluate", output, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["epoch"] == 2 and report["examples"] == 48
    assert report["test_loss"] == final["test_loss"] and report["test_acc"] == final["test_acc"]
    cm = np.array(report["confusion_matrix"])
    assert np.array_equal(cm, want) and np.trace(cm) / 48 == final["test_acc"]
    # Accuracy per class is recall: the diagonal over each true class's count (None for a class
    # with no example among the 48).
    recall = [None if n == 0 else float(c) / n for c, n in zip(np.diag(want), want.sum(axis=1))]
    assert report["per_class_acc"] == dict(zip(data.FASHION_MNIST.class_names, recall))
    assert len(set(recall) - {None}) > 1  # (a matrix whose classes all score alike would not show a swap)
    with Image.open(report["confusion_png"]) as png:
        assert png.format == "PNG"

    # The best checkpoint is the epoch of highest val accuracy, and evaluates to that epoch's test metrics.
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in history if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: (r["val_acc"], -r["epoch"]))
    rc, out, err = _main("evaluate", output, "--which", "best", "--confusion-png", output / "b.png")
    assert rc == 0, err
    assert f"epoch {best['epoch']}" in out and f"acc {best['test_acc']:.4f} on 48 examples" in out
    assert "Ankle boot" in out and (output / "b.png").is_file()
    # Asked again, evaluate replaces the confusion matrix it wrote (the other checkpoint's, here).
    before = (output / "b.png").read_bytes()
    rc, out, err = _main("evaluate", output, "--which", "latest", "--confusion-png", output / "b.png")
    assert rc == 0, err
    assert f"confusion matrix: {output / 'b.png'}" in out and (output / "b.png").read_bytes() != before


def test_predict_on_png_files(run, prepared_data_dir, tmp_path):
    output, _ = run
    _, test = data.load(data.FASHION_MNIST, prepared_data_dir, offline=True)
    files = []
    for i in range(3):  # grey, at the native size: exactly the test images
        files.append(tmp_path / f"test{i}.png")
        Image.fromarray(test.images[i, :, :, 0], "L").save(files[-1])
    colour = tmp_path / "big_colour.png"  # colour and another size: converted like the training data
    Image.fromarray(np.repeat(test.images[0], 3, axis=-1), "RGB").resize((70, 70), Image.Resampling.BILINEAR).save(colour)
    files.append(colour)

    rc, out, err = _main("predict", output, *files, "--top-k", 3, "--json")
    assert rc == 0, err
    preds = json.loads(out)["predictions"]
    assert [p["input"] for p in preds] == list(map(str, files))
    ckpt = load_for_inference(output)
    probs = training.predict(ckpt.state, test.images[:3], ckpt.config.resize)
    for p, want in zip(preds, probs):
        top = p["top_k"]
        assert [t["index"] for t in top] == list(np.argsort(-want, kind="stable")[:3])
        # Another batch size (4 here, 3 there) may sum the convolutions in another order: close, not equal.
        # Logits ~1e-6 apart make a 1e-14 probability 1e-5 off relative to itself, hence the atol.
        np.testing.assert_allclose([t["prob"] for t in top], [want[t["index"]] for t in top], rtol=1e-5, atol=1e-9)
        assert [t["class"] for t in top] == [data.FASHION_MNIST.class_names[t["index"]] for t in top]
    assert preds[3]["top_k"][0]["index"] == preds[0]["top_k"][0]["index"]

    np.save(tmp_path / "batch.npy", test.images[:2, :, :, 0])
    rc, out, err = _main("predict", output, files[0], tmp_path / "batch.npy", "--top-k", 1)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith(f"{tmp_path / 'batch.npy'}[0]: ")
    assert lines[0].split(": ")[1] == lines[1].split(": ")[1]  # the same image, as a PNG and in a .npy


def test_ctrl_c_right_after_an_epochs_save_keeps_that_epoch_in_one_line(prepared_data_dir, tmp_path, monkeypatch):
    # The save is whole when Ctrl-C lands: saving it again (the path for a save cut short) must
    # not write the epoch twice. It was refused as out of order, a ValueError traceback.
    real, calls = Checkpoints.save, []

    def save_then_interrupt(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls.append(kwargs.get("best_only", False))
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "save", save_then_interrupt)
    output = tmp_path / "out"
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--epochs", 3))
    assert rc == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"train.py: interrupted; the checkpoint of epoch 1 is in {output}: continue with --resume"
    assert calls == [False, True]  # saved again: best/ alone
    with Checkpoints(output, read_only=True) as ckpts:
        assert ckpts.latest.all_steps() == [1] and ckpts.best.all_steps() == [1]


def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes_the_same_run(run, prepared_data_dir, tmp_path, monkeypatch):
    _, final = run
    output = tmp_path / "out"
    real_fit = training.fit

    def fit_interrupted_in_epoch_2(config, train, test, state, hooks, **kw):
        def on_progress(done, total, last):
            raise KeyboardInterrupt

        epoch_hook = hooks.on_epoch
        hooks.on_epoch = lambda rec: (epoch_hook(rec), setattr(hooks, "on_progress", on_progress))
        return real_fit(config, train, test, state, hooks, **kw)

    monkeypatch.setattr(training, "fit", fit_interrupted_in_epoch_2)
    rc, out, err = _main(*_train_args(prepared_data_dir, output))
    assert rc == 130 and err.strip().splitlines()[-1] == f"train.py: interrupted; the checkpoint of epoch 1 is in {output}: continue with --resume"
    monkeypatch.setattr(training, "fit", real_fit)

    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume"))
    assert rc == 0, err
    assert "resuming from" in err
    resumed = json.loads(out.strip().splitlines()[-1])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "val_acc"):
        assert resumed[key] == final[key], key
    # The run's figures are the whole run's, not the resuming process's alone (its clock went
    # backwards from epoch 1 to 2, and train time and examples/sec covered epoch 2 only).
    h = resumed["history"]
    assert resumed["resumed_from_epoch"] == 1 and [r["epoch"] for r in h] == [1, 2]
    assert h[0]["wall_s"] < h[1]["wall_s"] <= resumed["wall_time_s"]
    assert resumed["train_time_s"] == pytest.approx(sum(r["epoch_train_s"] for r in h))
    n = h[0]["examples_per_sec"] * h[0]["epoch_train_s"]  # the training examples of one epoch
    assert resumed["examples_per_sec"] == pytest.approx(2 * n / resumed["train_time_s"])
    assert final["resumed_from_epoch"] == 0 and resumed["versions"]["resnet_jax"] and resumed["cpu"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_after_an_epochs_line_waits_for_its_checkpoint(prepared_data_dir, tmp_path, monkeypatch,
                                                               interrupts_installed, sig):
    # The signal lands as epoch 1's line is printed, before its save began: the epoch is saved
    # first, then the run stops (it used to stop with the checkpoint of the epoch before).
    output = tmp_path / "out"
    real = cli._Reporter.on_epoch

    def on_epoch_then_signal(self, rec):
        real(self, rec)
        signal.raise_signal(getattr(signal, sig))

    monkeypatch.setattr(cli._Reporter, "on_epoch", on_epoch_then_signal)
    rc, out, err = _main(*_train_args(prepared_data_dir, output))
    word = {"SIGINT": "interrupted", "SIGTERM": "terminated"}[sig]
    assert rc == {"SIGINT": 130, "SIGTERM": 143}[sig], err
    assert err.strip().splitlines()[-1] == f"train.py: {word}; the checkpoint of epoch 1 is in {output}: continue with --resume"
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["1"]


def test_a_run_that_fails_before_writing_anything_leaves_no_folders(tmp_path):
    # No data and no network: the run stops after the path checks made --output (and its parent).
    rc, out, err = _main("--data-dir", tmp_path / "no-data", "--offline", "--output", tmp_path / "runs" / "r1")
    assert rc == 1 and "downloads are off (--offline)" in err, err
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "no-data").exists()  # nor the data dir it made to lock it while looking
    # A folder that was there before stays, and so does anything a failed run finds in it.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    rc, out, err = _main("--data-dir", tmp_path / "no-data", "--offline", "--output", tmp_path / "mine" / "r2")
    assert rc == 1 and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    rc, out, err = _main("--data-dir", tmp_path / "no-data", "--offline", "--output", tmp_path / "empty")
    assert rc == 1 and (tmp_path / "empty").is_dir()


def test_a_full_disk_during_a_save_ends_clearly_and_keeps_the_last_checkpoint(run, prepared_data_dir, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    output = tmp_path / "out"
    shutil.copytree(run[0], output)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", disk_full)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "save", disk_full)
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume", "--epochs", 3))
    last = err.strip().splitlines()[-1]
    assert rc == 1 and "could not save the checkpoint of epoch 3" in last and "epoch 2 is intact" in last
    assert "Traceback" not in err
    monkeypatch.undo()
    assert Checkpoints(output).latest.all_steps() == [1, 2]


def _copy_without_best(src, dst, empty=False):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "best")
    if empty:  # as an older version's run stopped after its first epoch left it
        (dst / "best").mkdir()
    return dst


def _garbled(src, dst):
    shutil.copytree(src, dst)
    files = [p for p in (dst / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    return dst


def _checkpoints_as_a_file(tmp):
    (tmp / "o").mkdir()
    (tmp / "o" / "checkpoints").write_text("not a folder")
    return tmp / "o"


def _a_folder_named(tmp, name):
    # Found only when written, after the whole training (exit 1, the run's results lost).
    (tmp / "o" / name).mkdir(parents=True)
    return tmp / "o"


def _without_checkpoints(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints")
    return dst


def _foreign_metrics(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "metrics.jsonl").write_text('{"loss": 0.5}\n')
    return tmp / "mine"


def _results_only(tmp):
    (tmp / "done").mkdir()
    (tmp / "done" / "results.json").write_text('{"history": []}')
    return tmp / "done"


def _with_an_empty_step(src, dst):
    shutil.copytree(src, dst)
    (dst / "checkpoints" / "3").mkdir()  # an interrupted copy
    return dst


def _with_a_file_as_a_step(src, dst):
    shutil.copytree(src, dst)
    (dst / "checkpoints" / "3").write_text("someone's notes")  # Orbax would delete it when saving epoch 3
    return dst


def _someones_file(tmp):
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "home" / "bashrc").write_text("alias ll='ls -l'\n")
    return tmp / "home" / "bashrc"


def _with_a_link(src, dst, name, target):
    """A copy of the run whose ``name`` is a symbolic link to ``target`` (a run folder from elsewhere)."""
    shutil.copytree(src, dst)
    if (dst / name).is_dir():
        shutil.rmtree(dst / name)
    else:
        (dst / name).unlink(missing_ok=True)
    (dst / name).symlink_to(target)
    return dst


def _photos(tmp):
    for year in ("2019", "2020"):
        (tmp / "photos" / year).mkdir(parents=True)
        (tmp / "photos" / year / "beach.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return tmp / "photos"


def _fifo(tmp, name):
    os.mkfifo(tmp / name)  # stands for /dev/null, which a rename (as root) would replace
    return tmp / name


def _text_as_png(tmp):
    (tmp / "notes.png").write_text("not an image")
    return tmp / "notes.png"


def _photo(tmp):
    from PIL import Image

    (tmp / "photos").mkdir()  # in a folder: the case's copies are checked unchanged
    Image.new("L", (28, 28), 200).save(tmp / "photos" / "shirt.png")
    return tmp / "photos" / "shirt.png"


def _png_as_npy(tmp):
    from PIL import Image

    Image.new("L", (28, 28)).save(tmp / "x.npy", format="PNG")
    return tmp / "x.npy"


def _object_npy(tmp):
    np.save(tmp / "objects.npy", np.array([{"image": 0}], dtype=object), allow_pickle=True)
    return tmp / "objects.npy"


def _npz(tmp):
    np.savez(tmp / "x.npz", images=np.zeros((1, 28, 28, 1), np.uint8))
    return tmp / "x.npz"


# (argv builder, exit code, text in the one line on stderr)
ERRORS = {
    "evaluate-missing-dir": (lambda run, d, t: ["evaluate", t / "nowhere"], 1, "holds no checkpoints"),
    "evaluate-corrupt": (lambda run, d, t: ["evaluate", _garbled(run, t / "c")], 1, "unreadable (corrupt"),
    "evaluate-no-best": (lambda run, d, t: ["evaluate", _copy_without_best(run, t / "c"), "--which", "best"], 1,
                         "has no best checkpoint (the run was trained without --val-split)"),
    "evaluate-empty-best": (lambda run, d, t: ["evaluate", _copy_without_best(run, t / "c", empty=True), "--which", "best"], 1,
                            "has no best checkpoint (its best/ is empty: the run stopped before saving one; --resume writes it)"),
    "predict-missing-image": (lambda run, d, t: ["predict", run, t / "nope.png"], 1, "nope.png"),
    "predict-not-an-image": (lambda run, d, t: ["predict", run, _text_as_png(t)], 1, "notes.png"),
    "predict-a-file-as-the-run": (lambda run, d, t: ["predict", _text_as_png(t), _text_as_png(t)], 1,
                                  "notes.png is a file, not a run directory"),
    "predict-png-named-npy": (lambda run, d, t: ["predict", run, _png_as_npy(t)], 1,
                              "x.npy: not a readable .npy array (not an .npy file)"),
    "predict-an-object-npy": (lambda run, d, t: ["predict", run, _object_npy(t)], 1,
                              "objects.npy: not a readable .npy array (an array of Python objects"),
    "predict-an-npz": (lambda run, d, t: ["predict", run, _npz(t)], 1,
                       "x.npz: not an image file Pillow can read; arrays go in .npy files"),
    "init-from-a-folder": (lambda run, d, t: [*_train_args(d, t / "o"), "--init-from-torch", t], 1,
                           "is a directory, not a file"),
    "predict-top-k-0": (lambda run, d, t: ["predict", run, t / "x.png", "--top-k", 0], 2, "--top-k must be in 1..10"),
    # (--resume on an empty or new folder starts the run: test_resume_starts_a_run_that_has_no_checkpoint_yet...)
    "resume-results-without-checkpoint": (lambda run, d, t: [*_train_args(d, _results_only(t)), "--resume"], 1,
                                          "--resume: no checkpoint in"),
    "resume-with-another-val-split": (lambda run, d, t: [*_train_args(d, _copy_without_best(run, t / "c")), "--resume",
                                                         "--val-split", 16], 1, "val_split"),
    "resume-corrupt": (lambda run, d, t: [*_train_args(d, _garbled(run, t / "c")), "--resume", "--epochs", 3], 1,
                       "--resume: checkpoint"),
    "checkpoints-is-a-file": (lambda run, d, t: _train_args(d, _checkpoints_as_a_file(t)), 1,
                              "checkpoints is not a folder"),
    "results-json-is-a-folder": (lambda run, d, t: _train_args(d, _a_folder_named(t, "results.json")), 1,
                                 "results.json is a folder, and the run writes its results there"),
    "curves-png-is-a-folder": (lambda run, d, t: _train_args(d, _a_folder_named(t, "curves.png")), 1,
                               "curves.png is a folder, and the run writes its curves there"),
    "resume-with-a-file-as-epoch-3": (lambda run, d, t: [*_train_args(d, _with_a_file_as_a_step(run, t / "c")), "--resume",
                                                         "--epochs", 3], 1,
                                      "is a file where the checkpoint of epoch 3 would be; move it elsewhere"),
    # A run folder from elsewhere, with links in it: Orbax's rotation deleted ~/photos/2019 and 2020
    # through best/; the lock's holder and metrics.jsonl emptied and overwrote ~/.bashrc.
    "resume-best-a-link-to-numbered-folders": (lambda run, d, t: [*_train_args(d, _with_a_link(run, t / "c", "best", _photos(t))),
                                                                  "--resume", "--epochs", 3], 1,
                                               "best/2019 is a folder where the checkpoint of epoch 2019 would be that "
                                               "holds none of a checkpoint's items (meta, state), and rotating "
                                               "checkpoints would delete it; move it elsewhere"),
    "resume-best-a-link-into-another-run": (lambda run, d, t: [*_train_args(d, _with_a_link(run, t / "c", "best",
                                                                                              shutil.copytree(run, t / "other") / "checkpoints")),
                                                               "--resume", "--epochs", 3], 1,
                                            "best is a symbolic link into another run's folder"),
    "resume-a-step-a-link": (lambda run, d, t: [*_train_args(d, _with_a_link(run, t / "c", "checkpoints/7", _photos(t))),
                                                "--resume", "--epochs", 3], 1,
                             "checkpoints/7 is a symbolic link where the checkpoint of epoch 7 would be (rotating "
                             "checkpoints would delete what it points to); move it elsewhere"),
    "resume-lock-a-link": (lambda run, d, t: [*_train_args(d, _with_a_link(run, t / "c", ".train.lock", _someones_file(t))),
                                              "--resume", "--epochs", 3], 1,
                           "cannot use its lock file .train.lock: is a symbolic link, not a lock file: remove it"),
    "resume-metrics-a-link": (lambda run, d, t: [*_train_args(d, _with_a_link(run, t / "c", "metrics.jsonl", _someones_file(t))),
                                                 "--resume", "--epochs", 3], 1,
                              "its metrics.jsonl is a symbolic link to"),
    "resume-other-lr": (lambda run, d, t: [*_train_args(d, run), "--resume", "--lr", 0.1], 1,
                        "lr (checkpoint 0.05, now 0.1) (only --data-dir, --epochs, --eval-batch-size, --export-torch, "
                        "--keep, --log-every, --manual-dir, --offline and --output may change)"),
    "resume-fewer-epochs": (lambda run, d, t: [*_train_args(d, run), "--resume", "--epochs", 1], 1,
                            "has trained 2 epochs, more than --epochs 1"),
    "output-holds-a-run": (lambda run, d, t: _train_args(d, run), 1, "already holds a run"),
    "output-holds-a-runs-results": (lambda run, d, t: _train_args(d, _without_checkpoints(run, t / "c")), 1,
                                    "already holds another run's results.json, curves.png, best"),
    "output-holds-someone-elses-metrics": (lambda run, d, t: _train_args(d, _foreign_metrics(t)), 1,
                                           "holds a metrics.jsonl that train.py did not write"),
    "evaluate-incomplete-checkpoint": (lambda run, d, t: ["evaluate", _with_an_empty_step(run, t / "c")], 1,
                                       "checkpoints/3 is incomplete (no meta/ and no state/); remove it to use the "
                                       "checkpoint of epoch 2"),
    "evaluate-png-over-the-results": (lambda run, d, t: ["evaluate", run, "--confusion-png", run / "results.json"], 1,
                                      "results.json does not end in .png"),
    "evaluate-png-over-the-curves": (lambda run, d, t: ["evaluate", run, "--confusion-png", run / "curves.png"], 1,
                                     "curves.png is the training curves of the run in"),
    # A file of the user's at the name (a photo just passed to predict) was replaced without a word.
    "evaluate-png-over-a-users-picture": (lambda run, d, t: ["evaluate", run, "--confusion-png", _photo(t)], 1,
                                          "photos/shirt.png exists and is not a confusion matrix that evaluate wrote"),
    "evaluate-png-onto-a-fifo": (lambda run, d, t: ["evaluate", run, "--confusion-png", _fifo(t, "cm.png")], 1,
                                 "exists and is not a regular file"),
    "export-onto-a-fifo": (lambda run, d, t: [*_train_args(d, t / "o"), "--export-torch", _fifo(t, "w.pt")], 1,
                           "exists and is not a regular file"),
    "evaluate-data-dir-a-file": (lambda run, d, t: ["evaluate", run, "--data-dir", _text_as_png(t)], 1,
                                 "notes.png is not a directory"),
    # TFDS prepared the data in a folder the run then took for its latest checkpoint ("incomplete").
    "evaluate-data-dir-among-the-checkpoints": (lambda run, d, t: ["evaluate", run, "--data-dir", run / "checkpoints" / "7"],
                                                1, "checkpoints/7 is among the checkpoints of the run in"),
    "evaluate-no-data-offline": (lambda run, d, t: ["evaluate", run, "--data-dir", t / "empty", "--offline"], 1,
                                 "downloads are off (--offline)"),
    "evaluate-png-under-a-file": (lambda run, d, t: ["evaluate", run, "--confusion-png", _text_as_png(t) / "cm.png"], 1,
                                  "--confusion-png's folder"),
    # An empty path fell back to the default, and a missing --manual-dir was ignored when the data was there.
    "evaluate-empty-data-dir": (lambda run, d, t: ["evaluate", run, "--data-dir", ""], 2,
                                "--data-dir is empty; give a path, or leave the flag out"),
    "evaluate-empty-png": (lambda run, d, t: ["evaluate", run, "--confusion-png", " "], 2,
                           "--confusion-png is empty; give a path, or leave the flag out"),
    "evaluate-missing-manual-dir": (lambda run, d, t: ["evaluate", run, "--data-dir", d, "--manual-dir", t / "nowhere"], 1,
                                    "nowhere is not a directory"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_every_mistake_is_one_line_and_a_nonzero_exit(run, prepared_data_dir, tmp_path, case):
    build, code, text = ERRORS[case]
    before = tree_digest(run[0])
    argv = build(run[0], prepared_data_dir, tmp_path)
    copies = {t: tree_digest(t) for t in tmp_path.iterdir() if t.is_dir()}  # what a case copied to act on
    rc, out, err = _main(*argv)
    # No thread of Orbax's outlives the command: one still running at the interpreter's exit
    # prints a traceback after the one line (its temporary-folder cleanup did, 7 runs in 10).
    assert not [t.name for t in threading.enumerate() if "_target_setting_result" in t.name]
    # One line, after at most the data report (a corrupt checkpoint shows once the data are loaded).
    lines = [line for line in err.strip().splitlines() if not line.startswith("data: ")]
    assert rc == code and len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err
    assert tree_digest(run[0]) == before  # nothing of the run was touched, byte for byte
    assert {t: tree_digest(t) for t in copies} == copies
    assert sorted(p for p in tmp_path.iterdir() if p.is_dir()) == sorted(copies)  # nor any folder created


def test_a_metrics_link_is_followed_to_a_stream_only(tmp_path):
    # A run writes metrics.jsonl from its first byte: through a link (a run folder from elsewhere)
    # it overwrote or created the file named, /dev/../ prefixes included. A FIFO or a terminal
    # (a live plotter, /dev/stderr) is where a user points it on purpose.
    from resnet_jax import rundir

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "bashrc").write_text("alias ll='ls -l'\n")
    os.mkfifo(tmp_path / "plotter")
    links = {"to-a-file": tmp_path / "home" / "bashrc", "to-nothing": tmp_path / "home" / ".profile",
             "through-dev": f"/dev/..{tmp_path / 'home' / 'bashrc'}", "to-a-fifo": tmp_path / "plotter",
             "to-dev-null": "/dev/null", "to-itself": tmp_path / "to-itself"}
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    said = {name: rundir.link_problem(tmp_path / name) for name in links}
    assert said["to-a-file"] == said["through-dev"] == f"is a symbolic link to {tmp_path / 'home' / 'bashrc'}, which a run would overwrite"
    assert said["to-nothing"] == f"is a symbolic link to {tmp_path / 'home' / '.profile'}, which does not exist, and a run would create it"
    assert "does not exist" in said["to-itself"]
    assert said["to-a-fifo"] is None and said["to-dev-null"] is None
    assert rundir.link_problem(tmp_path / "home" / "bashrc") is None  # a plain file: not a link


def test_evaluate_of_a_run_from_another_machine_reads_the_data_from_here(run, prepared_data_dir, tmp_path, monkeypatch):
    # Its --data-dir names a folder of that machine's: evaluate prepared the data there (a path a
    # file chose) when it could make it. Now TFDS's default, with a note.
    # Its --manual-dir likewise: TFDS would look for the release files there if the data were
    # not prepared here. The run's is passed on only where it is a folder here.
    def with_dirs(name, data_dir, manual_dir):
        copy = shutil.copytree(run[0], tmp_path / name)
        for path in copy.glob("*/*/meta/metadata"):
            meta = json.loads(path.read_text())
            meta["metadata"]["config"].update(data_dir=data_dir, manual_dir=manual_dir)
            path.write_text(json.dumps(meta))
        return copy

    manual_dirs, load = [], data.load

    def spy(spec, data_dir, manual_dir, *args, **kwargs):
        manual_dirs.append(manual_dir)
        return load(spec, data_dir, manual_dir, *args, **kwargs)

    monkeypatch.setattr(data, "load", spy)
    elsewhere = tmp_path / "alice" / "tensorflow_datasets"
    copy = with_dirs("c", str(elsewhere), str(tmp_path / "alice" / "fashion_mnist"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared_data_dir))
    rc, out, err = _main("evaluate", copy)
    assert rc == 0, err
    assert f"note: the run's --data-dir {elsewhere} is not a folder here, so the data come from {prepared_data_dir}" in err
    assert not (tmp_path / "alice").exists() and manual_dirs == [None]
    # One's own run: its --data-dir and --manual-dir as they were, and no note.
    own = with_dirs("own", str(prepared_data_dir), str(tmp_path))
    rc, out_own, err = _main("evaluate", own)
    assert rc == 0 and "is not a folder here" not in err, err
    assert manual_dirs == [None, str(tmp_path)]
    assert out_own.replace(str(own), "RUN") == out.replace(str(copy), "RUN")  # the same figures


def test_a_disk_too_full_for_one_checkpoint_is_refused_before_training(prepared_data_dir, tmp_path, one_mb_free):
    rc, out, err = _main(*_train_args(prepared_data_dir, tmp_path / "out"))
    assert rc == 1 and "only 1 MB free on its disk, and 2 checkpoints take about" in err  # latest and best (--val-split)
    assert "free some space, or choose another --output" in err and "epoch 1" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()



def test_a_read_only_checkpoints_folder_is_refused_before_training(run, prepared_data_dir, tmp_path, monkeypatch):
    # Found by the first save, it cost an epoch's work. (Simulated: root writes through permission bits;
    # test_checkpoint makes a folder read-only for real where the machine allows.)
    output = tmp_path / "out"
    shutil.copytree(run[0], output)
    before = tree_digest(output)
    real = tempfile.mkdtemp

    def read_only_mount(*args, dir=None, **kwargs):
        if Path(dir) == output / "checkpoints":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_mount)
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume", "--epochs", 3))
    assert rc == 1 and err.strip().splitlines()[-1] == (
        f"train.py: error: --output {output}: no checkpoint can be written in {output / 'checkpoints'}: "
        "Read-only file system; make it writable, or choose another --output")
    assert "epoch 3" not in err and tree_digest(output) == before


def test_older_checkpoints_that_cannot_be_removed_are_a_note_and_the_run_goes_on(run, prepared_data_dir, tmp_path, monkeypatch):
    # Orbax removes what --keep rotates away once the new checkpoint is whole: its failure there
    # stopped the run ("could not save the checkpoint of epoch 3 ...; the checkpoint of epoch 3 is intact").
    from orbax.checkpoint._src.path import deleter

    output = tmp_path / "out"
    shutil.copytree(run[0], output)

    def refused(self, steps):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(deleter.StandardCheckpointDeleter, "delete_steps", refused)
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume", "--epochs", 3, "--keep", 1))
    assert rc == 0, err
    assert (f"note: the checkpoint of epoch 3 is saved in {output / 'checkpoints'}, but removing the older ones "
            "stopped at epoch 1 (PermissionError: [Errno 1] Operation not permitted), whose folder may be left partly "
            "removed and is no checkpoint to use: remove it by hand; that of epoch 2, whole, was left too: remove it "
            "by hand as well") in err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 3
    monkeypatch.undo()
    assert Checkpoints(output, read_only=True).latest.all_steps() == [1, 2, 3]

def test_resuming_a_finished_run_changes_nothing_and_reports_its_results(run, prepared_data_dir, tmp_path):
    output = tmp_path / "done"
    shutil.copytree(run[0], output)
    before = tree_digest(output)
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume"))
    assert rc == 0, err
    assert "has trained all 2 epochs" in err and "nothing to do" in err
    assert json.loads(out) == json.loads((output / "results.json").read_text())  # --json: the run's own results
    assert tree_digest(output) == before  # results.json kept its timings; metrics.jsonl not rewritten


def test_resuming_a_run_stopped_after_its_last_checkpoint_writes_its_results(run, prepared_data_dir, tmp_path):
    # Stopped (Ctrl-C) after the checkpoint of its last epoch, before results.json was written;
    # or a longer run resumed with --epochs set to where it got (constant rate).
    output = tmp_path / "stopped"
    shutil.copytree(run[0], output)
    saved = json.loads((output / "results.json").read_text())
    (output / "results.json").unlink()
    (output / "curves.png").unlink()
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume"))
    assert rc == 0 and "Traceback" not in err, err
    written = json.loads((output / "results.json").read_text())
    assert json.loads(out) == written and (output / "curves.png").is_file()
    assert written["history"] == saved["history"]  # the epochs as trained, wall times included
    assert written["test_acc"] == saved["test_acc"] and written["train_loss"] == saved["train_loss"]


def test_curves_a_full_disk_stopped_are_written_by_the_next_resume(run, prepared_data_dir, tmp_path, monkeypatch):
    # On a full tmpfs curves.png failed after results.json was written: --resume then had
    # "nothing to do" and no command ever wrote the curves.
    import errno

    from resnet_jax import plots

    output = tmp_path / "full"
    shutil.copytree(run[0], output)
    saved = json.loads((output / "results.json").read_text())
    (output / "results.json").unlink()
    (output / "curves.png").unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_curves", full)
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume"))
    assert rc == 1 and err.strip().endswith("could not write " + str(output) + "/curves.png: No space left on device"), err
    assert not (output / "results.json").exists()
    monkeypatch.undo()  # space again
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume"))
    assert rc == 0 and "nothing to do" not in err, err
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((output / "results.json").read_text())["history"] == saved["history"]


def test_resuming_a_run_whose_results_are_an_earlier_epochs_writes_them_anew(run, prepared_data_dir, tmp_path):
    # A 1-epoch run extended with --resume --epochs 2 and stopped (Ctrl-C) after the checkpoint
    # of epoch 2, before its results: results.json and curves.png still describe epoch 1.
    output = tmp_path / "extended"
    shutil.copytree(run[0], output)
    saved = json.loads((output / "results.json").read_text())
    stale = {**saved, "epochs": 1, "history": saved["history"][:1]}
    (output / "results.json").write_text(json.dumps(stale))
    (output / "curves.png").write_bytes(b"the curves of epoch 1")
    rc, out, err = _main(*_train_args(prepared_data_dir, output, "--resume"))
    assert rc == 0 and "Traceback" not in err, err
    assert "nothing to do" not in err and "resuming from" in err
    written = json.loads((output / "results.json").read_text())
    assert json.loads(out) == written and written["history"] == saved["history"]
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_in_a_read_only_run_directory_reports_without_the_png(run, tmp_path, monkeypatch):
    from resnet_jax import commands

    output = tmp_path / "ro"
    shutil.copytree(run[0], output)
    real = commands.check_writable_dir

    def read_only(path, flag):  # as on a read-only mount (root writes through chmod, so it is simulated)
        if Path(path).resolve() == output.resolve():
            raise cli.UserError(f"{flag} {path} is not a writable directory: Read-only file system")
        real(path, flag)

    monkeypatch.setattr(commands, "check_writable_dir", read_only)
    before = tree_digest(output)
    rc, out, err = _main("evaluate", output, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["test_acc"] == run[1]["test_acc"] and report["confusion_png"] is None
    assert "is read-only, so no confusion-matrix PNG" in err
    assert tree_digest(output) == before


@pytest.mark.parametrize("asked", [True, False], ids=["--confusion-png", "the default png"])
@pytest.mark.parametrize("as_json", [True, False], ids=["--json", "text"])
def test_a_png_a_full_disk_stops_costs_the_png_not_the_evaluation(run, tmp_path, monkeypatch, asked, as_json):
    # On a full tmpfs the loss, accuracy and per-class table were computed, then lost with the PNG.
    import errno

    from resnet_jax import plots

    def full(cm, names, path, title):
        raise OSError(errno.ENOSPC, "No space left on device")

    png = tmp_path / "cm.png"
    plots.plot_confusion_matrix(np.eye(10, dtype=int), data.FASHION_MNIST.class_names, png)  # an earlier evaluation's
    earlier = png.read_bytes()
    monkeypatch.setattr(plots, "plot_confusion_matrix", full)
    rc, out, err = _main("evaluate", run[0], *(["--confusion-png", png] if asked else []), *(["--json"] if as_json else []))
    if as_json:
        report = json.loads(out)
        assert report["test_acc"] == run[1]["test_acc"] and report["confusion_png"] is None
    else:
        assert f"acc {run[1]['test_acc']:.4f}" in out and "accuracy per class:" in out and "confusion matrix:" not in out
    written = png if asked else run[0] / "confusion_latest.png"
    line = f"could not write {written}: No space left on device"
    if asked:
        assert png.read_bytes() == earlier
        assert rc == 1 and err.strip().splitlines()[-1] == (f"train.py evaluate: error: {line} (the cm.png there is an "
                                                            "earlier evaluation's, left as it was)"), err
    else:
        assert rc == 0 and f"note: {line}" in err and "; no confusion-matrix PNG of this evaluation" in err, err


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_any_work(prepared_data_dir, tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 3)
    rc, out, err = _main(*_train_args(prepared_data_dir, tmp_path / "out"))
    assert rc == 1 and err.strip() == ("train.py: error: --batch-size 32 does not split evenly over the 3 devices; "
                                       "use a multiple of 3")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_refuses_more_epochs_when_the_schedule_spans_the_planned_ones(prepared_data_dir, tmp_path):
    output = tmp_path / "cos"
    args = [*_train_args(prepared_data_dir, output, "--schedule", "cosine"), "--epochs", 1]
    rc, out, err = _main(*args)
    assert rc == 0, err
    before = tree_digest(output)
    rc, out, err = _main(*args, "--resume", "--epochs", 2)
    assert rc == 1 and "planned for 1 epoch and" in err and "cosine" in err and err.count("\n") == 1
    assert tree_digest(output) == before
    rc, out, err = _main(*args, "--resume")  # the same plan: nothing left to train, and that is fine
    assert rc == 0, err


def test_resume_starts_a_run_that_has_no_checkpoint_yet_and_refuses_results_without_one(prepared_data_dir, tmp_path):
    # "A script may always pass --resume": on a new folder it said "no checkpoint to continue from".
    output = tmp_path / "new"
    args = [*_train_args(prepared_data_dir, output), "--epochs", 1, "--resume"]
    rc, out, err = _main(*args)
    assert rc == 0, err
    assert f"--resume: {output} holds no checkpoint yet: starting the run at epoch 1" in err  # (--json: notes on stderr)
    assert (output / "checkpoints" / "1").is_dir() and (output / "results.json").is_file()
    rc, out, err = _main(*args)
    assert rc == 0 and "nothing to do" in err, err
    # Results but no checkpoint (removed by hand): nothing to continue, and not a place to start.
    shutil.rmtree(output / "checkpoints")
    before = tree_digest(output)
    rc, out, err = _main(*args)
    assert rc == 1 and err.strip().splitlines() == [f"train.py: error: --resume: no checkpoint in {output} to continue from"]
    assert tree_digest(output) == before


def test_resume_saves_the_best_epoch_a_kill_between_its_two_saves_left_out(prepared_data_dir, tmp_path):
    # Killed after epoch 1's checkpoint and before its best/ copy: --resume keeps best/ right and says so.
    output = tmp_path / "out"
    args = [*_train_args(prepared_data_dir, output), "--epochs", 1]
    rc, out, err = _main(*args)
    assert rc == 0, err
    shutil.rmtree(output / "best")
    rc, out, err = _main(*args, "--resume")
    assert rc == 0 and "best: saved epoch 1, the best so far, which the interrupted run had not" in err, err
    assert Checkpoints(output, read_only=True).best.all_steps() == [1]


def test_train_py_routes_exactly_the_commands_that_exist():
    from resnet_jax import commands

    # cli keeps the names without importing commands (a training run never loads it).
    assert set(cli.COMMANDS) == set(commands.COMMANDS)


def test_resume_without_output_is_a_bad_flag(capsys):
    assert cli.main(["--resume"]) == 2
    assert "--resume needs --output DIR" in capsys.readouterr().err


@pytest.mark.parametrize("flag,why", [("--keep", "it counts the checkpoints kept there"),
                                      ("--log-every", "its records go to DIR/metrics.jsonl")])
def test_flags_for_the_output_folder_need_one(capsys, flag, why):
    # Without --output they did nothing, and the run said nothing of it.
    assert cli.main([flag, "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"train.py: error: {flag} needs --output DIR ({why})"]


def test_a_momentum_sweep_down_to_zero_is_told_how_under_the_best_recipe(capsys):
    # --recipe best turns Nesterov on: "--nesterov needs a --momentum > 0" named a flag never given.
    assert cli.main(["--recipe", "best", "--momentum", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: --nesterov needs a --momentum > 0 (--recipe best turns it on: add --no-nesterov for plain SGD)"]


def test_the_real_entry_point_documents_and_refuses():
    def train_py(*args):
        return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    r = train_py("--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "--val-split" in r.stdout and "train.py evaluate" in r.stdout
    for command, flags in (("evaluate", ("--which", "--confusion-png", "--json")), ("predict", ("--top-k", "FILE"))):
        r = train_py(command, "--help")
        assert r.returncode == 0 and all(f in r.stdout for f in flags), r.stdout
    r = train_py("evaluate", REPO / "no_such_run")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_nan_loss_is_one_line_naming_the_step_and_the_kept_checkpoint(run, prepared_data_dir, tmp_path, monkeypatch):
    output = tmp_path / "out"
    shutil.copytree(run[0], output)

    def fit_that_diverges(*args, **kwargs):  # what fit raises when a step's loss is NaN (tests/test_checkpoint.py)
        raise training.NonFiniteLoss(7, 7, 3, float("nan"))

    monkeypatch.setattr(training, "fit", fit_that_diverges)
    args = [a for a in _train_args(prepared_data_dir, output, "--resume", "--epochs", 3) if a != "--json"]
    rc, out, err = _main(*args)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "loss became nan at step 7 (epoch 3)" in err and "last good checkpoint (epoch 2)" in err
    # The advice can be followed: --resume would keep the lr, so a new folder (it said "try a smaller --lr").
    assert "train again with a smaller --lr in a new --output (a resumed run keeps its --lr)" in err
    assert Checkpoints(output).latest.all_steps() == [1, 2]
    # With no checkpoint kept, the same folder takes a new run: no new folder asked for.
    rc, out, err = _main(*[a for a in _train_args(prepared_data_dir, tmp_path / "fresh") if a != "--json"])
    assert rc == 1 and err.strip().endswith("no checkpoint was written; train again with a smaller --lr"), err


def test_out_of_device_memory_is_one_line_naming_the_flags(prepared_data_dir, tmp_path, monkeypatch):
    from resnet_jax import training

    def fit(*a, **k):  # what XLA:CPU raised at --resize 512 --batch-size 4096 (2026-12-04)
        raise RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 681883436880 bytes.")

    monkeypatch.setattr(training, "fit", fit)
    rc, out, err = _main(*_train_args(prepared_data_dir, tmp_path / "out"))
    lines = [line for line in err.strip().splitlines() if not line.startswith("data: ")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "out of memory on cpu: 681.9 GB needed at once; try a smaller --batch-size, --eval-batch-size or --resize" in lines[0]


def test_out_of_memory_with_a_checkpoint_kept_advises_what_resume_takes(run, prepared_data_dir, tmp_path, monkeypatch):
    # It said "try a smaller --batch-size, --eval-batch-size or --resize; the checkpoint of epoch 2
    # ... is intact", and --resume refused each of them: an evaluation that ran out of memory
    # could not be continued at all.
    import shutil

    from resnet_jax import training

    output = tmp_path / "run"
    shutil.copytree(run[0], output)
    resume = [*_train_args(prepared_data_dir, output, "--resume", "--epochs", 3)]
    real_fit = training.fit

    def fit(*a, **k):
        raise RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 1342482640 bytes.")

    monkeypatch.setattr(training, "fit", fit)
    rc, out, err = _main(*resume)
    assert rc == 1 and "Traceback" not in err, err
    assert (f"out of memory on cpu: 1.3 GB needed at once; the checkpoint of epoch 2 in {output} is intact: "
            "--resume continues it with a smaller --eval-batch-size; a smaller --batch-size or --resize is a new run, "
            "in a new --output") in err
    monkeypatch.setattr(training, "fit", real_fit)
    rc, out, err = _main(*[a if a != "32" or i != resume.index("--eval-batch-size") + 1 else "16"
                           for i, a in enumerate(resume)])
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["history"][-1]["epoch"] == 3
    assert load_for_inference(output).config.eval_batch_size == 16


def test_evaluate_and_predict_out_of_memory_is_one_line_and_their_batch_can_shrink(run, tmp_path, monkeypatch):
    # Both printed XLA's 30-50 line traceback, and had no flag to take less memory.
    from resnet_jax import training

    output, final = run
    rc, out, err = _main("evaluate", output, "--json", "--eval-batch-size", 5, "--confusion-png", tmp_path / "cm.png")
    assert rc == 0, err
    report = json.loads(out)
    assert report["examples"] == 48 and report["test_acc"] == final["test_acc"]
    assert report["test_loss"] == pytest.approx(final["test_loss"], rel=1e-5)  # summed in other groups
    images = tmp_path / "x.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8))
    rc, out, err = _main("predict", output, images, "--json", "--eval-batch-size", 2)
    small = json.loads(out)["predictions"]
    rc, out, err = _main("predict", output, images, "--json")
    assert [p["top_k"][0]["index"] for p in small] == [p["top_k"][0]["index"] for p in json.loads(out)["predictions"]]
    for command in (["predict", tmp_path / "no_run", images], ["evaluate", tmp_path / "no_run"]):  # before any work
        with pytest.raises(SystemExit) as exit_:
            _main(*command, "--eval-batch-size", 0)
        assert exit_.value.code == 2

    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1303566592 bytes.")

    monkeypatch.setattr(training, "evaluate_split", oom)
    monkeypatch.setattr(training, "predict", oom)
    for argv in (["evaluate", output, "--confusion-png", tmp_path / "cm2.png"], ["predict", output, images]):
        rc, out, err = _main(*argv)
        lines = [line for line in err.strip().splitlines() if not line.startswith("checkpoint ")]  # (what was loaded)
        assert rc == 1 and "Traceback" not in err, err
        assert lines == [f"train.py {argv[0]}: error: out of memory on cpu: 1.3 GB needed at once; "
                         "try a smaller --eval-batch-size"], err
        assert not (tmp_path / "cm2.png").exists()


def test_other_runtime_errors_are_not_called_out_of_memory(prepared_data_dir, tmp_path, monkeypatch):
    from resnet_jax import training

    def fit(*a, **k):
        raise RuntimeError("INTERNAL: something else")

    monkeypatch.setattr(training, "fit", fit)
    with pytest.raises(RuntimeError, match="something else"):
        _main(*_train_args(prepared_data_dir, tmp_path / "out"))


@pytest.mark.parametrize("text,foreign", [
    ("", False),  # a run stopped at once
    ('{"kind": "steps", "epoch": 1, "step": 1, "train_loss": 2.3, "train_acc": 0.1, "examples": 64}\n'
     '{"kind": "epoch", "epoch": 1, "step": 1, "train_loss": 2.3, "train_acc": 0.1, "test_acc": 0.1}\n', False),  # ours
    ('{"kind": "epoch"}\n{"kind": "steps", "loss": 2.3}\n', True),  # someone else's records with a "kind"
    ('{"loss": 0.5}\n', True),
    ("epoch,loss\n1,0.5\n", True),
    ('{"kind": "steps"}\n[1, 2]\n', True),
])
def test_a_metrics_file_is_ours_only_if_every_line_is_our_record(tmp_path, text, foreign):
    (tmp_path / "metrics.jsonl").write_text(text)
    assert rundir.foreign_metrics(tmp_path / "metrics.jsonl") is foreign
    assert rundir.foreign_metrics(tmp_path / "absent.jsonl") is False


def test_a_metrics_file_that_cannot_be_written_mid_run_is_one_line(prepared_data_dir, tmp_path):
    # /dev/full accepts the open and fails every write with ENOSPC: a disk filled by another program.
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    rc, _, err = _main(*_train_args(prepared_data_dir, out))  # --json: the progress lines go to stderr too
    assert rc == 1 and "Traceback" not in err and "epoch 2/2" not in err, err
    assert err.strip().splitlines()[-1] == (f"train.py: error: cannot write {out / 'metrics.jsonl'}: "
                                            "No space left on device; no checkpoint was written")


def _train_py(*args, **popen):
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, **popen)


def test_a_closed_stdout_ends_predict_quietly_and_a_full_one_in_one_line(run, tmp_path):
    # `train.py predict RUN x.npy | head -2` printed a 20-line BrokenPipeError traceback.
    output, _ = run
    np.save(tmp_path / "many.npy", np.random.default_rng(0).integers(0, 256, (4000, 28, 28), np.uint8))
    p = _train_py("predict", output, tmp_path / "many.npy", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(f"{tmp_path / 'many.npy'}[0]: ")
    p.stdout.close()  # what `| head -1` does; 4,000 lines do not fit in the pipe's buffer
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=300) == console.EXIT_PIPE and "Traceback" not in err and "Exception ignored" not in err, err
    assert len(err.strip().splitlines()) == 1  # the checkpoint's line, on stderr before the predictions

    with open("/dev/full", "w") as full:
        p = _train_py("evaluate", output, "--offline", stdout=full, stderr=subprocess.PIPE)
        err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=300) == 1 and err.strip().splitlines() == [
        "train.py evaluate: error: cannot write to stdout: No space left on device"], err


def test_a_closed_stdout_does_not_stop_the_training(prepared_data_dir, tmp_path):
    # `train.py --output DIR | head -3`: the first line after head left raised BrokenPipeError
    # inside the epoch's report, and the run stopped before that epoch's checkpoint.
    out = tmp_path / "run"
    args = [a for a in _train_args(prepared_data_dir, out, "--epochs", 3) if a != "--json"]
    p = _train_py(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith("data: ")
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=300) == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    assert f"train.py: note: cannot write to stdout (Broken pipe): the run goes on without its lines; its records go on to {out}/metrics.jsonl" in err
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "results.json").read_text())["history"][-1]["epoch"] == 3


def test_a_closed_stderr_neither_stops_training_nor_costs_predict_its_result(run, prepared_data_dir, tmp_path):
    # `train.py 2>&-`: sys.stderr was None and the progress bar crashed the run (exit 1);
    # `predict ... 2>/dev/full`: the checkpoint's line on stderr failed and took the predictions with it.
    out = tmp_path / "run"
    p = subprocess.Popen(["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, str(REPO / "train.py"),
                          *_train_args(prepared_data_dir, out)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    final, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and json.loads(final)["history"][-1]["epoch"] == 2
    assert json.loads((out / "results.json").read_text())["history"][-1]["epoch"] == 2

    output, _ = run
    np.save(tmp_path / "two.npy", np.zeros((2, 28, 28), np.uint8))
    with open("/dev/full", "w") as full:
        p = _train_py("predict", output, tmp_path / "two.npy", stdout=subprocess.PIPE, stderr=full)
        predictions, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and len(predictions.strip().splitlines()) == 2, predictions
