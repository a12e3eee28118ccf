"""Fashion-MNIST (and MNIST, KMNIST, CIFAR-10) through TensorFlow Datasets, held as uint8 arrays.

The way in is TFDS's own builder for the dataset: it downloads the official
files (or takes them from ``manual_dir``), verifies their checksums and
prepares the splits. We read each split once as whole arrays (Fashion-MNIST's
two splits are 55 MB of uint8, CIFAR-10's 184 MB) and cache them as an ``.npz``
beside the TFDS data, so later runs load in a fraction of a second and never
import TensorFlow.

TensorFlow is only imported to prepare or read TFDS data, and is told to see no
GPU before it does anything, so it never takes accelerator memory from JAX.

Preprocessing (the chapter's ``Resize`` + ``ToTensor``, bit for bit) is :func:`preprocess`,
a pure JAX function applied inside the jitted steps: the host only moves uint8.
"""

from __future__ import annotations

import contextlib
import io
import logging
import numbers
import os
import re
import shutil
import socket
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import first_line
from resnet_jax import files, transforms
from resnet_jax.files import atomic_write


class DataError(Exception):
    """The data cannot be had; the message says what to do."""


# How a DataError names load's arguments, in the caller's own terms: a Python caller reads
# "manual_dir", a user of train.py its flags (resnet_jax/cli.py passes FLAG_NAMES).
ARG_NAMES = MappingProxyType({"manual_dir": "manual_dir", "data_dir": "data_dir", "offline": "offline=True"})
FLAG_NAMES = MappingProxyType({"manual_dir": "--manual-dir", "data_dir": "--data-dir", "offline": "--offline"})


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
    # The files TFDS accepts in manual_dir. TFDS's download manager looks there
    # for the file name registered beside each URL's checksum (in
    # tensorflow_datasets/url_checksums/<name>.txt), takes a file of that name
    # instead of downloading, and still verifies its size and SHA-256: the
    # files must be exactly the published ones, as downloaded (not unpacked).
    files: tuple[str, ...]
    homepage: str
    note: str = ""  # what else a user fetching the files by hand must know

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def file_urls(self) -> tuple[str, ...]:
        """Where TFDS downloads each of ``files`` from."""
        if self.url.endswith("/"):  # a folder holding the files (the MNIST family)
            return tuple(self.url + f for f in self.files)
        return (self.url,)  # the one file itself (CIFAR-10's archive)


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

# The MNIST family shares one file format and its file names; only the folder differs.
_MNIST_FILES = FASHION_MNIST.files

MNIST = DatasetSpec(
    tfds_name="mnist",
    version="3.0.1",
    num_train=60_000,
    num_test=10_000,
    image_size=28,
    channels=1,
    class_names=tuple(str(d) for d in range(10)),
    # TFDS fetches MNIST from the CVDF mirror; yann.lecun.com often refuses downloads.
    url="https://storage.googleapis.com/cvdf-datasets/mnist/",
    files=_MNIST_FILES,
    homepage="http://yann.lecun.com/exdb/mnist/",
)

KMNIST = DatasetSpec(
    tfds_name="kmnist",
    version="3.0.1",
    num_train=60_000,
    num_test=10_000,
    image_size=28,
    channels=1,
    # One hiragana per row of the syllabary, romanised as TFDS names them.
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    url="http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
    files=_MNIST_FILES,
    homepage="http://codh.rois.ac.jp/kmnist/index.html.en",
    note="Kuzushiji-MNIST is also published as .npz files; TFDS takes only the MNIST-format .gz files.",
)

CIFAR10 = DatasetSpec(
    tfds_name="cifar10",
    version="3.0.2",
    num_train=50_000,
    num_test=10_000,
    image_size=32,
    channels=3,
    # TFDS reads the names from batches.meta.txt inside the archive when it prepares the data.
    class_names=(
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    files=("cifar-10-binary.tar.gz",),
    homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    note=(
        "It is the 'binary version' archive (cifar-10-binary.tar.gz), not the Python or Matlab one; "
        "leave it packed, TFDS extracts it."
    ),
)

DATASETS: dict[str, DatasetSpec] = {s.tfds_name: s for s in (FASHION_MNIST, MNIST, KMNIST, CIFAR10)}


@dataclass(frozen=True)
class Split:
    """One split as host arrays: images (N, H, W, C) uint8, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        # Checked here, at the edge: on the device a label without its image gathers a
        # clamped index (another image, silently), and a float image is scaled twice.
        images, labels = self.images, self.labels
        if np.ndim(images) != 4 or getattr(images, "dtype", None) != np.uint8:
            raise ValueError(f"Split images must be uint8 (N, H, W, C), got {getattr(images, 'dtype', type(images).__name__)} "
                             f"of shape {np.shape(images)}")
        if np.ndim(labels) != 1 or not np.issubdtype(getattr(labels, "dtype", np.float64), np.integer):
            raise ValueError(f"Split labels must be integer class indices (N,), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} of shape {np.shape(labels)}")
        if len(images) != len(labels):
            raise ValueError(f"Split has {len(images)} images but {len(labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None) -> "Split":
        """The first ``n`` examples (all when ``n`` is None); ValueError unless 1 <= n <= len(self).

        Strict, as train.py's --train-limit is: numpy's slicing would take -5 as "all but the
        last 5" and 70,000 as all 60,000, and a typo would go unnoticed.
        """
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(self):
            raise ValueError(f"take needs an integer 1 <= n <= {len(self)} (the split's size), got {n!r}")
        return Split(self.images[:n], self.labels[:n])

    def hold_out(self, n: int) -> tuple["Split", "Split"]:
        """(all but the last ``n`` examples, the last ``n``): a validation split carved from this one.

        The last examples, not a random draw: the carving depends on nothing but ``n``,
        so a resumed run carves the same split.
        """
        # n = 0: images[:-0] is empty, all would be "held out"; 50.5 failed in NumPy's slicing.
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n < len(self):
            raise ValueError(f"hold_out needs an integer 0 < n < {len(self)} (the split's size), got {n!r}")
        return Split(self.images[:-n], self.labels[:-n]), Split(self.images[-n:], self.labels[-n:])


def default_data_dir() -> Path:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def cache_path(spec: DatasetSpec, data_dir: Path) -> Path:
    return Path(data_dir) / "resnet_jax_cache" / f"{spec.tfds_name}-{spec.version}.npz"


def load(
    spec: DatasetSpec | str,
    data_dir: str | Path | None = None,
    manual_dir: str | Path | None = None,
    offline: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    *,
    arg_names: Mapping[str, str] = ARG_NAMES,
) -> tuple[Split, Split]:
    """(train, test) splits of ``spec`` from the array cache, preparing it through TFDS on first use.

    ``manual_dir``: a folder holding the dataset's official files (TFDS verifies
    their checksums). ``offline``: never try a download; fail with instructions
    if the data is neither prepared nor in ``manual_dir``.
    ``spec``: a :class:`DatasetSpec` (``FASHION_MNIST``...) or its name in ``DATASETS``.
    Raises :class:`DataError` with a message for the user when the data cannot be had; the message
    names the arguments as ``arg_names`` says (``FLAG_NAMES``: as train.py's flags; any it leaves
    out as in ``ARG_NAMES``).

    When it reads TFDS's data (no array cache yet), it imports TensorFlow, and that changes the
    process: TensorFlow is told to see no GPU (JAX's memory) for the rest of it, and the
    environment gets ``TF_CPP_MIN_LOG_LEVEL=2`` and ``TF_ENABLE_ONEDNN_OPTS=0`` unless they are
    set (see ``_import_tfds``). A program that uses TensorFlow itself should set it up first.
    """
    names = {**ARG_NAMES, **arg_names}
    if isinstance(spec, str):
        if spec not in DATASETS:
            raise ValueError(f"unknown dataset {spec!r}; one of {', '.join(DATASETS)}")
        spec = DATASETS[spec]
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if offline and manual_dir is None and not data_dir.exists():
        # Nothing to read and nothing to prepare from: said before the lock below makes the
        # folder, so a mistyped --data-dir leaves no trace.
        raise _offline_error(spec, data_dir, names)
    cache = cache_path(spec, data_dir)
    problems: list[str] = []
    if (splits := _read_cache(spec, cache, problems.append)) is not None:
        return splits
    for problem in problems:
        log(problem)
    # One program at a time prepares a data dir: two runs started together on a new one
    # collided in TFDS's renames ("Cannot rename ... already exists"), and one of them failed.
    with _preparing(spec, data_dir, log):
        # Written by the run we waited for? (A damaged cache is said once, above.)
        if (splits := _read_cache(spec, cache, (lambda msg: None) if problems else log)) is not None:
            return splits
        train, test = _load_with_tfds(spec, data_dir, manual_dir, offline, log, names)
        check_splits(spec, train, test)
        try:
            _save_atomically(cache, train, test)
        except OSError as err:  # a read-only data_dir still works, just without the cache
            log(f"could not write the array cache {cache}: {err.strerror or err}")
    return train, test


def _read_cache(spec: DatasetSpec, cache: Path, log) -> tuple[Split, Split] | None:
    """The splits from the array cache; None when there is none or it cannot be used (it is then rebuilt)."""
    if not cache.exists():
        return None
    try:
        with open(cache, "rb") as f:
            _check_cache_headers(spec, f)
            f.seek(0)  # the file just checked, not one renamed over it since
            with np.load(f) as z:
                splits = Split(z["train_images"], z["train_labels"]), Split(z["test_images"], z["test_labels"])
        check_splits(spec, *splits)
        return splits
    except Exception as err:  # the cache is disposable: truncated, garbled (bad CRC, EOFError), foreign...
        log(f"ignoring unreadable array cache {cache} ({type(err).__name__}: {err}); reading the TFDS data again")
        return None


def _check_cache_headers(spec: DatasetSpec, f) -> None:
    """DataError unless each array in the cache ``f`` declares the shape and dtype ``spec`` gives it.

    Read from the arrays' .npy headers alone: a compressed cache of 3 MB can declare gigabytes.
    """
    side = (spec.image_size, spec.image_size, spec.channels)
    with zipfile.ZipFile(f) as z:
        for split, n in (("train", spec.num_train), ("test", spec.num_test)):
            for key, want in ((f"{split}_images", (n, *side)), (f"{split}_labels", (n,))):
                with z.open(f"{key}.npy") as member:
                    version, shape, dtype = npy_header(member)
                if version not in ((1, 0), (2, 0)):  # 3.0 (a UTF-8 header) is never written by np.savez
                    raise DataError(f"{key} is in .npy format {version[0]}.{version[1]}, not 1.0 or 2.0, "
                                    "which np.savez writes for these arrays")
                images = key.endswith("_images")
                if shape != want or (dtype != np.uint8 if images else not np.issubdtype(dtype, np.integer)):
                    raise DataError(f"{key} declares {shape} {dtype}; expected {want} {'uint8' if images else 'integers'}")


_MAX_NPY_HEADER = 10_000  # the characters np.load reads of a header (its max_header_size, without allow_pickle)


def npy_header(f) -> tuple[tuple[int, int], tuple[int, ...], np.dtype]:
    """(format version, shape, dtype) that the .npy file ``f`` declares, read from its header alone.

    np.load allocates whatever a header declares before it reads a byte, so 100 bytes of file can
    ask it for terabytes: check what this returns first. ValueError (or EOFError) where ``f`` holds
    no .npy header of a format np.load reads (1.0, 2.0, 3.0).
    """
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"an .npy format {version[0]}.{version[1]}, which NumPy does not read")
    if version == (1, 0):  # its header's length is 2 bytes: at most 64 kB are read
        shape, _, dtype = fmt.read_array_header_1_0(f)
        return version, shape, dtype
    # 2.0 and 3.0 give the header's length in 4 bytes, and NumPy reads all of it (up to 4 GB, a
    # buffer allocated whole) before its limit of 10,000 characters applies: read here, within that
    # limit. 3.0 is 2.0 with a UTF-8 header, which NumPy has no public reader for: decoded as np.load
    # decodes it (its limit counts characters, up to 40,000 bytes), then handed to the 2.0 reader in
    # ASCII (backslashreplace: "\xe9" in a string literal reads back as "é").
    length = int.from_bytes(_read_exactly(f, 4, "array header length"), "little")
    if length > 4 * _MAX_NPY_HEADER:  # over _MAX_NPY_HEADER characters, whatever they are
        raise ValueError(f"an .npy header of {length:,} bytes, which np.load does not read")
    text = _read_exactly(f, length, "array header").decode("utf-8" if version == (3, 0) else "latin1")
    if len(text) > _MAX_NPY_HEADER:
        raise ValueError(f"an .npy header of {len(text):,} characters, which np.load does not read")
    ascii_ = text.encode("ascii", "backslashreplace")
    shape, _, dtype = fmt.read_array_header_2_0(io.BytesIO(len(ascii_).to_bytes(4, "little") + ascii_),
                                                max_header_size=len(ascii_))
    return version, shape, dtype


def _read_exactly(f, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"EOF: reading {what}, expected {n} bytes got {len(data)}")
    return data


@contextlib.contextmanager
def _preparing(spec: DatasetSpec, data_dir: Path, log):
    """Hold ``data_dir``'s lock for ``spec`` (waiting for another program that holds it); without a
    lock where the folder cannot take one (read-only: nothing will be written there either)."""
    lock = data_dir / f".resnet_jax-{spec.tfds_name}.lock"
    say = lambda holder: log(f"waiting for {holder or 'another program'}, which is preparing {spec.tfds_name} in {data_dir}")
    with contextlib.ExitStack() as stack:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(files.held(lock, on_wait=say))
        except files.NotALockFile as err:  # a link planted there: refused, not written through
            raise DataError(f"{lock} {err.strerror}") from None
        except OSError:
            pass
        yield


def _import_tfds(log: Callable[[str], None] = lambda msg: None):
    # TensorFlow only prepares the data here: its C++ INFO and WARNING lines (oneDNN
    # notices, CUDA probing) are noise to our users. Errors still show; a user's own
    # TF_CPP_MIN_LOG_LEVEL wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow 2.21 prints its oneDNN notice whatever the level; oneDNN changes only the
    # rounding of TensorFlow's own float ops, and preparing the data does none (it decodes
    # and copies uint8 images), so turning it off changes no byte of the data.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError as err:  # pragma: no cover - both are declared dependencies
        raise DataError(f"preparing TFDS data needs TensorFlow ({err}); pip install tensorflow-cpu") from err
    # Before anything else: TensorFlow must not grab the accelerator JAX uses.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as err:  # "Visible devices cannot be modified after being initialized"
        # The calling program ran TensorFlow first, with a GPU visible: that is its setting to
        # keep (and TensorFlow may already hold memory there). Preparing the data needs no GPU.
        log(f"TensorFlow was already set up by this program with a GPU visible, so it is left as it is "
            f"({err}); call tf.config.set_visible_devices([], 'GPU') before TensorFlow's first use to keep "
            "its memory for JAX")
    import tensorflow_datasets as tfds

    return tfds


def _load_with_tfds(spec, data_dir: Path, manual_dir, offline: bool, log, names) -> tuple[Split, Split]:
    tfds = _import_tfds(log)
    # The version the array cache is named for, not whatever this TFDS would default to.
    cls = tfds.builder_cls(spec.tfds_name)
    versions = sorted({str(cls.VERSION), *map(str, cls.SUPPORTED_VERSIONS)})
    if spec.version not in versions:
        raise DataError(
            f"this tensorflow-datasets ({getattr(tfds, '__version__', '?')}) cannot build {spec.tfds_name} "
            f"version {spec.version}, which resnet_jax reads (it has {', '.join(versions)}); install a "
            "tensorflow-datasets that builds it (tested: 4.9.10, .ci/floors.txt)"
        )
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # TFDS warns that an unprepared folder has no dataset_info.json: we know
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=str(data_dir), version=spec.version)
        prepared = builder.is_prepared()
    except Exception as err:  # a garbled dataset_info.json...
        raise _unreadable(spec, data_dir, err, names) from err
    finally:
        absl.setLevel(level)
    if not prepared:
        _prepare(tfds, builder, spec, data_dir, manual_dir, offline, log, names)
    splits = []
    try:
        for name in ("train", "test"):
            arrays = tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1))
            splits.append(Split(np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32)))
    except Exception as err:  # a truncated or deleted record file (TensorFlow's DataLossError, NotFoundError)...
        raise _unreadable(spec, data_dir, err, names) from err
    return splits[0], splits[1]


def _unreadable(spec: DatasetSpec, data_dir: Path, err: Exception, names) -> DataError:
    """Prepared TFDS data that cannot be read: what to delete so that the next run prepares it again."""
    # TensorFlow's op errors wrap the reason: "{{function_node ...}} truncated record ... [Op:...]".
    reason = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", first_line(err))
    return DataError(
        f"the prepared TFDS data of {spec.tfds_name} in {data_dir} cannot be read "
        f"({type(err).__name__}: {reason}); delete {data_dir / spec.tfds_name} and run again "
        f"(TFDS prepares it anew, from {names['manual_dir']} or a download), or give another {names['data_dir']}"
    )


def _missing_files_help(spec: DatasetSpec, names) -> str:
    files = ", ".join(spec.files)
    where = spec.url if len(spec.files) > 1 else spec.file_urls[0]
    return (
        f"Download the official {'files' if len(spec.files) > 1 else 'file'} ({files}) from {where} "
        f"(see {spec.homepage}), put {'them' if len(spec.files) > 1 else 'it'} as downloaded in one folder, "
        f"and pass that folder as {names['manual_dir']}." + (f" {spec.note}" if spec.note else "")
    )


def _offline_error(spec: DatasetSpec, data_dir: Path, names) -> DataError:
    return DataError(
        f"{spec.tfds_name} is not prepared in {data_dir} and downloads are off ({names['offline']}). "
        + _missing_files_help(spec, names)
    )


def _prepare(tfds, builder, spec, data_dir, manual_dir, offline, log, names) -> None:
    if manual_dir is not None:
        manual_dir = Path(manual_dir).expanduser()
        _check_manual_files(builder, spec, manual_dir, names)
    elif offline:
        raise _offline_error(spec, data_dir, names)
    else:
        # TFDS retries a failed download for minutes; a quick probe fails in seconds.
        reason = _unreachable(spec.url)
        if reason:
            raise DataError(
                f"{spec.tfds_name} is not prepared in {data_dir} and cannot be downloaded "
                f"({reason}). " + _missing_files_help(spec, names)
            )
    log(f"preparing {spec.tfds_name} with TFDS in {data_dir} (once)")
    # TFDS unpacks a manual file to <data_dir>/downloads/extracted/GZIP.<file name>, shared by
    # every dataset, and reuses what it finds there by name alone: MNIST, KMNIST and
    # Fashion-MNIST have the same file names, so one would be built from another's images. Each
    # dataset unpacks in a folder of its own (under this lock), emptied before and after: only
    # the files just checked are read, and nothing is left to go stale.
    extracted = data_dir / "downloads" / "extracted" / f"resnet_jax-{spec.tfds_name}"
    _remove(extracted)
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None, extract_dir=str(extracted))
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as err:  # checksum mismatch, truncated archive, lost connection, full disk...
        if type(err).__name__ != "NonMatchingChecksumError":  # TFDS does not export the class
            raise DataError(f"TFDS could not prepare {spec.tfds_name}: {type(err).__name__}: {err}") from err
        # TFDS's message spans several lines; the user needs to know which file and what to do.
        raise DataError(
            f"TFDS could not prepare {spec.tfds_name}: a file has the wrong size or checksum "
            f"({first_line(err)}); it must be the official {spec.tfds_name} file, complete and as downloaded. "
            + _missing_files_help(spec, names)
        ) from err
    finally:
        _remove(extracted)


def _remove(folder: Path) -> None:
    """Delete ``folder``; a link there is deleted itself (rmtree refuses one, and TFDS then wrote
    the unpacked files wherever a data dir from elsewhere had it point)."""
    if folder.is_symlink():
        with contextlib.suppress(OSError):
            folder.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _check_manual_files(builder, spec: DatasetSpec, manual_dir: Path, names) -> None:
    """Every file in ``manual_dir`` there, and of TFDS's own registered size and SHA-256, before TFDS starts.

    TFDS would find a wrong file too, but only after printing its progress bars,
    and it names only the first; this names every missing and every wrong file, in one message.
    """
    import hashlib

    try:
        expected = {info.filename: info for info in builder.url_infos.values()}
    except Exception:  # a TFDS without url_infos: its own check during preparation remains
        expected = {}
    missing, wrong = [], []
    for name in spec.files:
        path = manual_dir / name
        if not path.is_file():
            unpacked = manual_dir / name.removesuffix(".gz")
            kept = name.endswith(".gz") and unpacked.is_file()  # gunzip'ed by hand, or by a browser
            missing.append(name + (f" (its unpacked {unpacked.name} is there: give the file as downloaded)" if kept else ""))
            continue
        info = expected.get(name)
        if info is None or info.size is None or not info.checksum:
            continue
        size = path.stat().st_size
        if size != int(info.size):
            wrong.append(f"{name} has {size:,} bytes, the official file {int(info.size):,}")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != info.checksum:
            wrong.append(f"{name} has the right size but not the official SHA-256")
    if wrong:
        lacks = f" lacks {', '.join(missing)};" if missing else ":"
        raise DataError(
            f"{names['manual_dir']} {manual_dir}{lacks} {'; '.join(wrong)}. They must be the official {spec.tfds_name} "
            "files, complete and as downloaded (still compressed). " + _missing_files_help(spec, names)
        )
    if missing:
        raise DataError(f"{names['manual_dir']} {manual_dir} lacks {', '.join(missing)}. {_missing_files_help(spec, names)}")


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the URL's host opens, else why not. Where the environment
    names a proxy for the URL (``https_proxy``... and not ``no_proxy``), as TFDS's downloads
    (through ``requests``) would use it, the proxy's host is the one tried."""
    parts = urllib.parse.urlsplit(url)
    host, port, what = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), ""
    import requests.utils  # (a dependency of TFDS, whose downloads go through it)

    # requests' own choice of proxy (by scheme, ALL_PROXY, NO_PROXY), the one TFDS's downloads make.
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if proxy:
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, what = p.hostname, p.port or (443 if p.scheme == "https" else 80), "the proxy "
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as err:
        return f"no connection to {what}{host}: {err}"


def check_splits(spec: DatasetSpec, train: Split, test: Split) -> None:
    """Raise DataError unless both splits have the shapes and dtype of ``spec`` (uint8 NHWC, one label each)."""
    shape = (spec.image_size, spec.image_size, spec.channels)
    for name, split, n in (("train", train, spec.num_train), ("test", test, spec.num_test)):
        if split.images.shape != (n, *shape) or split.images.dtype != np.uint8 or split.labels.shape != (n,):
            raise DataError(
                f"{spec.tfds_name} {name} split has images {split.images.shape} {split.images.dtype} "
                f"and labels {split.labels.shape}; expected ({n}, {', '.join(map(str, shape))}) uint8 and ({n},)"
            )
        labels = split.labels
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataError(f"{spec.tfds_name} {name} split has labels {labels.dtype} from {labels.min()} to "
                            f"{labels.max()}; expected integers 0 to {spec.num_classes - 1}")


def _save_atomically(path: Path, train: Split, test: Split) -> None:
    """Write the cache (under the data dir's lock for ``spec``), first deleting the temporary
    files of writes of it that were killed (atomic_write's ``.<name>.*.tmp``): nothing else
    writes them while the lock is held, and no later run would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    with atomic_write(path) as f:
        np.savez(
            f,
            train_images=train.images, train_labels=train.labels,
            test_images=test.images, test_labels=test.labels,
        )


def preprocess(images: jax.Array, size: int, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> float in [0, 1], bilinearly resized to ``size`` x ``size``: the chapter's inputs, bit for bit.

    The chapter's code does ``transforms.Resize(96)`` on the PIL image and then
    ``ToTensor()``; here the same two steps run on the device inside the jitted
    step, in the same order and with the same arithmetic
    (:mod:`resnet_jax.transforms`): Pillow's fixed-point bilinear resize of the
    uint8 image, then ``k / 255`` in float32. Equal to Pillow and torch byte
    for byte (tests/test_transforms.py). At the dataset's own size there is
    nothing to resize, as ``Resize`` leaves such an image alone. Square images
    only (every dataset here): ``Resize(96)`` sets a non-square image's shorter
    side and keeps its aspect ratio, which a batch of ``size`` x ``size`` cannot.
    """
    if images.dtype != jnp.uint8:  # float images here would be divided by 255 a second time, silently
        raise TypeError(f"preprocess takes uint8 images (0-255, as data.load gives them), got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"preprocess takes NHWC images (N, H, W, C), got shape {images.shape}")
    if images.shape[1] != images.shape[2]:  # Resize(96) would keep a non-square image's aspect ratio
        raise ValueError(f"preprocess takes square images, as every dataset here has, got {images.shape[1]}x{images.shape[2]}")
    if isinstance(size, jax.Array):  # a tracer: jax.jit(train_step) without static_argnames
        raise TypeError(
            "the image size must be a Python int, got a JAX array: under jit, make it static "
            "(training.jit(train_step, static_argnames='resize'))"
        )
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"preprocess resizes to a positive integer size, got {size!r}")
    return transforms.to_tensor(transforms.resize_like_pil(images, int(size))).astype(dtype)
