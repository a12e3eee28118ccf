"""Fashion-MNIST through TFDS, offline from the release files; the array cache; the no-data path; preprocessing."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import data


def _examples(images, labels) -> np.ndarray:
    """Each (image, label) pair as one 785-byte row, sorted: a split's content, whatever its order."""
    rows = np.concatenate([images.reshape(len(images), -1), labels.astype(np.uint8)[:, None]], axis=1)
    return np.sort(np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").ravel())


def test_tfds_splits_from_the_release_files(prepared_data_dir, manual_dir):
    import gzip

    train, test = data.load(data.FASHION_MNIST, prepared_data_dir, offline=True)
    assert train.images.shape == (60_000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 28, 28, 1) and test.images.dtype == np.uint8
    assert train.labels.dtype == test.labels.dtype == np.int32
    assert len(data.FASHION_MNIST.class_names) == 10
    # The same examples as the release files, each image with its own label (TFDS stores them
    # in an order of its own).
    for split, name in ((train, "train"), (test, "t10k")):
        with gzip.open(manual_dir / f"{name}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
        with gzip.open(manual_dir / f"{name}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        assert np.array_equal(_examples(split.images, split.labels), _examples(images, labels)), name


def test_a_dataset_may_be_named(prepared_data_dir):
    by_name = data.load("fashion_mnist", prepared_data_dir, offline=True)
    by_spec = data.load(data.FASHION_MNIST, prepared_data_dir, offline=True)
    assert all(np.array_equal(a.images, b.images) for a, b in zip(by_name, by_spec))
    with pytest.raises(ValueError, match="unknown dataset 'fashion'; one of fashion_mnist, mnist"):
        data.load("fashion", prepared_data_dir, offline=True)


def test_two_loads_at_once_on_a_new_data_dir_prepare_it_once(prepared_data_dir, tmp_path, monkeypatch):
    # Two runs started together on a new --data-dir both ran TFDS's preparation, and one failed in
    # its renames ("Cannot rename ... already exists"). Now the second waits, then reads the cache.
    import threading
    import time

    splits = data.load(data.FASHION_MNIST, prepared_data_dir, offline=True)
    calls, logs = [], []

    def slow_tfds(spec, data_dir, *args):
        calls.append(data_dir)
        time.sleep(1.0)
        return splits

    monkeypatch.setattr(data, "_load_with_tfds", slow_tfds)
    new = tmp_path / "new"
    results = [None, None]

    def load(i):
        # (A manual_dir to prepare from: offline without one, a new data dir fails at once.)
        results[i] = data.load(data.FASHION_MNIST, new, tmp_path / "manual", offline=True, log=logs.append)

    first = threading.Thread(target=load, args=(0,))
    first.start()
    deadline = time.monotonic() + 60
    while not calls:
        assert first.is_alive() and time.monotonic() < deadline, "the first load never reached TFDS"
        time.sleep(0.01)
    load(1)
    first.join()
    assert len(calls) == 1
    assert any(m.startswith("waiting for pid ") and "which is preparing fashion_mnist in" in m for m in logs), logs
    assert all(np.array_equal(r[0].images, splits[0].images) for r in results)
    assert sorted(p.name for p in new.iterdir()) == ["resnet_jax_cache"]  # the lock file is gone


def test_later_loads_come_from_the_array_cache_without_tensorflow(prepared_data_dir):
    cache = data.cache_path(data.FASHION_MNIST, prepared_data_dir)
    assert cache.is_file()
    # Block TensorFlow in a fresh interpreter: the cached load must not need it.
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "from resnet_jax import data\n"
        f"tr, te = data.load(data.FASHION_MNIST, {str(prepared_data_dir)!r}, offline=True)\n"
        "print(len(tr), len(te), int(tr.labels[:100].sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    train, _ = data.load(data.FASHION_MNIST, prepared_data_dir, offline=True)
    assert out == ["60000", "10000", str(int(train.labels[:100].sum()))]


def test_offline_without_data_says_where_to_put_the_files(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load(data.FASHION_MNIST, tmp_path / "empty", offline=True)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    # In the caller's terms: a Python caller reads load's arguments, train.py's user its flags.
    assert "(offline=True)" in msg and "pass that folder as manual_dir" in msg and "--" not in msg
    with pytest.raises(data.DataError) as err:
        data.load(data.FASHION_MNIST, tmp_path / "empty", offline=True, arg_names=data.FLAG_NAMES)
    msg = str(err.value)
    assert "(--offline)" in msg and "pass that folder as --manual-dir" in msg and "manual_dir" not in msg
    with pytest.raises(data.DataError) as err:  # names left out keep their argument names
        data.load(data.FASHION_MNIST, tmp_path / "empty", offline=True, arg_names={"manual_dir": "--fmnist-dir"})
    assert "(offline=True)" in str(err.value) and "pass that folder as --fmnist-dir" in str(err.value)
    assert not (tmp_path / "empty").exists()  # offline with nothing to prepare from: no folder made


def test_a_data_dir_whose_lock_is_a_link_is_refused_and_the_linked_file_kept(tmp_path):
    # The lock's holder writes its name into the file: through this link (a data dir from elsewhere,
    # or one in a shared /tmp), load emptied ~/.ssh/authorized_keys, say.
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA me\n")
    (tmp_path / "tfds").mkdir()
    (tmp_path / "tfds" / ".resnet_jax-fashion_mnist.lock").symlink_to(victim)
    with pytest.raises(data.DataError, match=r"\.resnet_jax-fashion_mnist\.lock is a symbolic link, not a lock file: remove it"):
        data.load(data.FASHION_MNIST, tmp_path / "tfds", offline=True)
    assert victim.read_text() == "ssh-ed25519 AAAA me\n"


def test_the_unpacking_folder_is_emptied_and_a_link_there_removed_not_followed(tmp_path):
    # TFDS unpacks into <data_dir>/downloads/extracted/resnet_jax-<name>, which _prepare empties
    # first: rmtree refused a link there (ignore_errors), and TFDS then unpacked 55 MB of files
    # into wherever a data dir from elsewhere had it point.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    extracted = tmp_path / "tfds" / "downloads" / "extracted" / "resnet_jax-fashion_mnist"
    extracted.parent.mkdir(parents=True)
    extracted.symlink_to(elsewhere, target_is_directory=True)
    data._remove(extracted)
    assert not extracted.exists() and not extracted.is_symlink() and (elsewhere / "keep.txt").read_text() == "mine"
    (extracted / "GZIP.x").mkdir(parents=True)  # a folder of a run cut short: emptied
    data._remove(extracted)
    assert not extracted.exists()


def test_manual_dir_missing_files_are_named(tmp_path, manual_dir):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train-images-idx3-ubyte.gz").symlink_to(manual_dir / "train-images-idx3-ubyte.gz")
    with pytest.raises(data.DataError, match="lacks train-labels-idx1-ubyte.gz, t10k-images"):
        data.load(data.FASHION_MNIST, tmp_path / "tfds", partial)


def test_unreachable_host_is_reported_quickly():
    # Port 9 (discard) on loopback is closed here: refused at once, no retries.
    assert "no connection to 127.0.0.1" in data._unreachable("http://127.0.0.1:9/", timeout=2)


def test_behind_a_proxy_the_proxy_is_what_must_be_reachable(monkeypatch):
    # TFDS downloads through requests, which takes the proxy from the environment; the quick
    # probe must try the same road, or a user behind a proxy could never download.
    import socket

    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    url = "http://fashion-mnist.invalid/train-images-idx3-ubyte.gz"  # .invalid never resolves
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    assert data._unreachable(url, timeout=2) is None
    server.close()
    assert "no connection to the proxy 127.0.0.1: " in data._unreachable(url, timeout=2)
    monkeypatch.setenv("no_proxy", "fashion-mnist.invalid")  # the host itself is tried again
    assert "no connection to fashion-mnist.invalid: " in data._unreachable(url, timeout=2)
    monkeypatch.delenv("no_proxy")
    monkeypatch.delenv("http_proxy")
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{port}")  # requests takes it for every scheme
    assert "no connection to the proxy 127.0.0.1: " in data._unreachable(url, timeout=2)


def test_tensorflow_set_up_by_the_calling_program_is_left_as_it_is(monkeypatch):
    # TensorFlow refuses to change its visible devices once it has started with a GPU visible:
    # that was a RuntimeError out of data.load; the data needs no GPU, so it goes on, and says so.
    import tensorflow as tf

    def started(*args, **kwargs):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", started)
    notes = []
    assert data._import_tfds(notes.append).__name__ == "tensorflow_datasets"
    assert len(notes) == 1 and notes[0].startswith("TensorFlow was already set up by this program with a GPU visible")


def test_a_version_this_tfds_cannot_build_is_one_message(tmp_path, manual_dir):
    # The array cache is named for spec.version: TFDS must build that version, not its default.
    import dataclasses

    spec = dataclasses.replace(data.FASHION_MNIST, version="9.9.9")
    with pytest.raises(data.DataError, match=r"cannot build fashion_mnist version 9\.9\.9, which resnet_jax reads"):
        data.load(spec, tmp_path / "tfds", manual_dir, offline=True)
    assert not (tmp_path / "tfds" / "resnet_jax_cache").exists()


def test_a_cache_of_impossible_labels_is_rebuilt_and_killed_writes_are_cleared(prepared_data_dir, tmp_path):
    import shutil

    copy = tmp_path / "tfds"
    shutil.copytree(prepared_data_dir, copy)
    cache = data.cache_path(data.FASHION_MNIST, copy)
    with np.load(cache) as z:
        arrays = dict(z)
    want = arrays["train_labels"].copy()
    arrays["train_labels"] = want + 1  # 1..10: a cache from elsewhere, or hand-made
    np.savez(cache, **arrays)
    killed = cache.parent / f".{cache.name}.k1ll3d.tmp"  # what a write killed midway leaves
    killed.write_bytes(b"x" * 1000)
    notes = []
    train, _ = data.load(data.FASHION_MNIST, copy, offline=True, log=notes.append)
    assert np.array_equal(train.labels, want)
    assert "train split has labels int32 from 1 to 10; expected integers 0 to 9" in notes[0]
    assert not killed.exists() and sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def _garble(b: bytes) -> bytes:
    mid = len(b) // 2
    return b[:mid] + bytes(x ^ 0xFF for x in b[mid : mid + 4096]) + b[mid + 4096 :]


DAMAGE = {
    "not-an-npz": lambda b: b"not an npz",
    "truncated": lambda b: b[: len(b) // 2],  # an interrupted copy: zipfile.BadZipFile
    "garbled": _garble,  # a bad CRC inside one array
    "zeroed": lambda b: bytes(len(b)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_corrupt_cache_is_ignored_and_rebuilt(prepared_data_dir, tmp_path, damage):
    import shutil

    copy = tmp_path / "tfds"
    shutil.copytree(prepared_data_dir, copy)
    cache = data.cache_path(data.FASHION_MNIST, copy)
    cache.write_bytes(DAMAGE[damage](cache.read_bytes()))
    notes = []
    train, _ = data.load(data.FASHION_MNIST, copy, offline=True, log=notes.append)
    assert len(train) == 60_000 and [n for n in notes if "unreadable array cache" in n] == [notes[0]]  # said once
    with np.load(cache) as z:
        assert z["train_images"].shape == (60_000, 28, 28, 1)


def test_a_cache_declaring_arrays_larger_than_the_spec_is_rebuilt_before_any_is_read(tmp_path):
    # np.load allocates what an array's header declares before it reads: a compressed cache of
    # 3 MB can declare 3 GB. Here train_images declares 10 times the spec's images and holds no
    # data at all, so a read would have failed on its own (an EOF), not with the headers' message.
    import dataclasses
    import io
    import zipfile

    spec = dataclasses.replace(data.FASHION_MNIST, num_train=4, num_test=2)
    arrays = {"train_images": np.zeros((4, 28, 28, 1), np.uint8), "train_labels": np.arange(4, dtype=np.int32),
              "test_images": np.zeros((2, 28, 28, 1), np.uint8), "test_labels": np.arange(2, dtype=np.int32)}
    cache = data.cache_path(spec, tmp_path)
    cache.parent.mkdir()

    def write(bomb: bool, version: int | None = None):
        with zipfile.ZipFile(cache, "w", zipfile.ZIP_DEFLATED) as z:
            for key, a in arrays.items():
                member = io.BytesIO()
                if bomb and key == "train_images":
                    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (40, 28, 28, 1)})
                elif version and key == "train_images":  # the right array, in a format np.savez never writes
                    np.lib.format.write_array_header_2_0(member, np.lib.format.header_data_from_array_1_0(a))
                    member.write(a.tobytes())
                    member.getbuffer()[6] = version  # the major version, after b"\x93NUMPY"
                else:
                    np.save(member, a)
                z.writestr(f"{key}.npy", member.getvalue())

    write(bomb=False)
    notes = []
    train, test = data._read_cache(spec, cache, notes.append)
    assert notes == [] and len(train) == 4 and test.labels.tolist() == [0, 1]
    write(bomb=True)
    assert data._read_cache(spec, cache, notes.append) is None
    assert notes == [f"ignoring unreadable array cache {cache} (DataError: train_images declares (40, 28, 28, 1) uint8; "
                     "expected (4, 28, 28, 1) uint8); reading the TFDS data again"]
    for version, why in ((3, "DataError: train_images is in .npy format 3.0, not 1.0 or 2.0, which np.savez writes for these arrays"),
                         (4, "ValueError: an .npy format 4.0, which NumPy does not read")):
        notes.clear()
        write(bomb=False, version=version)
        assert data._read_cache(spec, cache, notes.append) is None
        assert notes == [f"ignoring unreadable array cache {cache} ({why}); reading the TFDS data again"]


def _truncate_a_record(copy):
    record = next((copy / "fashion_mnist").glob("*/fashion_mnist-train.tfrecord*"))
    record.write_bytes(record.read_bytes()[:1000])


def _garble_the_info(copy):
    next((copy / "fashion_mnist").glob("*/dataset_info.json")).write_text("{garbage")


TFDS_DAMAGE = {"truncated-record": _truncate_a_record, "garbled-info": _garble_the_info}


@pytest.mark.parametrize("damage", TFDS_DAMAGE)
def test_damaged_tfds_data_is_one_message_naming_what_to_delete(prepared_data_dir, tmp_path, damage):
    import shutil

    copy = tmp_path / "tfds"
    shutil.copytree(prepared_data_dir, copy)
    data.cache_path(data.FASHION_MNIST, copy).unlink()  # so that TFDS's files are read
    TFDS_DAMAGE[damage](copy)
    with pytest.raises(data.DataError) as err:
        data.load(data.FASHION_MNIST, copy, offline=True)
    message = str(err.value)
    assert "cannot be read" in message and f"delete {copy / 'fashion_mnist'} and run again" in message
    assert "\n" not in message


def test_preprocess_gives_the_chapters_inputs_bit_for_bit():
    """d2l's Resize(96) (Pillow's bilinear resize of the uint8 image), then ToTensor (k / 255 in float32)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    ours = np.asarray(data.preprocess(jnp.asarray(images), 96))
    assert ours.shape == (4, 96, 96, 1) and ours.dtype == np.float32
    pil_u8 = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((96, 96), Image.Resampling.BILINEAR)) for im in images])
    np.testing.assert_array_equal(ours[..., 0], pil_u8.astype(np.float32) / np.float32(255))
    # No resize at the native size: ToTensor's x / 255 alone.
    np.testing.assert_array_equal(np.asarray(data.preprocess(jnp.asarray(images), 28)), images.astype(np.float32) / np.float32(255))
    # bfloat16 compute: the same float32 values, then rounded once to bf16.
    bf16 = data.preprocess(jnp.asarray(images), 96, jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(jnp.asarray(ours).astype(jnp.bfloat16)))


def test_take_refuses_what_numpy_slicing_would_quietly_accept():
    split = data.Split(np.zeros((10, 28, 28, 1), np.uint8), np.arange(10, dtype=np.int32))
    assert split.take(None) is split and len(split.take(10)) == 10 and split.take(np.int64(3)).labels.tolist() == [0, 1, 2]
    for n in (-5, 0, 11, 2.5, True):  # -5 was all but the last 5; 11 was all 10
        with pytest.raises(ValueError, match=r"take needs an integer 1 <= n <= 10 \(the split's size\)"):
            split.take(n)


def test_missing_unpacked_and_wrong_files_are_named_in_one_message(tmp_path, manual_dir):
    # They were named one kind per run: first the missing file, and only once that was
    # fixed the truncated one; the unpacked copy sitting there went unmentioned.
    import gzip

    manual = tmp_path / "manual"
    manual.mkdir()
    for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (manual / f).symlink_to(manual_dir / f)
    (manual / "train-labels-idx1-ubyte").write_bytes(gzip.decompress((manual_dir / "train-labels-idx1-ubyte.gz").read_bytes()))
    (manual / "t10k-labels-idx1-ubyte.gz").write_bytes((manual_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()[:1000])
    with pytest.raises(data.DataError) as err:
        data.load(data.FASHION_MNIST, tmp_path / "tfds", manual, offline=True)
    assert str(err.value).startswith(
        f"manual_dir {manual} lacks train-labels-idx1-ubyte.gz (its unpacked train-labels-idx1-ubyte is there: "
        "give the file as downloaded); t10k-labels-idx1-ubyte.gz has 1,000 bytes, the official file 5,148. "
        "They must be the official fashion_mnist files"), err.value
