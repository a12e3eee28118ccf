"""Data augmentation on the device: pure, jittable functions of an explicit PRNG key.

Each function takes a batch of NHWC images (uint8 as stored, or float in
[0, 1]) and returns a batch of the same shape and dtype, with values in the
same range. Every example draws its own randomness from the one key, so a
batch is reproducible from its key and different keys (or different examples
under one key) get different transformations.

They run on the stored uint8 images (28x28 for Fashion-MNIST, 32x32 for CIFAR-10), before ``data.preprocess`` resizes
and scales them: the geometry is then in the dataset's own pixels (a 4-pixel
shift means the same at ``--resize 28`` and ``--resize 96``), and the work is
done on the smallest images there are.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_nhwc(images: jax.Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected a batch of NHWC images, got shape {images.shape}")


def _check_prob(name: str, prob) -> None:
    # A traced probability (a jitted argument) cannot be checked here; a Python number can.
    if isinstance(prob, (int, float)) and not 0 <= prob <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {prob}")


def _check_range(name: str, bounds, low: float, high: float) -> None:
    lo, hi = bounds
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must be (min, max) with {low} < min <= max <= {high}, got {tuple(bounds)}")


def random_crop(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """Pad each side by ``pad`` pixels of zeros, then crop back to the original size at a random offset.

    That is a random translation by up to ``pad`` pixels in each direction.
    Zero padding, not reflection: Fashion-MNIST's background is black (0), so
    zeros extend the background as a shifted photograph would, while many
    garments touch the frame (trousers, dresses, shirts) and reflecting them
    would draw a mirrored second garment at the edge. (Reflection is the
    choice for natural images such as CIFAR, whose borders are not constant.)
    """
    _check_nhwc(images)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if pad == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
    crop = lambda image, off: jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array, prob: float = 0.5) -> jax.Array:
    """Mirror each image left-right with probability ``prob`` (garments are left-right symmetric classes)."""
    _check_nhwc(images)
    _check_prob("prob", prob)
    flip = jax.random.bernoulli(key, prob, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def random_erasing(
    key: jax.Array,
    images: jax.Array,
    prob: float,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> jax.Array:
    """Random erasing (Zhong et al., 2017): with probability ``prob`` replace a random rectangle by noise.

    The rectangle covers a fraction of the image drawn uniformly from
    ``area``, with an aspect ratio (height / width) drawn from ``aspect``: the
    paper's ranges, but log-uniformly as torchvision's RandomErasing draws it (the
    paper draws it uniformly, which makes tall rectangles about three times as likely
    as wide ones with these bounds). It is filled with per-pixel uniform noise
    over the value range (0..255 for uint8, [0, 1) for floats), the paper's
    best variant. One difference: where the paper redraws a rectangle that does
    not fit, we clip its sides to the image, which keeps the function free of
    loops (shapes here are static, so every example is computed as a mask).
    """
    _check_nhwc(images)
    _check_prob("prob", prob)
    _check_range("area", area, 0, 1)
    _check_range("aspect", aspect, 0, math.inf)
    n, h, w, c = images.shape
    k_apply, k_area, k_aspect, k_y, k_x, k_fill = jax.random.split(key, 6)
    frac = jax.random.uniform(k_area, (n,), minval=area[0], maxval=area[1])
    ratio = jnp.exp(jax.random.uniform(k_aspect, (n,), minval=math.log(aspect[0]), maxval=math.log(aspect[1])))
    eh = jnp.clip(jnp.round(jnp.sqrt(frac * h * w * ratio)), 1, h).astype(jnp.int32)
    ew = jnp.clip(jnp.round(jnp.sqrt(frac * h * w / ratio)), 1, w).astype(jnp.int32)
    # Top-left corner uniform over the positions where the rectangle fits.
    y0 = jnp.floor(jax.random.uniform(k_y, (n,)) * (h - eh + 1)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k_x, (n,)) * (w - ew + 1)).astype(jnp.int32)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (
        (rows >= y0[:, None, None]) & (rows < (y0 + eh)[:, None, None])
        & (cols >= x0[:, None, None]) & (cols < (x0 + ew)[:, None, None])
    )
    erase = inside & jax.random.bernoulli(k_apply, prob, (n,))[:, None, None]
    if jnp.issubdtype(images.dtype, jnp.integer):
        info = jnp.iinfo(images.dtype)
        noise = jax.random.randint(k_fill, images.shape, info.min, info.max + 1, dtype=jnp.int32)
    else:
        noise = jax.random.uniform(k_fill, images.shape)
    return jnp.where(erase[..., None], noise.astype(images.dtype), images)


def augment(key: jax.Array, images: jax.Array, crop_pad: int = 0, flip: bool = False, erase_prob: float = 0.0) -> jax.Array:
    """Crop (translate), then flip, then erase, each from its own sub-key; an ingredient that is off is skipped.

    Erasing comes last, as in the paper, so the erased rectangle is never
    shifted out of the frame by the crop.
    """
    k_crop, k_flip, k_erase = jax.random.split(key, 3)
    if crop_pad:
        images = random_crop(k_crop, images, crop_pad)
    if flip:
        images = random_flip(k_flip, images)
    if erase_prob:
        images = random_erasing(k_erase, images, erase_prob)
    return images
