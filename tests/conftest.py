"""Shared fixtures: the official Fashion-MNIST files and a TFDS data_dir prepared from them once."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/fashion_mnist beside the clone (as in CI), or wherever $FASHION_MNIST_DIR says.
MANUAL_DIR = Path(os.environ.get("FASHION_MNIST_DIR", REPO.parent / "shared" / "data" / "fashion_mnist"))


@pytest.fixture(scope="session")
def manual_dir() -> Path:
    if not (MANUAL_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the Fashion-MNIST release files in {MANUAL_DIR}")
        pytest.skip(f"no Fashion-MNIST release files in {MANUAL_DIR} (set FASHION_MNIST_DIR)")
    return MANUAL_DIR


@pytest.fixture(scope="session")
def prepared_data_dir(manual_dir, tmp_path_factory) -> Path:
    """A TFDS data_dir holding fashion_mnist prepared offline from the release files (and our array cache)."""
    from resnet_jax import data

    data_dir = tmp_path_factory.mktemp("tfds")
    data.load(data.FASHION_MNIST, data_dir, manual_dir, offline=True)
    return data_dir
