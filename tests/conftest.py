"""Shared fixtures: the official Fashion-MNIST files and a TFDS data_dir prepared from them once."""

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the session, subprocesses included (JAX reads
# these variables at import): fit compiles its programs anew on every call, and XLA:CPU
# takes 10-30 s per ResNet-18 program, while a cache hit takes a fraction of a second.
# A cached executable is the same executable, so no result changes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="resnet_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # No size limit for any process (train.py sets none where this variable is set): under a
    # limit JAX (0.10/0.11) fails every write while any entry lacks its access time, which
    # processes without a limit do not write; and under one each write reads every entry's
    # access time under a lock shared by all workers, which grows with the square of the
    # session's entries (thousands: tests/test_model.py alone stores about 1,000).
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")


# The temporary files of the worker processes and of the programs the tests start go to one
# folder, removed when the session ends: xdist's workers end without running atexit handlers,
# and TFDS leaves an empty folder in the temp dir for each dataset it prepares (hundreds were
# left in /tmp by each run of the suite). pytest's own tmp_path folders stay where pytest keeps
# them (this process's temp dir is fixed first), for a look after a failure.
if "RESNET_JAX_TEST_TMPDIR" not in os.environ:
    tempfile.gettempdir()
    _tmp = tempfile.mkdtemp(prefix="resnet_jax_tests_")
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
    os.environ["RESNET_JAX_TEST_TMPDIR"] = os.environ["TMPDIR"] = _tmp


# The suite is written for CPU (forced host devices, small shapes; its subprocesses too). On a GPU
# machine each of -n auto's processes would otherwise claim 75% of the GPU's memory (JAX's
# preallocation) and fail. Set JAX_PLATFORMS yourself to run it on another platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_xdist_auto_num_workers(config) -> int:
    """How many processes ``-n auto`` (pyproject's addopts) starts: one per core, at most 4.

    Much of a test's time is XLA compiling, which keeps one core busy, so two processes on two
    cores took the suite from 11 min 36 s to 8 min 22 s (2-core AMD EPYC, 2026-12-04). The cap
    bounds memory: each process holds its own JAX and, once a test needs the data, TensorFlow.
    The processes share the compile cache above; an entry one of them is still writing is, to
    another, a cache miss with a warning (JAX catches a failed read), not an error.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))


REPO = Path(__file__).resolve().parents[1]
# ../shared/data/fashion_mnist beside the clone (as in CI), or wherever $FASHION_MNIST_DIR says.
MANUAL_DIR = Path(os.environ.get("FASHION_MNIST_DIR", REPO.parent / "shared" / "data" / "fashion_mnist"))


def tree_digest(directory: Path) -> dict:
    """Every file under ``directory`` with its content hash, and every folder: "untouched" means
    byte for byte, with no folder added or removed."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(directory.rglob("*")) if p.is_file() or p.is_dir()}


@pytest.fixture(scope="session")
def manual_dir() -> Path:
    if not (MANUAL_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the Fashion-MNIST release files in {MANUAL_DIR}")
        pytest.skip(f"no Fashion-MNIST release files in {MANUAL_DIR} (set FASHION_MNIST_DIR)")
    return MANUAL_DIR


@pytest.fixture(scope="session")
def prepared_data_dir(manual_dir, tmp_path_factory) -> Path:
    """A TFDS data_dir holding fashion_mnist prepared offline from the release files (and our array cache).

    Prepared in a data dir where TFDS's shared extraction folder already holds an unpacked
    ``train-labels-idx1-ubyte.gz`` with other labels, as MNIST or KMNIST (same file names) leave
    it: the preparation must read the files it checked, which
    test_data.py::test_tfds_splits_from_the_release_files compares example by example.
    """
    import gzip

    from resnet_jax import data

    data_dir = tmp_path_factory.mktemp("tfds")
    labels = bytearray(gzip.open(manual_dir / "train-labels-idx1-ubyte.gz").read())
    labels[8:] = bytes((b + 1) % 10 for b in labels[8:])  # the header (8 bytes) kept
    stale = data_dir / "downloads" / "extracted" / "GZIP.train-labels-idx1-ubyte.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(bytes(labels))
    data.load(data.FASHION_MNIST, data_dir, manual_dir, offline=True)
    return data_dir


@pytest.fixture
def one_mb_free(monkeypatch):
    """Every disk has 1 MB free (shutil.disk_usage, which the checkpoint room check reads)."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))


@pytest.fixture
def interrupts_installed():
    """train.py's handling of Ctrl-C and SIGTERM (resnet_jax/interrupts.py) in this process, undone after."""
    import signal
    import sys

    from resnet_jax import interrupts

    handlers = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    hooks = sys.unraisablehook, sys.excepthook
    interrupts.install()
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    sys.unraisablehook, sys.excepthook = hooks
    interrupts._seen = None
