"""The chapter's ``transforms.Resize(96)`` and ``ToTensor()``, in JAX, bit for bit.

d2l's ``load_data_fashion_mnist(batch_size, resize=96)`` hands each 28x28 PIL
image to ``Resize``, which calls Pillow's bilinear ``Image.resize`` on the uint8
image, and then to ``ToTensor``, which divides the uint8 result by 255 in
float32. Both run here on the device, inside the jitted steps, on batches:

- :func:`resize_like_pil` is Pillow's 8-bit resampling (``libImaging/Resample.c``):
  the same filter taps, the same weights rounded to 22-bit fixed point, a
  horizontal pass rounded and clipped to uint8, then a vertical one. Integer
  arithmetic throughout, so every platform gives Pillow's bytes exactly. (A float
  bilinear resize, as ``jax.image.resize`` does, skips the rounding between the
  passes and differs from the chapter's inputs by up to one grey level.)
- :func:`to_tensor` looks each grey level up in a table of ``k / 255`` computed
  in float32 with NumPy's (IEEE, correctly rounded) division, as torch's
  ``div(255)`` does; XLA would turn a division by the constant 255 into a
  multiplication by its rounded inverse, one ulp away for some levels.

``tests/test_transforms.py`` checks both against the installed Pillow (13.0 when written)
and torch, byte for byte.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Pillow's fixed point for 8-bit images: PRECISION_BITS = 32 - 8 - 2 (Resample.c): 8 bits for
# the pixel and 2 to spare for filters whose weights go negative or past 1 (bicubic, Lanczos;
# bilinear's never do), so that every sum stays inside int32.
_PRECISION_BITS = 22


@functools.lru_cache(maxsize=None)
def pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear filter for one axis: (out_size, taps) source indices and int32 weights.

    Transcribes ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of Pillow's Resample.c. The
    filter is the triangle of support 1, widened by the scale when shrinking (Pillow's
    antialiasing); a weight past a window's end is 0, its index the window's first.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), np.int32)
    weight = np.zeros((out_size, taps), np.int32)
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)  # int() truncates toward 0, as C's (int) does
        count = min(int(center + support + 0.5), in_size) - first
        # As in C: the distance times the inverse scale (not divided by it), in double.
        w = [max(0.0, 1.0 - abs((first + k - center + 0.5) * (1.0 / filterscale))) for k in range(count)]
        total = 0.0
        for v in w:  # in order, as the C loop adds (Python 3.12's sum() compensates its rounding)
            total += v
        for k in range(count):
            value = w[k] / total if total != 0.0 else w[k]
            weight[out, k] = int(0.5 + value * (1 << _PRECISION_BITS))  # the weights are >= 0
            index[out, k] = first + k
        index[out, count:] = first
    index.flags.writeable = weight.flags.writeable = False  # cached: shared by every caller
    return index, weight


def _resample_axis(images: jax.Array, axis: int, out_size: int) -> jax.Array:
    index, weight = pil_bilinear_taps(images.shape[axis], out_size)
    images = images.astype(jnp.int32)
    shape = [1] * images.ndim
    shape[axis] = out_size
    # Pillow starts each sum at half a unit (rounding); integer sums are exact in any order.
    total = jnp.int32(1 << (_PRECISION_BITS - 1))
    # One gather per tap, not one of all taps at once: about 1 against 5.0 ms for a batch of 64,
    # 28x28 -> 96x96, on 2 CPU cores (the 5-D gather of the vertical pass was the slow part;
    # BENCHMARKS.md, "Preprocessing").
    for k in range(index.shape[1]):
        if weight[:, k].any():  # upsampling's third tap never weighs anything
            total = total + jnp.take(images, jnp.asarray(index[:, k]), axis=axis) * jnp.asarray(weight[:, k]).reshape(shape)
    # Pillow's clip8: shift out the fraction, clip to 0..255.
    return jnp.clip(total >> _PRECISION_BITS, 0, 255).astype(jnp.uint8)


def resize_like_pil(images: jax.Array, size: int) -> jax.Array:
    """uint8 NHWC images resized to ``size`` x ``size`` exactly as Pillow's bilinear ``resize`` does.

    Pillow resamples the width first, then the height, each pass to uint8; an axis already
    ``size`` long is left alone, as Pillow leaves it. Channels are resampled alike (an RGB image
    is three grey ones to Pillow's resampler).
    """
    if images.shape[2] != size:
        images = _resample_axis(images, 2, size)
    if images.shape[1] != size:
        images = _resample_axis(images, 1, size)
    return images


# ToTensor's k / 255 for every grey level, as float32 division rounds it.
_GREY_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)


def to_tensor(images: jax.Array) -> jax.Array:
    """uint8 -> float32 in [0, 1], each value ``k / 255`` rounded as torch's ``ToTensor`` rounds it."""
    return jnp.asarray(_GREY_LEVELS)[images.astype(jnp.int32)]
