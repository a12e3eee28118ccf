"""Fashion-MNIST through TensorFlow Datasets, held as uint8 arrays.

The way in is TFDS's own ``fashion_mnist`` builder: it downloads the four
official files (or takes them from ``manual_dir``), verifies their checksums and
prepares the splits. We read each split once as whole arrays (the two splits are
55 MB of uint8) and cache them as an ``.npz`` beside the TFDS data, so later runs
load in a fraction of a second and never import TensorFlow.

TensorFlow is only imported to prepare or read TFDS data, and is told to see no
GPU before it does anything, so it never takes accelerator memory from JAX.

Preprocessing (the recipe's ``ToTensor`` + ``Resize``) is :func:`preprocess`, a
pure JAX function applied inside the jitted steps: the host only moves uint8.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class DataError(Exception):
    """The data cannot be had; the message says what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the program needs to know about a TFDS dataset before touching it."""

    tfds_name: str
    version: str
    num_train: int
    num_test: int
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    url: str  # where TFDS downloads from (probed before a download is attempted)
    files: tuple[str, ...]  # the files TFDS accepts in manual_dir
    homepage: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


FASHION_MNIST = DatasetSpec(
    tfds_name="fashion_mnist",
    version="3.0.1",
    num_train=60_000,
    num_test=10_000,
    image_size=28,
    channels=1,
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    files=(
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ),
    homepage="https://github.com/zalandoresearch/fashion-mnist",
)

DATASETS: dict[str, DatasetSpec] = {"fashion_mnist": FASHION_MNIST}


@dataclass(frozen=True)
class Split:
    """One split as host arrays: images (N, H, W, C) uint8, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None) -> "Split":
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def hold_out(self, n: int) -> tuple["Split", "Split"]:
        """(all but the last ``n`` examples, the last ``n``): a validation split carved from this one.

        The last examples, not a random draw: the carving depends on nothing but ``n``,
        so a resumed run carves the same split.
        """
        return Split(self.images[:-n], self.labels[:-n]), Split(self.images[-n:], self.labels[-n:])


def default_data_dir() -> Path:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def cache_path(spec: DatasetSpec, data_dir: Path) -> Path:
    return Path(data_dir) / "resnet_jax_cache" / f"{spec.tfds_name}-{spec.version}.npz"


def load(
    spec: DatasetSpec,
    data_dir: str | Path | None = None,
    manual_dir: str | Path | None = None,
    offline: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> tuple[Split, Split]:
    """(train, test) splits of ``spec`` from the array cache, preparing it through TFDS on first use.

    ``manual_dir``: a folder holding the dataset's official files (TFDS verifies
    their checksums). ``offline``: never try a download; fail with instructions
    if the data is neither prepared nor in ``manual_dir``.
    Raises :class:`DataError` with a message for the user when the data cannot be had.
    """
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    cache = cache_path(spec, data_dir)
    if cache.exists():
        try:
            with np.load(cache) as z:
                splits = Split(z["train_images"], z["train_labels"]), Split(z["test_images"], z["test_labels"])
            _check(spec, *splits)
            return splits
        except (OSError, ValueError, KeyError, DataError) as err:
            log(f"ignoring unreadable array cache {cache} ({err}); reading the TFDS data again")

    train, test = _load_with_tfds(spec, data_dir, manual_dir, offline, log)
    _check(spec, train, test)
    try:
        _save_atomically(cache, train, test)
    except OSError as err:  # a read-only data_dir still works, just without the cache
        log(f"could not write the array cache {cache}: {err}")
    return train, test


def _import_tfds():
    try:
        import tensorflow as tf
    except ImportError as err:  # pragma: no cover - both are declared dependencies
        raise DataError(f"preparing TFDS data needs TensorFlow ({err}); pip install tensorflow-cpu") from err
    # Before anything else: TensorFlow must not grab the accelerator JAX uses.
    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    return tfds


def _load_with_tfds(spec, data_dir: Path, manual_dir, offline: bool, log) -> tuple[Split, Split]:
    tfds = _import_tfds()
    builder = tfds.builder(spec.tfds_name, data_dir=str(data_dir))
    if not builder.is_prepared():
        _prepare(tfds, builder, spec, data_dir, manual_dir, offline, log)
    splits = []
    for name in ("train", "test"):
        arrays = tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1))
        splits.append(Split(np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32)))
    return splits[0], splits[1]


def _missing_files_help(spec: DatasetSpec) -> str:
    files = ", ".join(spec.files)
    return (
        f"Download the official files ({files}) from {spec.homepage}, put them in one folder, "
        f"and pass that folder with --manual-dir."
    )


def _prepare(tfds, builder, spec, data_dir, manual_dir, offline, log) -> None:
    if manual_dir is not None:
        manual_dir = Path(manual_dir).expanduser()
        missing = [f for f in spec.files if not (manual_dir / f).is_file()]
        if missing:
            raise DataError(
                f"--manual-dir {manual_dir} lacks {', '.join(missing)}. {_missing_files_help(spec)}"
            )
    elif offline:
        raise DataError(
            f"{spec.tfds_name} is not prepared in {data_dir} and downloads are off (--offline). "
            + _missing_files_help(spec)
        )
    else:
        # TFDS retries a failed download for minutes; a quick probe fails in seconds.
        reason = _unreachable(spec.url)
        if reason:
            raise DataError(
                f"{spec.tfds_name} is not prepared in {data_dir} and cannot be downloaded "
                f"({reason}). " + _missing_files_help(spec)
            )
    log(f"preparing {spec.tfds_name} with TFDS in {data_dir} (once)")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as err:  # checksum mismatch, truncated file, lost connection, full disk...
        raise DataError(f"TFDS could not prepare {spec.tfds_name}: {type(err).__name__}: {err}") from err


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the URL's host opens, else why not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return None
    except OSError as err:
        return f"no connection to {parts.hostname}: {err}"


def _check(spec: DatasetSpec, train: Split, test: Split) -> None:
    shape = (spec.image_size, spec.image_size, spec.channels)
    for name, split, n in (("train", train, spec.num_train), ("test", test, spec.num_test)):
        if split.images.shape != (n, *shape) or split.images.dtype != np.uint8 or split.labels.shape != (n,):
            raise DataError(
                f"{spec.tfds_name} {name} split has images {split.images.shape} {split.images.dtype} "
                f"and labels {split.labels.shape}; expected ({n}, {', '.join(map(str, shape))}) uint8 and ({n},)"
            )


def _save_atomically(path: Path, train: Split, test: Split) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                train_images=train.images, train_labels=train.labels,
                test_images=test.images, test_labels=test.labels,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def preprocess(images: jax.Array, size: int, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> float in [0, 1], bilinearly resized to ``size`` x ``size``.

    The recipe does ``transforms.Resize(96)`` on the PIL image and then
    ``ToTensor()``. Here the order is swapped (scale, then resize in float) so
    it runs on the device inside the jitted step. The interpolation is the same
    as PIL's bilinear filter (equal to 5e-6 when PIL resizes in float mode);
    PIL's uint8 path rounds to whole grey levels after each of its two
    separable passes, so the chapter's inputs differ from ours by at most
    1/255 (tests/test_data.py measures both).
    """
    x = images.astype(jnp.float32) / 255.0
    n, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (n, size, size, c), method="bilinear")
    return x.astype(dtype)
