"""Checkpoints and exact resume, on tiny synthetic splits through training.fit (the CLI is tests/test_commands.py)."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tree_digest
from resnet_jax import checkpoint, training
from resnet_jax.checkpoint import CheckpointError, Checkpoints
from resnet_jax.config import Config
from resnet_jax.data import CIFAR10, FASHION_MNIST, Split
from resnet_jax.model import ResNet18
from resnet_jax.recipes import BEST

# 72 = 2 x 32 + 8: two full batches and the smaller last one, so both step programs run.
CONFIG = Config(resize=17, batch_size=32, eval_batch_size=32, epochs=3, seed=7, log_every=2, val_split=16)
TIMINGS = ("epoch_train_s", "examples_per_sec", "wall_s")
# A refused corrupt checkpoint leaves Orbax's pending reads to be collected; pytest would report each.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _split(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    # Learnable: brightness says the class, so the loss moves and the val accuracy changes.
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 30, (n, 20, 20, 1)), 0, 255).astype(np.uint8)
    return Split(images, labels)


TRAIN, VAL, TEST = _split(72, 0), _split(16, 1), _split(32, 2)


def _fresh_state(config=CONFIG, num_classes=10, channels=1):
    model = training.make_model(config, num_classes, channels)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    tx = training.make_optimizer(config, steps_per_epoch=3)  # TRAIN: 72 examples in batches of 32
    assert not config.recipe.scheduled or config.steps_per_epoch == 3
    return training.create_train_state(model, tx, key, recipe=config.recipe)


def _train(config, directory, state=None, history=None, log=None, stop_at=None, train=TRAIN):
    """fit with a checkpoint after every epoch, as the CLI does; ``stop_at=(epoch, step)`` raises Ctrl-C there."""
    ckpts = Checkpoints(directory, keep=2, track_best=True)
    meta = checkpoint.metadata(config, FASHION_MNIST)
    log = list(log or [])

    def on_progress(done, total, last):
        if stop_at and len(epochs_seen) + 1 == stop_at[0] and done >= stop_at[1]:
            raise KeyboardInterrupt

    epochs_seen = list(history or [])
    hooks = training.Hooks(
        on_progress=on_progress,
        on_epoch=lambda rec: (epochs_seen.append(rec), log.append({"kind": "epoch", **rec})),
        on_log=lambda rec: log.append({"kind": "steps", **rec}),
        on_checkpoint=lambda state, hist: ckpts.save(state, hist[-1]["epoch"], hist, log, meta),
    )
    result = training.fit(config, train, TEST, state or _fresh_state(config), hooks, val=VAL, history=history)
    return result, log


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def _without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


# --recipe best keeps more than the chapter's recipe: momentum, the EMA weights and statistics,
# the augmentation key, and a schedule that depends on the step.
# train_limit: the schedule counts the steps of TRAIN's 72 = 88 - 16 examples (fit checks it).
BEST_CONFIG = CONFIG.replace(recipe=BEST, train_limit=88)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    result, log = _train(CONFIG, directory)
    return directory, result, log


@pytest.fixture(scope="module")
def uninterrupted_best(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight-best")
    result, log = _train(BEST_CONFIG, directory, _fresh_state(BEST_CONFIG))
    return directory, result, log


@pytest.mark.parametrize("recipe, stop_at", [("d2l", (2, 1)), ("d2l", (3, 3)), ("best", (2, 1))],
                         ids=["mid-epoch-2", "end-of-epoch-3-before-save", "best-mid-epoch-2"])
def test_interrupted_and_resumed_run_is_bitwise_the_uninterrupted_one(request, tmp_path, recipe, stop_at):
    config = BEST_CONFIG if recipe == "best" else CONFIG
    _, straight, straight_log = request.getfixturevalue("uninterrupted_best" if recipe == "best" else "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        _train(config, tmp_path, _fresh_state(config), stop_at=stop_at)
    # What Ctrl-C leaves: the checkpoint of the last epoch completed.
    ckpts = Checkpoints(tmp_path, keep=2)
    assert ckpts.latest_epoch() == stop_at[0] - 1
    restored = ckpts.restore(_fresh_state(config))  # a fresh process would build this template
    assert restored.epoch == stop_at[0] - 1 and len(restored.history) == restored.epoch

    resumed, log = _train(config, tmp_path, restored.state, restored.history, restored.log)
    assert _leaves_equal(resumed.state.params, straight.state.params)
    assert _leaves_equal(resumed.state.batch_stats, straight.state.batch_stats)
    assert _leaves_equal(resumed.state.opt_state, straight.state.opt_state)
    assert _leaves_equal(resumed.state, straight.state)  # and every other array: EMA, augmentation key
    if recipe == "best":
        assert resumed.state.ema_params is not None and resumed.state.aug_key is not None
        assert not _leaves_equal(resumed.state.ema_params, resumed.state.params)
    assert int(resumed.state.step) == int(straight.state.step) == 3 * 3
    assert _without_timings(resumed.history) == _without_timings(straight.history)
    assert _without_timings(log) == _without_timings(straight_log)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "val_acc"):
        assert resumed.final[key] == straight.final[key], key


def test_latest_k_and_best_by_validation(uninterrupted):
    directory, result, log = uninterrupted
    ckpts = Checkpoints(directory, read_only=True)
    assert ckpts.latest.all_steps() == [2, 3]  # keep=2
    val = [r["val_acc"] for r in result.history]
    best_epoch = 1 + val.index(max(val))  # the first epoch of the highest val accuracy
    assert ckpts.best.all_steps() == [best_epoch]
    best = ckpts.restore(_fresh_state(), which="best")
    assert best.epoch == best_epoch and best.history == result.history[:best_epoch]
    latest = ckpts.restore(_fresh_state())
    assert _leaves_equal(latest.state, result.state)
    # Each record's validation figures are the validation split's, measured on that epoch's state,
    # not the test set's (which would then choose the best checkpoint).
    for state, record in ((best.state, result.history[best_epoch - 1]), (latest.state, result.history[-1])):
        on_val, on_test = (training.evaluate_split(CONFIG, state, split) for split in (VAL, TEST))
        assert (record["val_loss"], record["val_acc"]) == (on_val["loss"], on_val["acc"])
        assert (record["test_loss"], record["test_acc"]) == (on_test["loss"], on_test["acc"])
        assert record["val_loss"] != record["test_loss"]
    assert latest.log == log and latest.metadata["num_classes"] == 10 and latest.metadata["input_channels"] == 1
    assert latest.config == CONFIG


def test_step_log_is_every_n_steps_within_each_epoch(uninterrupted):
    _, _, log = uninterrupted
    steps = [r["step"] for r in log if r["kind"] == "steps"]
    # 3 steps per epoch, log every 2: a record when a multiple of 2 is crossed, reset at each
    # epoch, and one for the epoch's steps after its last record (steps 3 and 9 were in none).
    assert steps == [2, 3, 4, 6, 8, 9]
    epoch2 = [r for r in log if r["kind"] == "steps" and r["epoch"] == 2]
    assert [r["examples"] for r in epoch2] == [32, 40]  # step 4 alone; steps 5-6 (32 + 8 examples)
    for epoch in (1, 2, 3):  # every example of the epoch in one record
        assert sum(r["examples"] for r in log if r["kind"] == "steps" and r["epoch"] == epoch) == 72


def test_nan_loss_stops_with_its_step_and_keeps_the_good_checkpoint(uninterrupted, tmp_path, monkeypatch):
    directory, before, ckpts, restored = _copy_restored(uninterrupted, tmp_path)
    assert restored.epoch == 3
    # An out-of-range label makes that example's cross-entropy NaN, at a step known in advance
    # (fit refuses such labels up front: the check is skipped here to reach a NaN mid-run).
    monkeypatch.setattr(training, "_check_split", lambda *args: None)
    bad = 5
    labels = TRAIN.labels.copy()
    labels[bad] = 99
    poisoned = Split(TRAIN.images, labels)
    with pytest.raises(training.NonFiniteLoss) as caught:
        _train(CONFIG.replace(epochs=4), directory, restored.state, restored.history, restored.log, train=poisoned)
    # Epoch 4 (index 3) draws its permutation from (seed, 3): the bad example's batch is the step.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(CONFIG.seed), 1), 3)
    position = int(np.flatnonzero(np.asarray(jax.random.permutation(key, len(TRAIN))) == bad)[0])
    step = 9 + position // CONFIG.batch_size + 1
    assert caught.value.first_step == caught.value.last_step == step  # one step per dispatch on CPU
    assert f"step {step}" in str(caught.value) and "nan" in str(caught.value)
    assert tree_digest(directory) == before
    again = Checkpoints(directory, read_only=True).restore(_fresh_state())
    assert again.epoch == 3 and _leaves_equal(again.state, restored.state)


def _copy_restored(uninterrupted, tmp_path):
    """A copy of the 3-epoch run: its folder, that folder's digest, its Checkpoints, its latest checkpoint."""
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    ckpts = Checkpoints(directory, keep=2)
    before = tree_digest(directory)  # with the lock file that ckpts holds while open
    return directory, before, ckpts, ckpts.restore(_fresh_state())


def _save_as_epoch_4(ckpts, restored):
    ckpts.save(restored.state, 4, restored.history + [{**restored.history[-1], "epoch": 4}], [], restored.metadata)


# A full disk as Python says it, and as TensorStore (Orbax's array writer) said it on a full tmpfs,
# where the first 200 characters of the message never got to the disk being full.
DISK_FULL = {
    "OSError": OSError(errno.ENOSPC, "No space left on device"),
    "TensorStore": ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/runs/r/checkpoints/2.orbax-checkpoint-tmp/state.orbax-'
        'checkpoint-tmp/_sharding": Failed writing: "/runs/r/checkpoints/2.orbax-checkpoint-tmp/state.orbax-'
        'checkpoint-tmp/_sharding.__lock": Failed to write 2493762 bytes to file 4: No space left on device '
        "[os_error_code='28']"
    ),
}


@pytest.mark.parametrize("error", DISK_FULL)
def test_a_failed_save_keeps_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch, error):
    import orbax.checkpoint as ocp

    directory, before, ckpts, restored = _copy_restored(uninterrupted, tmp_path)

    def disk_full(*args, **kwargs):
        raise DISK_FULL[error]

    # The arrays are written first; the disk fills up while the JSON item is written.
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", disk_full)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"in \S+/checkpoints: No space left on device; the checkpoint of epoch 3 is intact$"):
        _save_as_epoch_4(ckpts, restored)
    monkeypatch.undo()
    reopened = Checkpoints(directory, keep=2)  # as the next run would: leftovers of the failed save are cleaned
    assert reopened.latest.all_steps() == [2, 3]
    assert tree_digest(directory) == before
    assert _leaves_equal(reopened.restore(_fresh_state()).state, restored.state)


def test_a_disk_without_room_for_the_checkpoint_is_found_before_writing(uninterrupted, tmp_path, one_mb_free):
    directory, before, ckpts, restored = _copy_restored(uninterrupted, tmp_path)
    with pytest.raises(CheckpointError, match=r"epoch 4 .*: only 1 MB free on its disk, and a checkpoint takes about "
                                              r"\d+ MB; the checkpoint of epoch 3 is intact"):
        _save_as_epoch_4(ckpts, restored)
    assert tree_digest(directory) == before  # nothing written, not even a temporary folder


def _garble(path: Path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(data)


@pytest.mark.parametrize("damage", ["truncate", "garble", "meta", "delete", "manifest"])
def test_a_corrupt_checkpoint_is_refused(uninterrupted, tmp_path, damage):
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    step = directory / "checkpoints" / "3"
    biggest = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    elif damage == "garble":
        _garble(biggest)
    elif damage == "meta":
        (step / "meta" / "metadata").write_text('{"epoch": 3, "hist')
    elif damage == "manifest":  # every array gone: it was named "does not fit this model", as if another model's
        (step / "state" / "manifest.ocdbt").unlink()
    else:
        biggest.unlink()
    # Garbled bytes usually fail to decode; sometimes (CI, once) the compressed chunk still decodes,
    # to other values, and the saved digests catch it instead. Either way: refused, named corrupt,
    # with the way to the earlier checkpoint (the run keeps epochs 2 and 3).
    with pytest.raises(CheckpointError, match=r"checkpoints/3 is (unreadable \(corrupt|corrupt: array \S+ is not what "
                                              r"was saved|incomplete: it holds none of the model's arrays).*; "
                                              r"remove it to use the checkpoint of epoch 2$"):
        checkpoint.load_for_inference(directory)


EDITS = {  # a meta item edited by hand: JSON still, but not what save writes
    "history-emptied": (lambda m: m.update(history=[]), "history is not a list of epoch records"),
    "epoch-a-string": (lambda m: m.update(epoch="three"), "says epoch 'three', its folder 3"),
    "history-ends-early": (lambda m: m["history"].pop(), "history ends with epoch 2, not 3"),
    "metadata-a-string": (lambda m: m.update(metadata="oops"), "metadata lacks everything (not a dict)"),
    "dtype-deleted": (lambda m: m["metadata"].pop("dtype"), "metadata lacks dtype"),
    # A record that is a string: --resume wrote it into metrics.jsonl, then failed with a TypeError.
    "log-record-a-string": (lambda m: m.update(log=[*m.get("log", []), "$(touch PWNED)"]), "log is not a list of records"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_hand_edited_meta_item_is_refused_as_unreadable(uninterrupted, tmp_path, edit):
    # Each was read as it came: --resume trained an epoch and failed at its save (empty history),
    # or stopped with a TypeError, AttributeError or KeyError traceback.
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    path = directory / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    change, says = EDITS[edit]
    change(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        Checkpoints(directory, read_only=True).read_meta()
    message = str(err.value)
    assert "checkpoints/3 has a meta item this package cannot use (edited by hand, or written by other code?): its meta" in message
    assert says in message and message.endswith("; remove it to use the checkpoint of epoch 2")



def test_a_checkpoint_of_an_early_version_is_named_as_such_not_corrupt(uninterrupted, tmp_path):
    # Written before Config had a recipe (a87570e's, 2026-11-24, made and read for real: its state
    # has no EMA weights): evaluate called it "unreadable ... tree structures do not match", and
    # advice elsewhere was to remove it. Its meta item is imitated here: no recipe, no digests.
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    path = directory / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    assert not checkpoint._before_recipes(meta)
    del meta["digests"], meta["metadata"]["config"]["recipe"]
    path.write_text(json.dumps(meta))
    expected = (f"checkpoint {directory / 'checkpoints' / '3'} was written by an early resnet_jax (before --recipe, "
                "2026-11-24), whose train state this version cannot read; it is left as it is: read it with the "
                "version that wrote it, or train again")
    for read in (lambda: Checkpoints(directory, read_only=True).read_meta(), lambda: checkpoint.load_for_inference(directory)):
        with pytest.raises(CheckpointError) as err:
            read()
        assert str(err.value) == expected
    # A meta of one's own code without a recipe, but with the digests every save writes: not that.
    assert not checkpoint._before_recipes({**meta, "digests": {}})

def test_history_records_without_their_epoch_still_load(uninterrupted, tmp_path):
    # As a loop of one's own may have saved them before Checkpoints.save checked the history:
    # the weights are whole, and evaluate and predict do not need the records.
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    path = directory / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["history"] = [{k: v for k, v in r.items() if k != "epoch"} for r in meta["history"]]
    path.write_text(json.dumps(meta))
    assert checkpoint.load_for_inference(directory).epoch == 3


def test_a_folder_whose_name_reads_as_url_syntax_restores(uninterrupted, tmp_path):
    # The check before a restore opened the arrays through a file:// URL, and a folder named
    # "a#b" (or "q?m", or "pct%41x") was "unreadable (corrupt or incomplete)" after its save.
    directory = tmp_path / "run #1 ?q %41"
    shutil.copytree(uninterrupted[0], directory)
    assert checkpoint.load_for_inference(directory).epoch == 3


def test_values_changed_in_place_that_still_decode_are_found(uninterrupted, tmp_path):
    # A flipped bit that zstd and OCDBT do not notice: the array decodes, to other values.
    # Without the digests saved in the meta item, this restored as wrong weights (exit 0).
    import tensorstore as ts

    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    state_dir = directory / "checkpoints" / "3" / "state"
    kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{state_dir}/"}, "path": "params.dense.kernel/"}
    array = ts.open({"driver": "zarr", "kvstore": kvstore}, open=True, read=True, write=True).result()
    values = array.read().result()
    values[0, 0] = np.nextafter(values[0, 0], np.float32(np.inf))  # one ulp
    array.write(values).result()
    with pytest.raises(CheckpointError, match=r"checkpoints/3 is corrupt: array params/dense/kernel is not what was saved"):
        checkpoint.load_for_inference(directory)
    # The untouched copy restores, its digests checked.
    assert checkpoint.load_for_inference(uninterrupted[0]).epoch == 3


def test_a_refused_checkpoint_leaves_nothing_to_print_later(uninterrupted, tmp_path):
    # Orbax reads all arrays at once and abandons the rest at the first failure; each
    # abandoned read printed a traceback with a TensorStore spec later (tens of lines
    # per array), at garbage collection or exit. Arrays are now checked before Orbax reads.
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    for f in sorted((directory / "checkpoints" / "3" / "state" / "d").iterdir())[:3]:
        _garble(f)
    script = (
        "import gc, sys, time\n"
        "from resnet_jax import checkpoint\n"
        "for _ in range(3):\n"
        "    try:\n"
        "        checkpoint.load_for_inference(sys.argv[1])\n"
        "    except checkpoint.CheckpointError as err:\n"
        "        print(err)\n"
        "gc.collect(); time.sleep(1); gc.collect()\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("is unreadable (corrupt or incomplete)") == 3, run.stdout
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr[-3000:]


def test_the_array_check_reads_zarr3_and_finds_its_damage(tmp_path):
    import orbax.checkpoint as ocp

    tree = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "step": jnp.array(2)}
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)).save(tmp_path / "state", args=ocp.args.PyTreeSave(tree))
    abstract = jax.eval_shape(lambda: tree)
    assert checkpoint.arrays_problem(tmp_path / "state", abstract) is None
    wide = {**abstract, "params": {"w": jax.ShapeDtypeStruct((3, 5), jnp.float32)}}
    assert checkpoint.arrays_problem(tmp_path / "state", wide) == (
        "does not fit this model: params/w is float32[3, 4] in the checkpoint, float32[3, 5] in this model"
    )
    for f in (tmp_path / "state" / "d").iterdir():
        _garble(f)
    assert checkpoint.arrays_problem(tmp_path / "state", abstract).startswith("is unreadable (corrupt or incomplete): ")


def test_a_relative_run_directory_saves_and_restores(uninterrupted, tmp_path, monkeypatch):
    # Orbax refuses relative paths ("Checkpoint path should be absolute"); Checkpoints takes them.
    shutil.copytree(uninterrupted[0], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    ckpts = Checkpoints("run", keep=5)
    restored = ckpts.restore(_fresh_state())
    _save_as_epoch_4(ckpts, restored)
    ckpts.close()
    assert Checkpoints("run", read_only=True).restore(_fresh_state()).epoch == 4
    assert checkpoint.load_for_inference("run").epoch == 4


def test_a_path_inside_a_run_points_to_the_run(uninterrupted):
    run = uninterrupted[0]
    for inside in (run / "checkpoints", run / "checkpoints" / "3"):
        with pytest.raises(CheckpointError, match=f"did you mean {run}, the run directory"):
            checkpoint.load_for_inference(inside)


def test_steps_per_dispatch_is_compared_as_the_number_each_run_takes():
    # A CPU run started without --steps-per-dispatch (1 there) refused
    # `--resume --steps-per-dispatch 1`: "steps_per_dispatch (checkpoint None, now 1)"; and a GPU
    # run's default (32) resumed on a CPU with the default there (1) was accepted, silently.
    meta = lambda k, backend: {**checkpoint.metadata(CONFIG.replace(steps_per_dispatch=k), FASHION_MNIST), "backend": backend}
    assert checkpoint.differences(meta(None, "cpu"), meta(1, "cpu")) == []
    assert checkpoint.differences(meta(32, "gpu"), meta(None, "gpu")) == []
    assert checkpoint.differences(meta(None, "gpu"), meta(32, "cpu")) == []
    assert checkpoint.differences(meta(None, "cpu"), meta(2, "cpu")) == [
        "steps_per_dispatch (checkpoint 1, the default on cpu, now 2)"]
    assert checkpoint.differences(meta(None, "gpu"), meta(None, "cpu")) == [
        "steps_per_dispatch (checkpoint 32, the default on gpu, now 1, the default on cpu)"]
    # A checkpoint saved before the platform was recorded: the flags as given.
    assert checkpoint.differences(meta(None, None), meta(1, "cpu")) == ["steps_per_dispatch (checkpoint None, now 1)"]
    assert checkpoint.metadata(CONFIG, FASHION_MNIST)["backend"] == jax.default_backend()
    # A meta of someone else's making is compared, not a crash (AttributeError, ConfigError).
    odd = meta(None, "cpu")
    odd = {**odd, "prng": "threefry2x32", "config": {**odd["config"], "steps_per_dispatch": 0}}
    assert checkpoint.differences(odd, meta(None, "cpu")) == ["steps_per_dispatch (checkpoint 0, now None)"]


def test_jax_random_settings_that_draw_other_numbers_are_refused_on_resume():
    # JAX_THREEFRY_PARTITIONABLE=0 at --resume was accepted, and the run went on with other shuffles.
    saved = checkpoint.metadata(CONFIG, FASHION_MNIST)
    other = {**saved, "prng": {**saved["prng"], "threefry_partitionable": not saved["prng"]["threefry_partitionable"]}}
    assert checkpoint.differences(saved, other) == [
        f"JAX's random numbers: threefry_partitionable (checkpoint {saved['prng']['threefry_partitionable']!r}, "
        f"now {other['prng']['threefry_partitionable']!r})"]
    assert checkpoint.differences({k: v for k, v in saved.items() if k != "prng"}, other) == []  # an older checkpoint


def test_a_checkpoint_of_another_model_is_refused(uninterrupted):
    directory = uninterrupted[0]
    saved = checkpoint.Checkpoints(directory, read_only=True).read_meta()["metadata"]
    assert checkpoint.differences(saved, checkpoint.metadata(CONFIG.replace(epochs=10), FASHION_MNIST)) == []
    cifar = checkpoint.differences(saved, checkpoint.metadata(CONFIG.replace(dataset="cifar10"), CIFAR10))
    assert cifar == ["input_channels (checkpoint 1, now 3)", "dataset (checkpoint 'fashion_mnist', now 'cifar10')"]
    bf16 = checkpoint.differences(saved, checkpoint.metadata(CONFIG.replace(dtype="bfloat16"), FASHION_MNIST))
    assert bf16 == ["dtype (checkpoint 'float32', now 'bfloat16')"]  # once, not again as a config field
    best = checkpoint.differences(saved, checkpoint.metadata(CONFIG.replace(recipe=BEST.replace(momentum=0.8)), FASHION_MNIST))
    assert "recipe.momentum (checkpoint 0.0, now 0.8)" in best and "recipe.name (checkpoint 'd2l', now 'best')" in best
    assert not [d for d in best if "{" in d]  # each ingredient by name, not two whole recipes
    lr = checkpoint.differences(saved, checkpoint.metadata(CONFIG.replace(lr=0.1, batch_size=16), FASHION_MNIST))
    assert lr == ["batch_size (checkpoint 32, now 16)", "lr (checkpoint 0.05, now 0.1)"]
    # The arrays themselves: restoring into a model of another shape is refused, not reshaped.
    # Shapes are compared before any array is read (a mismatch found by Orbax mid-read
    # leaves its pending reads to print tracebacks when collected).
    fits = r"checkpoints/3 does not fit this model: "
    with pytest.raises(CheckpointError, match=fits + r"params/dense/bias is float32\[10\] in the checkpoint, float32\[5\] in this model"):
        Checkpoints(directory, read_only=True).restore(_fresh_state(num_classes=5))
    with pytest.raises(CheckpointError, match=fits + r"params/b1/conv/kernel is float32\[7, 7, 1, 64\] in the checkpoint"):
        Checkpoints(directory, read_only=True).restore(_fresh_state(channels=3))


def test_the_closed_loop_errors_of_an_abandoned_save_are_dropped_and_nothing_else():
    # A disk filled mid-save: TensorStore's remaining writes each reported "Event loop is
    # closed" as unraisable, about 90 tracebacks after the one line that says what is kept.
    import types

    seen = []
    hook = checkpoint._without_closed_loop_errors(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(closed)
    hook(other)
    assert seen == [other]


@pytest.mark.parametrize("given", [True, False], ids=["steps-per-epoch-saved", "train.py-default"])
def test_load_for_inference_rebuilds_the_runs_learning_rate_schedule(tmp_path, given):
    # A state loaded to train on must update as the run would have: a cosine schedule built for
    # another epoch length is already at 0 at the saved step, and training would do nothing.
    config = Config(resize=17, batch_size=32, epochs=4, recipe=BEST, train_limit=None if given else 96)
    spe = 3  # the run's steps per epoch: 96 examples in batches of 32
    assert given or config.steps_per_epoch == spe
    tx = training.make_optimizer(config, steps_per_epoch=spe)
    state = training.create_train_state(training.make_model(config), tx, jax.random.key(0), recipe=BEST)
    assert state.step.dtype == jnp.int32  # as the jitted steps keep it (saved as such by eager steps too)
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    for _ in range(6):  # two epochs' steps
        state = state.apply_gradients(grads=grads)
    ckpts = Checkpoints(tmp_path, keep=1)
    ckpts.save(state, 2, [{"epoch": 1}, {"epoch": 2}], [],
               checkpoint.metadata(config, FASHION_MNIST, steps_per_epoch=spe if given else None))
    ckpts.close()
    loaded = checkpoint.load_for_inference(tmp_path).state
    step = lambda s: jax.tree_util.tree_leaves(s.apply_gradients(grads=grads).params)
    expected, got = step(state), step(loaded)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert not all(np.array_equal(a, b) for a, b in zip(got, jax.tree_util.tree_leaves(loaded.params)))


def test_save_refuses_a_meta_that_loading_could_not_use_and_writes_nothing(tmp_path):
    # A meta of {} was saved, and load_for_inference then failed with "unusable metadata: KeyError".
    config = Config(resize=17)
    state = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(0))
    ckpts = Checkpoints(tmp_path / "run")
    with pytest.raises(ValueError, match=r"meta lacks config, num_classes, input_channels, dtype: pass checkpoint.metadata\(config, spec\)"):
        ckpts.save(state, 1, [{"epoch": 1}], [], {})
    # A meta of another model's (a 5-class model saved with Fashion-MNIST's metadata) could not be loaded.
    five = training.create_train_state(training.make_model(config, num_classes=5), training.make_optimizer(config),
                                       jax.random.key(0))
    with pytest.raises(ValueError, match=r"meta says num_classes 10 \(the state's model: 5\)"):
        ckpts.save(five, 1, [{"epoch": 1}], [], checkpoint.metadata(config, FASHION_MNIST))
    assert ckpts.latest_epoch() is None
    ckpts.close()


def test_save_refuses_what_would_load_as_another_state_and_writes_nothing(tmp_path):
    # Each was written, then could not be loaded, or loaded as something else, silently.
    config = Config(resize=17, epochs=2, train_limit=64)
    state, meta = training.initial_state(config), checkpoint.metadata(config, FASHION_MNIST)
    history = [{"epoch": 1, "test_acc": 0.5}]
    cases = [
        # params and batch_stats alone: "it has no array step" when loaded
        (({"params": state.params, "batch_stats": state.batch_stats}, 1, history, [], meta),
         r"state is the TrainState to save \(training.initial_state's, fit's result.state\), got a dict"),
        # a bfloat16 state under a float32 config's meta loaded as a float32 model
        ((training.initial_state(config.replace(dtype="bfloat16")), 1, history, [], meta),
         r"meta's config says dtype 'float32' \(the state's: 'bfloat16'\): pass checkpoint.metadata\(config, spec, steps_per_epoch\)"),
        # another recipe's state (its EMA and augmentation key) did not fit the template loading builds
        ((training.initial_state(Config.for_recipe("best", {}, resize=17, epochs=2, train_limit=64)), 1, history, [], meta),
         r"meta's config says lr 0.05 \(the state's: 0.4\)"),
        # a recipe that only its loss tells apart (same lr, same arrays)
        ((training.initial_state(Config.for_recipe("d2l", {"label_smoothing": 0.1}, resize=17, epochs=2, train_limit=64)),
          1, history, [], meta), r"meta's config says recipe Recipe\(name='d2l'.*label_smoothing=0.0"),
        # A state of create_train_state's knows no config: its model and arrays are compared.
        ((training.create_train_state(ResNet18(dtype=jnp.bfloat16), training.make_optimizer(config), jax.random.key(0)),
          1, history, [], meta), r"meta's config says dtype 'float32' \(the state's: 'bfloat16'\)"),
        ((training.create_train_state(training.make_model(config), optax.adam(1e-3), jax.random.key(0)), 1, history, [], meta),
         r"the state has an array not in the model and optimizer, opt_state/0/count \(and \d+ more\), that meta's config builds"),
        # loaded, a history that ends elsewhere (or nowhere) makes --resume redo or skip epochs
        ((state, 2, history, [], meta), r"history ends with \{'epoch': 1, .*the checkpoint is of epoch 2: pass the records of epochs 1..epoch"),
        ((state, 1, [], [], meta), r"history is empty; the checkpoint is of epoch 1"),
        ((state, 1, [{"test_acc": 0.5}], [], meta), r"history ends with \{'test_acc': 0.5\}; the checkpoint is of epoch 1"),
        # JSON's TypeError came mid-save and left Orbax's temporary folder
        ((state, 1, [{"epoch": 1, "note": object()}], [], meta), r"history holds a value JSON cannot hold \(object "),
        ((state, 1, history, [{"step": {1, 2}}], meta), r"log holds a value JSON cannot hold \(set "),
        ((state, 1, history, [], {**meta, "config": {"lr": "fast"}}), r"meta's config cannot be read as a Config"),
        ((state, 1, history, [], {**meta, "note": np.datetime64("2026-12-06")}), r"meta holds a value JSON cannot hold"),
    ]
    with Checkpoints(tmp_path / "run") as ckpts:
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                ckpts.save(*args)
        assert ckpts.latest_epoch() is None and not list((tmp_path / "run" / "checkpoints").iterdir())
        # The scalars a loop of one's own sums its metrics in are numbers, as JSON holds them.
        ckpts.save(state, 1, [{"epoch": np.int64(1), "test_acc": jnp.float32(0.5)}], [{"loss": np.float32(2.0)}],
                   {**meta, "note": np.int64(3)})
    loaded = checkpoint.load_for_inference(tmp_path / "run")
    assert loaded.history == [{"epoch": 1, "test_acc": 0.5}] and loaded.log == [{"loss": 2.0}]
    assert loaded.metadata["note"] == 3


def test_save_takes_epochs_in_order_and_writes_nothing_else(tmp_path):
    # A float epoch made a folder "4.0"; a numpy int failed after the write began (and left
    # Orbax's temporary folder); an epoch at or below the latest was saved, and the same
    # process then disagreed with a reloaded one about which checkpoint was the latest.
    config = Config(resize=17)
    state = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(0))
    meta = checkpoint.metadata(config, FASHION_MNIST)
    with Checkpoints(tmp_path / "run") as ckpts:
        for bad in (0, -1, 4.0, "5", True):
            with pytest.raises(ValueError, match=r"epoch is the number of epochs done: an int >= 1, got "):
                ckpts.save(state, bad, [{"epoch": 1}], [], meta)
        ckpts.save(state, np.int64(2), [{"epoch": 1}, {"epoch": 2}], [], meta)
        for bad in (1, 2):
            with pytest.raises(ValueError, match=rf"holds the checkpoint of epoch 2 already: save epochs in order \(got {bad}\)"):
                ckpts.save(state, bad, [{"epoch": 1}], [], meta)
        assert ckpts.latest.all_steps() == [2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
    assert checkpoint.load_for_inference(tmp_path / "run").epoch == 2


def test_a_run_folder_gone_before_a_save_is_one_message(tmp_path):
    # Moved or deleted under a running train.py: the room check's disk_usage raised, a traceback.
    config = Config(resize=17)
    state = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(0))
    ckpts = Checkpoints(tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"could not save the checkpoint of epoch 1 in .*: cannot reach .*run: "
                                              r"No such file or directory; no earlier checkpoint"):
        ckpts.save(state, 1, [{"epoch": 1}], [], checkpoint.metadata(config, FASHION_MNIST))
    ckpts.close()



def _two_epochs_tracking_best():
    """A meta, a fresh state and two epochs' history with a val_acc, for Checkpoints(track_best=True)."""
    config = Config(resize=17)
    state = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(0))
    return checkpoint.metadata(config, FASHION_MNIST), state, [{"epoch": 1, "val_acc": 0.2}, {"epoch": 2, "val_acc": 0.4}]

def test_resume_saves_the_best_epoch_that_a_kill_between_the_two_saves_left_out(tmp_path):
    # Killed after epoch 2's latest save and before its best save, best/ stayed on epoch 1 for good.
    meta, state, history = _two_epochs_tracking_best()
    with Checkpoints(tmp_path, track_best=True) as ckpts:
        ckpts.save(state, 1, history[:1], [], meta)
        best, ckpts.best = ckpts.best, None  # the kill: epoch 2's best save never happens
        ckpts.save(state.replace(step=state.step + 1), 2, history, [], meta)
        ckpts.best = best
    with Checkpoints(tmp_path) as ckpts:
        assert (ckpts.latest_epoch(), ckpts.best.latest_step()) == (2, 1)
        restored = ckpts.restore(state)
        assert ckpts.repair_best(restored) and ckpts.best.latest_step() == 2
        assert not ckpts.repair_best(restored)  # once
        assert int(ckpts.restore(state, "best").state.step) == int(restored.state.step)
    # The latest checkpoint removed by hand (damaged, say) with best/ ahead of it: nothing to repair
    # (it claimed a save it did not make), and redoing that epoch replaces best's copy (Orbax
    # refused it as existing, after the epoch's work).
    with Checkpoints(tmp_path / "ahead", track_best=True) as ckpts:
        ckpts.save(state, 1, history[:1], [], meta)
        ckpts.save(state.replace(step=state.step + 1), 2, history, [], meta)
        ckpts.latest.delete(2)
        restored = ckpts.restore(state)
        assert restored.epoch == 1 and not ckpts.repair_best(restored) and ckpts.best.all_steps() == [2]
        ckpts.save(state.replace(step=state.step + 2), 2, history, [], meta)
        assert ckpts.best.all_steps() == [2] and int(ckpts.restore(state, "best").state.step) == int(state.step) + 2
    # An epoch no better than an earlier one is not the best: nothing to repair.
    history = [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.4}]
    with Checkpoints(tmp_path / "tie", track_best=True) as ckpts:
        ckpts.save(state, 1, history[:1], [], meta)
        ckpts.best, best = None, ckpts.best
        ckpts.save(state, 2, history, [], meta)
        ckpts.best = best
        assert not ckpts.repair_best(ckpts.restore(state)) and ckpts.best.latest_step() == 1


def test_a_program_that_never_closes_its_checkpoints_exits_quietly(tmp_path):
    # Orbax's cleanup thread, still running at exit, printed a 43-line traceback (3 runs in 3).
    script = "import sys\nfrom resnet_jax import checkpoint\nprint(checkpoint.Checkpoints(sys.argv[1]).latest_epoch())\n"
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert r.returncode == 0 and r.stdout == "None\n" and r.stderr == "", r.stderr[-2000:]
    with Checkpoints(tmp_path / "run") as ckpts:
        assert ckpts.latest_epoch() is None


def test_a_read_only_view_of_a_run_logs_no_warnings(uninterrupted, caplog):
    # Orbax warned three times that a read-only manager keeps and deletes nothing: as intended.
    import logging

    caplog.set_level(logging.INFO)
    with Checkpoints(uninterrupted[0], read_only=True) as ckpts:
        assert ckpts.latest_epoch() == 3
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_checkpoint_saved_on_a_gpu_is_read_on_a_cpu(uninterrupted, tmp_path):
    # Orbax records each array's devices in the checkpoint's _sharding file, and restores onto
    # them unless told otherwise. An array saved on one GPU outside a mesh is recorded as
    # "cuda:0", which a CPU-only machine lacks (a mesh records device ids, which may be missing
    # too: the four-to-one-device test in test_sharding.py). No GPU here, so the copy's records
    # are rewritten that way; restore and load_for_inference give their own devices instead.
    directory, _, ckpts, restored = _copy_restored(uninterrupted, tmp_path)
    ckpts.close()
    files = sorted(directory.glob("*/*/state/_sharding"))
    assert len(files) >= 3  # the kept epochs' and best's
    gpu = json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cuda:0"})
    for f in files:
        f.write_text(json.dumps(dict.fromkeys(json.loads(f.read_text()), gpu)))
    # Not vacuous: Orbax on its own now refuses the arrays.
    import orbax.checkpoint as ocp

    # (Orbax 0.12.8 says "Topology mismatch"; 0.11 said "Device cuda:0 was not found in jax.local_devices()".)
    with pytest.raises(ValueError, match="Topology mismatch|cuda:0 was not found"):
        ocp.StandardCheckpointer().restore(directory / "checkpoints" / str(restored.epoch) / "state")
    with Checkpoints(directory, read_only=True) as read:
        assert _leaves_equal(read.restore(_fresh_state()).state, restored.state)
        assert read.restore(_fresh_state(), which="best").epoch >= 1
    assert _leaves_equal(checkpoint.load_for_inference(directory).state.params, restored.state.params)


def test_a_run_saved_with_orbax_item_names_restores_and_continues(tmp_path, monkeypatch):
    # Until 2026-12-07 both managers named the two items with Orbax's item_names, which Orbax has
    # deprecated for a handler registry (checkpoint._handler_registry). A run saved that way must
    # still restore (latest and best), be read for inference, and take its next epoch.
    import orbax.checkpoint as ocp

    state = _fresh_state()
    meta = checkpoint.metadata(CONFIG, FASHION_MNIST)
    history = [{"epoch": 1, "val_acc": 0.2}, {"epoch": 2, "val_acc": 0.4}]
    log = [{"kind": "epoch", "epoch": 1}]
    manager = ocp.CheckpointManager

    def as_before(*args, handler_registry, **kwargs):
        return manager(*args, item_names=("state", "meta"), **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", as_before)
    with Checkpoints(tmp_path, track_best=True) as before:
        before.save(state, 1, history[:1], log, meta)
    monkeypatch.undo()
    with Checkpoints(tmp_path) as now:
        assert now.best is not None  # (best/ exists, so it is opened)
        for which in ("latest", "best"):
            back = now.restore(_fresh_state(), which)
            assert (back.epoch, back.history, back.log, back.metadata) == (1, history[:1], log, meta)
            assert _leaves_equal(back.state, state)
        now.save(back.state.replace(step=back.state.step + 1), 2, history, log, meta)
        assert (now.latest.all_steps(), now.best.all_steps()) == ([1, 2], [2])
    assert checkpoint.load_for_inference(tmp_path).epoch == 2


def test_a_folder_another_program_writes_is_refused_for_writing_and_left_as_it_is(tmp_path):
    # A script that opened a live run's Checkpoints cleaned up its save in progress (Orbax's
    # temporary folder): the run failed with "Save failed: 1/1 params are missing".
    from resnet_jax import files

    run = tmp_path / "run"
    in_progress = run / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    in_progress.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom resnet_jax import files\n"
         "with files.held(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(run / files.RUN_LOCK)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError, match=r"is being written by another program \(pid \d+ on .*\); to read it "
                                                  r"meanwhile, open it with read_only=True"):
            Checkpoints(run)
        assert in_progress.is_dir()
        with Checkpoints(run, read_only=True) as ckpts:  # reading is fine
            assert ckpts.latest_epoch() is None
        assert in_progress.is_dir()
    finally:
        holder.kill()
        holder.wait()
    # The writer is gone: the folder is ours, its unfinished save cleaned up, the lock held while open.
    with Checkpoints(run), Checkpoints(run):  # a second one in the same process nests
        assert not in_progress.exists() and (run / files.RUN_LOCK).is_file()
        with pytest.raises(files.Busy):
            with files.held(run / files.RUN_LOCK):  # what train.py, or another process, would meet
                pass
    assert not (run / files.RUN_LOCK).exists()
    with files.held(run / files.RUN_LOCK):
        pass


def test_every_process_of_a_run_hears_that_the_folder_is_taken(tmp_path):
    # Process 0 was refused at once; process 1 waited in Orbax's first barrier until process 0
    # ended, then failed in C++ (Gloo's DEADLINE_EXCEEDED).
    import socket

    from resnet_jax import files

    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom resnet_jax import files\n"
         "with files.held(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n", str(run / files.RUN_LOCK)],
        stdout=subprocess.PIPE, text=True, env=env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys, time, jax\njax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
            f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id=int(sys.argv[1]))\n"
            "from resnet_jax import checkpoint\nt = time.monotonic()\n"
            f"try:\n    checkpoint.Checkpoints({str(run)!r})\nexcept checkpoint.CheckpointError as err:\n"
            "    print(f'refused in {time.monotonic() - t:.0f} s:', err, flush=True)\n")
    try:
        assert holder.stdout.readline() == "held\n"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        holder.kill()
        holder.wait()
    for i, out in enumerate(outs):
        line = [x for x in out.splitlines() if x.startswith("refused")]
        assert line and "is being written by another program" in line[0], out[-2000:]
        # At once, not after a barrier's timeout: 0-2 s when the machine is quiet, 3 s in CI beside
        # a second load (2026-12-06); a bound no wait for a timeout stays under.
        assert int(line[0].split()[2]) < 20, line[0]
        assert ("(pid " if i == 0 else "(process 0 says which)") in line[0]


@pytest.mark.parametrize("keep", [0, -1, 2.0, True])
def test_keep_is_a_positive_count(tmp_path, keep):
    # keep=0 kept nothing: every save was deleted, and "no checkpoint" at the next load.
    with pytest.raises(ValueError, match="keep is how many checkpoints to keep: an int >= 1"):
        Checkpoints(tmp_path / "run", keep=keep)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_rotated_away_while_read_is_read_again_from_the_newer_one(uninterrupted, tmp_path, monkeypatch):
    # load_for_inference (evaluate, predict) beside a train.py --keep 1 run: one read in three
    # reported the checkpoint being rotated away as corrupt, with the advice to remove it.
    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    real, calls = checkpoint._load_for_inference, []

    def rotated_on_first_read(ckpts, which):
        calls.append(which)
        if len(calls) == 1:  # a save begins meanwhile, and the rotation deletes what was being read
            (directory / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir()
            raise CheckpointError("checkpoint .../3 is corrupt")
        return real(ckpts, which)

    monkeypatch.setattr(checkpoint, "_load_for_inference", rotated_on_first_read)
    assert checkpoint.load_for_inference(directory).epoch == 3 and len(calls) == 2
    # In a folder at rest, a failing checkpoint is reported at once.
    calls.clear()
    monkeypatch.setattr(checkpoint, "_load_for_inference", lambda ckpts, which: calls.append(which) or
                        (_ for _ in ()).throw(CheckpointError("checkpoint .../3 is corrupt")))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.load_for_inference(directory)
    assert len(calls) == 1


def _save_zeroed_weights(directory):
    """A checkpoint of a fresh state with every weight 0: 45 MB of arrays in 0.1 MB of files."""
    state = _fresh_state()
    zeros = state.replace(params=jax.tree_util.tree_map(np.zeros_like, state.params))
    with Checkpoints(directory) as ckpts:
        ckpts.save(zeros, 1, [{"epoch": 1}], [], checkpoint.metadata(CONFIG, FASHION_MNIST))


def test_a_checkpoint_whose_arrays_declare_far_more_than_its_files_is_not_read(uninterrupted, tmp_path, monkeypatch):
    # TensorStore writes no chunk of zeros: a few kB of files could declare a meta's billion classes,
    # and reading them allocated it all. The limit is lowered here, so that a 45 MB model is "large".
    monkeypatch.setattr(checkpoint, "UNCHECKED_BYTES", 0)
    assert checkpoint.load_for_inference(uninterrupted[0]).epoch == 3  # a trained one: 1.09x its files
    _save_zeroed_weights(tmp_path / "run")
    read = []
    monkeypatch.setattr(checkpoint, "arrays_problem", lambda *a: read.append(a))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/1 declares 45 MB of arrays in 0\.\d MB of files, "
                                                         r"more than 16x .* and is not read; there is no earlier checkpoint"):
        checkpoint.load_for_inference(tmp_path / "run")
    assert not read  # refused before a single array was read


def test_a_sparse_file_in_a_checkpoint_does_not_let_its_declared_arrays_through(tmp_path, monkeypatch):
    # A file's st_size is what it claims: `truncate -s 1G state/junk` (no byte written) let a
    # checkpoint of 45 MB of zeros in 0.1 MB of files through, and OCDBT ignores the junk.
    monkeypatch.setattr(checkpoint, "UNCHECKED_BYTES", 0)
    _save_zeroed_weights(tmp_path / "run")
    junk = tmp_path / "run" / "checkpoints" / "1" / "state" / "junk"
    with open(junk, "wb") as f:
        f.truncate(10**9)
    if getattr(os.stat(junk), "st_blocks", 2 * 10**6) * 512 >= 10**9:
        pytest.skip("this file system wrote the sparse file out")
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/1 declares 45 MB of arrays in 0\.\d MB of files"):
        checkpoint.load_for_inference(tmp_path / "run")


def _read_only(path: Path) -> bool:
    """Make ``path`` unwritable for real where this machine allows it: chmod for a user, an immutable
    folder (chattr +i) for root, whom permission bits do not stop. False where neither works."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _writable_again(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_a_checkpoint_folder_that_cannot_be_written_is_found_before_any_save(uninterrupted, tmp_path, monkeypatch):
    # Found by the first save, a read-only checkpoints/ cost an epoch's work (train.py asks this before training).
    directory, before, ckpts, _ = _copy_restored(uninterrupted, tmp_path)
    assert ckpts.write_problem() is None

    real = tempfile.mkdtemp

    def read_only_mount(*args, dir=None, **kwargs):
        if Path(dir) == directory / "checkpoints":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_mount)
    assert ckpts.write_problem() == f"no checkpoint can be written in {directory / 'checkpoints'}: Read-only file system"
    monkeypatch.undo()
    # A checkpoint that --keep will rotate away must be removable: each of its folders writable.
    state = directory / "checkpoints" / "2" / "state"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != state and real_access(p, mode, **kw))
    assert ckpts.write_problem() == (f"{state} cannot be changed (not writable), and the run removes that "
                                     "checkpoint when newer ones replace it (--keep)")
    monkeypatch.undo()
    assert tree_digest(directory) == before  # the write test left nothing
    # For real, where this machine can make a folder read-only.
    if not _read_only(directory / "checkpoints"):
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        assert ckpts.write_problem().startswith(f"no checkpoint can be written in {directory / 'checkpoints'}: ")
    finally:
        _writable_again(directory / "checkpoints")
    assert ckpts.write_problem() is None


def test_an_older_checkpoint_that_cannot_be_removed_is_a_note_not_a_failed_save(uninterrupted, tmp_path, monkeypatch):
    # Orbax removes what --keep rotates away after the new checkpoint is whole. Its failure there was
    # "could not save the checkpoint of epoch 4 ...; the checkpoint of epoch 4 is intact", and the run stopped.
    directory, _, ckpts, restored = _copy_restored(uninterrupted, tmp_path)
    steps = ckpts.latest.all_steps()

    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpts.latest._checkpoint_deleter, "delete_steps", refused)
    notes = ckpts.save(restored.state, 4, restored.history + [{**restored.history[-1], "epoch": 4}], [], restored.metadata)
    assert steps == [2, 3]  # keep=2: 3 and 4 stay; 2 was to go
    assert notes == [f"the checkpoint of epoch 4 is saved in {directory / 'checkpoints'}, but removing the older ones "
                     "stopped at epoch 2 (PermissionError: [Errno 1] Operation not permitted), whose folder may be left "
                     "partly removed and is no checkpoint to use: remove it by hand"]
    monkeypatch.undo()
    ckpts.close()
    reopened = Checkpoints(directory, keep=2)
    assert reopened.latest_epoch() == 4 and _leaves_equal(reopened.restore(_fresh_state()).state, restored.state)
    reopened.close()


def _stuck_rotation(tmp_path, monkeypatch, immutable):
    """Epochs 1-3 saved with --keep 3, then epoch 4 with --keep 1, epoch 1's folder not removable.
    ``immutable``: for real, a file of it made immutable (chattr +i); else Orbax's removal of that one
    folder fails after removing part of it, as it does. Returns the note and the run folder."""
    meta, state, _ = _two_epochs_tracking_best()
    history = [{"epoch": e, "val_acc": e / 10} for e in range(1, 5)]
    with Checkpoints(tmp_path, keep=3) as ckpts:
        for epoch in (1, 2, 3):
            ckpts.save(state, epoch, history[:epoch], [], meta)
    old = tmp_path / "checkpoints" / "1"
    ckpts = Checkpoints(tmp_path, keep=1)
    if immutable:
        victim = old / "state" / "_METADATA"
        if os.geteuid() != 0 or shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(victim)], capture_output=True).returncode != 0:
            ckpts.close()
            pytest.skip("cannot make a file immutable here")
    else:
        deleter = ckpts.latest._checkpoint_deleter
        real = deleter.delete

        def half(step):
            if step != 1:
                return real(step)
            shutil.rmtree(old / "meta")
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(deleter, "delete", half)  # Orbax's own delete_steps goes through the steps
    try:
        notes = ckpts.save(state, 4, history, [], meta)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(victim)], capture_output=True)
        monkeypatch.undo()
        ckpts.close()
    return notes, tmp_path


@pytest.mark.parametrize("immutable", [False, True], ids=["faked", "chattr"])
def test_a_rotation_that_stops_at_a_folder_it_cannot_remove_names_that_one_apart_from_the_whole_ones_left(tmp_path, monkeypatch, immutable):
    # Orbax removes what --keep rotates away oldest first and stops at the first folder it cannot
    # remove, left partly removed; the later ones stay whole. The note named all three alike as
    # "could not be removed", the broken one among the usable ones.
    notes, directory = _stuck_rotation(tmp_path, monkeypatch, immutable)
    folder = directory / "checkpoints"
    why = "PermissionError: [Errno 1] Operation not permitted" + (": '_METADATA'" if immutable else "")
    assert notes == [f"the checkpoint of epoch 4 is saved in {folder}, but removing the older ones stopped at epoch 1 "
                     f"({why}), whose folder may be left partly removed and is no checkpoint to use: remove it by hand; "
                     "those of epochs 2, 3, whole, were left too: remove them by hand as well"]
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["1", "2", "3", "4"]
    # Partly removed, as the note says (for real, what went first depends on the order Orbax meets the files in).
    assert immutable or not (folder / "1" / "meta").exists()
    # What is left is no trouble later: the latest is epoch 4 for --resume and evaluate, and the next
    # run's save tries epoch 1 again (removed now) and then the whole ones.
    meta, state, _ = _two_epochs_tracking_best()
    assert checkpoint.load_for_inference(directory).epoch == 4
    with Checkpoints(directory, keep=1) as ckpts:
        assert ckpts.latest_epoch() == 4 and ckpts.read_meta()["epoch"] == 4
        history = [{"epoch": e, "val_acc": e / 10} for e in range(1, 6)]
        assert ckpts.save(state, 5, history, [], meta) == []
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["5"]


def test_what_a_stopped_removal_left_of_a_checkpoint_is_named_so_and_someone_elses_orbax_folder_is_not(tmp_path):
    # A rotation that stopped at a file it could not remove in the epoch's folder itself left
    # Orbax's record there and none of the items: the next run refused it as a folder of someone
    # else's, "move it elsewhere", where the rotation's note had said "remove it by hand".
    meta, state, history = _two_epochs_tracking_best()
    with Checkpoints(tmp_path) as ckpts:
        ckpts.save(state, 1, history[:1], [], meta)
        ckpts.save(state, 2, history, [], meta)
    left = tmp_path / "checkpoints" / "1"
    for item in checkpoint.ITEMS:
        shutil.rmtree(left / item)
    with pytest.raises(CheckpointError) as err:
        Checkpoints(tmp_path)
    assert str(err.value) == (f"{left} is what is left of the checkpoint of epoch 1, partly removed (its items meta, "
                              "state are gone), and no checkpoint to use: remove it by hand")
    # Another program's Orbax checkpoint (its own items) is someone else's still.
    record = json.loads((left / "_CHECKPOINT_METADATA").read_text())
    record["item_handlers"] = {"default": "orbax.checkpoint.PyTreeCheckpointHandler"}
    (left / "_CHECKPOINT_METADATA").write_text(json.dumps(record))
    (left / "default").mkdir()
    with pytest.raises(CheckpointError, match="is a folder where the checkpoint of epoch 1 would be that holds none "
                                              r"of a checkpoint's items \(meta, state\)"):
        Checkpoints(tmp_path)
    shutil.rmtree(left)
    with Checkpoints(tmp_path) as ckpts:  # removed by hand: the run goes on
        assert ckpts.latest_epoch() == 2


def test_a_folder_that_takes_a_new_folder_but_lets_none_be_removed_is_one_line_naming_what_is_left(uninterrupted, tmp_path, monkeypatch):
    # An append-only checkpoints/ (chattr +a), or a share whose rights let one add and not delete: a
    # save's rename and rotation would fail there. The write test's folder is made and cannot be
    # removed: tempfile.TemporaryDirectory's cleanup then recursed (Python 3.11) to a RecursionError,
    # 6,000 lines of traceback out of train.py, and left its folder there unnamed.
    directory, _, ckpts, _ = _copy_restored(uninterrupted, tmp_path)
    folder = directory / "checkpoints"
    real = os.rmdir

    def append_only(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", append_only)
    problem = ckpts.write_problem()
    monkeypatch.undo()
    [probe] = folder.glob(".write-test-*")
    assert problem == (f"no checkpoint can be written in {folder}: Operation not permitted ({probe}, made to find "
                       "that out, cannot be removed either: remove it once the folder is writable)")
    probe.rmdir()
    assert ckpts.write_problem() is None and not list(folder.glob(".write-test-*"))
    # For real, where root can make a folder append-only.
    if os.geteuid() != 0 or shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+a", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder append-only here")
    try:
        problem = ckpts.write_problem()
    finally:
        subprocess.run(["chattr", "-a", str(folder)], capture_output=True)
    [probe] = folder.glob(".write-test-*")
    assert problem == (f"no checkpoint can be written in {folder}: Operation not permitted ({probe}, made to find "
                       "that out, cannot be removed either: remove it once the folder is writable)")
    probe.rmdir()


def test_a_stale_best_of_the_same_epoch_that_cannot_be_removed_is_a_failed_save_not_a_note(tmp_path, monkeypatch):
    # best/ ahead of the latest checkpoint (removed by hand): redoing that epoch first removes best's
    # stale copy. Orbax lists a step until it is gone, so a removal that failed left epoch 2 listed
    # and on disk, and the save said "the checkpoint of epoch 2 is saved in best/" of the old one.
    meta, state, history = _two_epochs_tracking_best()
    with Checkpoints(tmp_path, track_best=True) as ckpts:
        ckpts.save(state, 1, history[:1], [], meta)
        ckpts.save(state.replace(step=state.step + 1), 2, history, [], meta)
        ckpts.latest.delete(2)

        def refused(step):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(ckpts.best._checkpoint_deleter, "delete", refused)
        with pytest.raises(CheckpointError, match=r"could not save the checkpoint of epoch 2 in .*best: PermissionError: "
                                                  r".*; the checkpoint of epoch 2 is intact"):
            ckpts.save(state.replace(step=state.step + 2), 2, history, [], meta)
        monkeypatch.undo()
        assert int(ckpts.restore(state, "best").state.step) == int(state.step) + 1  # the stale one: not this save's


def test_a_checkpoint_that_cannot_be_removed_is_asked_about_only_when_the_run_would_rotate_it_away(uninterrupted, tmp_path, monkeypatch):
    # A read-only checkpoint that --keep never removes in this run (--keep 3, resumed from 3 to 4 with
    # 2 and 3 kept) was refused all the same: a false refusal of a run that would have finished.
    directory, _, ckpts, _ = _copy_restored(uninterrupted, tmp_path)
    ckpts.close()
    steps = sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())
    oldest = directory / "checkpoints" / str(steps[0]) / "state"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != oldest and real_access(p, mode, **kw))
    refused = f"{oldest} cannot be changed (not writable), and the run removes that checkpoint when newer ones replace it (--keep)"
    with Checkpoints(directory, keep=len(steps) + 1) as ckpts:
        assert ckpts.write_problem(steps[-1] + 1) is None  # all kept
        assert ckpts.write_problem(steps[-1] + 2) == refused  # the oldest goes
        assert ckpts.write_problem() == refused  # the end unknown: any may go
    with Checkpoints(directory, keep=len(steps)) as ckpts:
        assert ckpts.write_problem(steps[-1] + 1) == refused
