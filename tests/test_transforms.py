"""resnet_jax.transforms: Pillow's bilinear resize and torch's ToTensor, byte for byte."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import transforms
from conftest import MANUAL_DIR

# Fashion-MNIST's 28 and CIFAR-10's 32 to what --resize allows: up (the chapter's 96; 57 and
# 29 give windows that straddle pixel edges unevenly), down (Pillow widens its filter then:
# 17 and 9 take 5 and 9 taps) and the size itself.
SIZES = [(28, 96), (28, 29), (28, 57), (28, 512), (28, 28), (28, 27), (28, 17), (28, 9), (32, 96), (32, 24), (32, 9)]


def _pillow(images: np.ndarray, size: int) -> np.ndarray:
    out = []
    for image in images:
        grey = image.shape[-1] == 1
        resized = np.asarray(Image.fromarray(image[..., 0] if grey else image).resize((size, size), Image.Resampling.BILINEAR))
        out.append(resized[..., None] if grey else resized)
    return np.stack(out)


@pytest.mark.parametrize("in_size,size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_resize_is_pillows_bilinear_resize_byte_for_byte(in_size, size, channels):
    rng = np.random.default_rng(in_size * 1000 + size)
    images = rng.integers(0, 256, (3, in_size, in_size, channels), dtype=np.uint8)
    images[1] = np.where(images[1] > 127, 255, 0)  # hard edges: whole runs of 0 and 255
    images[2] = np.arange(in_size)[:, None, None] * 255 // (in_size - 1)  # a ramp: rounding ties
    ours = transforms.resize_like_pil(jnp.asarray(images), size)
    assert ours.shape == (3, size, size, channels) and ours.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(ours), _pillow(images, size))


def test_resize_is_the_same_under_jit_and_on_real_images():
    path = MANUAL_DIR / "t10k-images-idx3-ubyte.gz"
    if path.exists():
        with gzip.open(path) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16)[: 8 * 784].reshape(8, 28, 28, 1)
    else:  # without the release files, random images (the parametrized test above covers the maths)
        images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    jitted = jax.jit(transforms.resize_like_pil, static_argnums=1)(jnp.asarray(images), 96)
    np.testing.assert_array_equal(np.asarray(jitted), _pillow(images, 96))


def test_the_fixed_point_weights_are_pillows_and_sum_to_one():
    # Upsampling 28 -> 96: at most two source pixels per output pixel (the triangle of support 1),
    # weights in 22-bit fixed point that add up to 1 to within Pillow's per-weight rounding.
    index, weight = transforms.pil_bilinear_taps(28, 96)
    assert index.shape == weight.shape == (96, 3)
    assert (weight.sum(axis=1) - (1 << 22)).max() <= 1 and (weight.sum(axis=1) - (1 << 22)).min() >= -1
    assert (index >= 0).all() and (index < 28).all()
    assert ((weight > 0).sum(axis=1) <= 2).all()
    # The first output pixel's centre, 0.5 * 28/96 = 0.146, lies left of pixel 0's centre: all weight on pixel 0.
    assert index[0, 0] == 0 and weight[0, 0] == 1 << 22


def test_to_tensor_is_torchs_division_by_255():
    torch = __import__("torch") if os.environ.get("CI") else pytest.importorskip("torch")
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    ours = np.asarray(transforms.to_tensor(jnp.asarray(levels)))
    theirs = torch.from_numpy(levels).float().div(255).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    # The division, not a multiplication by a rounded 1/255, which misses by an ulp for some levels.
    assert not np.array_equal(levels.astype(np.float32) * np.float32(1 / 255), theirs)
