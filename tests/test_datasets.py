"""--dataset: each spec agrees with TFDS itself, its offline story is the one TFDS follows, and a 3-channel set trains.

No data for mnist, kmnist or cifar10 exists here, so everything is checked
offline: the specs against the installed TFDS builders and checksum registry,
the manual-dir messages, TFDS's own reaction to wrong files in manual_dir, and
one training step on synthetic CIFAR-shaped data.
"""

import importlib.util
import io
import re
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax import data, training
from resnet_jax.config import Config, ConfigError

NEW = ["mnist", "kmnist", "cifar10"]


def _tfds_registry(name: str) -> list[tuple[str, str]]:
    """(url, file name) pairs TFDS registers for ``name``: the names it looks for in manual_dir."""
    root = Path(importlib.util.find_spec("tensorflow_datasets").submodule_search_locations[0])
    rows = [line.split("\t") for line in (root / "url_checksums" / f"{name}.txt").read_text().splitlines() if line]
    return sorted((url, fname) for url, _size, _sha, fname in rows)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_spec_files_and_urls_are_the_ones_tfds_registers(name):
    spec = data.DATASETS[name]
    assert spec.tfds_name == name
    assert sorted(zip(spec.file_urls, spec.files)) == _tfds_registry(name)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_spec_matches_the_tfds_builder(name, tmp_path):
    tfds = data._import_tfds()
    spec = data.DATASETS[name]
    builder = tfds.builder(name, data_dir=str(tmp_path))
    assert str(builder.version) == spec.version
    assert builder.info.features["image"].shape == (spec.image_size, spec.image_size, spec.channels)
    names = builder.info.features["label"].names
    assert len(names) == spec.num_classes == 10
    if name != "cifar10":  # cifar10's names come from batches.meta.txt in the archive, at prepare time
        assert tuple(names) == spec.class_names


def test_the_new_specs():
    assert data.MNIST.class_names == tuple("0123456789")
    assert data.KMNIST.class_names == ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    assert data.CIFAR10.class_names == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    )
    shapes = {n: (s.image_size, s.channels, s.num_train, s.num_test) for n, s in data.DATASETS.items()}
    assert shapes == {
        "fashion_mnist": (28, 1, 60_000, 10_000),
        "mnist": (28, 1, 60_000, 10_000),
        "kmnist": (28, 1, 60_000, 10_000),
        "cifar10": (32, 3, 50_000, 10_000),
    }


@pytest.mark.parametrize("name", NEW)
def test_offline_without_data_names_that_datasets_files(name, tmp_path):
    spec = data.DATASETS[name]
    with pytest.raises(data.DataError) as err:
        data.load(spec, tmp_path / "empty", offline=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name} is not prepared") and "as manual_dir" in msg
    for f, url in zip(spec.files, spec.file_urls):
        assert f in msg
    assert (spec.url in msg) and spec.homepage in msg
    if name == "cifar10":
        assert "binary version" in msg and "idx3" not in msg
    if name == "kmnist":
        assert ".npz" in msg


def test_cifar10_manual_dir_without_the_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"the Python version: not what TFDS reads")
    with pytest.raises(data.DataError, match=r"lacks cifar-10-binary\.tar\.gz\. .*binary version"):
        data.load(data.CIFAR10, tmp_path / "tfds", tmp_path)


def test_cifar10_wrong_archive_is_refused_by_its_checksum(tmp_path):
    # TFDS takes manual_dir/cifar-10-binary.tar.gz by name; its registered size and
    # SHA-256 are checked before TFDS starts: a valid tar.gz that is not the
    # official one is refused, and no download is attempted.
    manual = tmp_path / "manual"
    manual.mkdir()
    payload = b"airplane\n"
    with tarfile.open(manual / "cifar-10-binary.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/batches.meta.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(data.DataError) as err:
        data.load(data.CIFAR10, tmp_path / "tfds", manual, offline=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"cifar-10-binary\.tar\.gz has [\d,]+ bytes, the official file 170,052,171", msg), msg


def test_mnist_refuses_fashion_mnist_files_of_the_same_names(tmp_path, manual_dir):
    # The MNIST family shares file names: a folder of Fashion-MNIST files passes
    # the name check, and the registered sizes and checksums must be what stops it.
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz has 26,421,880 bytes, the official file 9,912,422.*official mnist files"):
        data.load(data.MNIST, tmp_path / "tfds", manual_dir, offline=True)


def test_every_wrong_file_is_named_before_tfds_starts(tmp_path, manual_dir, capfd):
    # One truncated file and one of the right size with a flipped bit: both named in
    # one line, before TFDS prints anything (no progress bars, no partial preparation).
    manual = tmp_path / "manual"
    manual.mkdir()
    for f in data.FASHION_MNIST.files:
        (manual / f).write_bytes((manual_dir / f).read_bytes())
    labels = manual / "train-labels-idx1-ubyte.gz"
    flipped = bytearray(labels.read_bytes())
    flipped[100] ^= 1
    labels.write_bytes(bytes(flipped))
    images = manual / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:1000])
    capfd.readouterr()
    with pytest.raises(data.DataError) as err:
        data.load(data.FASHION_MNIST, tmp_path / "tfds", manual, offline=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "train-labels-idx1-ubyte.gz has the right size but not the official SHA-256" in msg
    assert "t10k-images-idx3-ubyte.gz has 1,000 bytes, the official file 4,422,102" in msg
    assert "train-images" not in msg.split(". ")[0]  # the good files are not blamed
    out, errout = capfd.readouterr()
    assert "Dl Completed" not in out + errout and "Downloading and preparing" not in out + errout


def test_train_limit_is_checked_against_the_chosen_dataset():
    Config(dataset="cifar10", train_limit=50_000)
    with pytest.raises(ConfigError, match="larger than the cifar10 split"):
        Config(dataset="cifar10", train_limit=50_001)
    with pytest.raises(ConfigError, match="--dataset must be one of"):
        Config(dataset="cifar100")


def test_cifar10_shaped_data_trains_through_the_loop():
    spec = data.CIFAR10
    config = Config(dataset="cifar10", epochs=1, batch_size=8, resize=17, eval_batch_size=8)
    rng = np.random.default_rng(0)
    shape = (spec.image_size, spec.image_size, spec.channels)
    train = data.Split(rng.integers(0, 256, (8, *shape), dtype=np.uint8), rng.integers(0, 10, 8).astype(np.int32))
    test = data.Split(rng.integers(0, 256, (4, *shape), dtype=np.uint8), rng.integers(0, 10, 4).astype(np.int32))
    data.check_splits(spec, *(data.Split(np.repeat(s.images[:1], n, 0), np.zeros(n, np.int32))
                        for s, n in ((train, spec.num_train), (test, spec.num_test))))

    model = training.make_model(config, spec.num_classes, spec.channels)
    state = training.create_train_state(model, training.make_optimizer(config), jax.random.key(0))
    assert state.params["b1"]["conv"]["kernel"].shape[2] == 3  # the first conv takes 3 channels
    result = training.fit(config, train, test, state)
    assert len(result.history) == 1 and result.history[0]["step"] == 1
    assert np.isfinite(result.final["train_loss"]) and np.isfinite(result.final["test_loss"])
    # The state changed: one SGD step was taken on 3-channel inputs.
    before = jax.tree_util.tree_leaves(state.params)
    after = jax.tree_util.tree_leaves(result.state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
