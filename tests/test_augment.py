"""Augmentations: shape, dtype, value range, reproducibility, and real per-example randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import augment


def _images(dtype=np.uint8, n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 256, (n, 28, 28, 1), dtype=np.uint8)  # no zeros: padding shows as 0
    return jnp.asarray(x if dtype == np.uint8 else x / 255.0, dtype)


AUGS = {
    "crop": lambda k, x: augment.random_crop(k, x, 4),
    "flip": lambda k, x: augment.random_flip(k, x),
    "erase": lambda k, x: augment.random_erasing(k, x, 1.0),
    "all": lambda k, x: augment.augment(k, x, crop_pad=4, flip=True, erase_prob=0.5),
}


@pytest.mark.parametrize("name", AUGS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_shape_dtype_range_and_reproducible(name, dtype):
    f = jax.jit(AUGS[name])
    x = _images(dtype)
    key = jax.random.key(3)
    y = f(key, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    hi = 255 if dtype == np.uint8 else 1.0
    assert float(jnp.min(y)) >= 0 and float(jnp.max(y)) <= hi
    np.testing.assert_array_equal(np.asarray(f(key, x)), np.asarray(y))  # same key, same batch
    assert not np.array_equal(np.asarray(f(jax.random.key(4), x)), np.asarray(y))  # another key, another batch


@pytest.mark.parametrize("name", AUGS)
def test_examples_get_different_transformations(name):
    # One image repeated: any difference between the outputs comes from per-example randomness.
    x = jnp.repeat(_images(n=1), 16, axis=0)
    y = np.asarray(AUGS[name](jax.random.key(0), x))
    assert len({row.tobytes() for row in y}) > 1


def test_crop_is_a_translation_with_zero_fill():
    x = _images(n=64)
    y = np.asarray(augment.random_crop(jax.random.key(1), x, 4))
    x = np.asarray(x)
    for xi, yi in zip(x, y):
        padded = np.pad(xi, ((4, 4), (4, 4), (0, 0)))
        hits = [(dy, dx) for dy in range(9) for dx in range(9) if np.array_equal(padded[dy:dy + 28, dx:dx + 28], yi)]
        assert hits, "output is not a crop of the zero-padded image"
    # Over 64 images the extremes of each axis show (all 81 shifts: the test below).
    assert (y[:, :4] == 0).all(axis=(1, 2, 3)).any() and (y[:, -4:] == 0).all(axis=(1, 2, 3)).any()
    assert (y[:, :, :4] == 0).all(axis=(1, 2, 3)).any() and (y[:, :, -4:] == 0).all(axis=(1, 2, 3)).any()


def test_crop_offsets_reach_every_shift_drawn_independently_per_axis():
    # One bright pixel in the middle: where it lands is the shift. 2,000 draws over 81 shifts,
    # each 1/81 likely: all of them show (else a shift is unreachable, or both axes share one draw).
    x = np.zeros((2000, 28, 28, 1), np.uint8)
    x[:, 14, 14] = 255
    y = np.asarray(augment.random_crop(jax.random.key(3), jnp.asarray(x), 4))[..., 0]
    flat = y.reshape(len(y), -1).argmax(1)
    shifts = {(int(r) - 14, int(c) - 14) for r, c in zip(*np.unravel_index(flat, (28, 28)))}
    assert shifts == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}


def test_erasing_boxes_are_placed_and_shaped_as_drawn():
    # Float images of -1 and noise in [0, 1): the erased box is exactly where the output is >= 0.
    n, h = 2000, 28
    y = np.asarray(augment.random_erasing(jax.random.key(7), -jnp.ones((n, h, h, 1)), 1.0))[..., 0]
    erased = y >= 0
    rows, cols = erased.any(2), erased.any(1)
    y0, x0, eh, ew = rows.argmax(1), cols.argmax(1), rows.sum(1), cols.sum(1)
    assert (erased.sum((1, 2)) == eh * ew).all()  # one rectangle each
    area = eh * ew / (h * h)
    assert area.min() < 0.05 and area.max() > 0.35  # the area range (0.02, 0.4), clipped and rounded
    # Aspect log-uniform over (0.3, 3.3): as often tall as wide, rarely square.
    log_aspect = np.log(eh / ew)
    assert abs(np.median(log_aspect)) < 0.15 and (eh != ew).mean() > 0.7
    assert 0.35 < (eh > ew).mean() < 0.65 and abs(log_aspect).max() > 0.9
    # Corners uniform over the places the box fits, touching each edge, and drawn apart per axis.
    for start, size in ((y0, eh), (x0, ew)):
        fits = size < h
        assert (start[fits] == 0).any() and (start[fits] + size[fits] == h).any()
    uy, ux = (y0 + 0.5) / (h - eh + 1), (x0 + 0.5) / (h - ew + 1)
    assert abs(np.corrcoef(uy, ux)[0, 1]) < 0.1


def test_erasing_noise_spans_the_whole_uint8_range():
    y = np.asarray(augment.random_erasing(jax.random.key(8), jnp.full((64, 28, 28, 1), 128, jnp.uint8), 1.0))
    assert y.min() == 0 and y.max() == 255


@pytest.mark.parametrize("prob, low, high", [(0.5, 0.35, 0.65), (0.2, 0.1, 0.3), (0.0, 0, 0), (1.0, 1, 1)])
def test_flip_mirrors_each_image_with_probability_prob(prob, low, high):
    x = _images(n=256)
    y = np.asarray(augment.random_flip(jax.random.key(2), x, prob))
    x = np.asarray(x)
    flipped = np.array([np.array_equal(a[:, ::-1], b) for a, b in zip(x, y)])
    kept = np.array([np.array_equal(a, b) for a, b in zip(x, y)])
    assert (flipped ^ kept).all()  # each image one or the other (none is its own mirror image)
    assert low <= flipped.mean() <= high


def test_erasing_changes_one_rectangle_with_the_given_probability():
    x = _images(n=256)
    y = np.asarray(augment.random_erasing(jax.random.key(5), x, 0.5))
    x = np.asarray(x)
    changed = (x != y)[..., 0]
    erased = changed.any(axis=(1, 2))
    assert 0.35 < erased.mean() < 0.65
    for m in changed[erased]:
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        box = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        # Noise can equal the original value by chance (1/255 per pixel), so "almost all" of the box.
        assert box.mean() > 0.9 and box.size <= 0.4 * 28 * 28 + 2 * 28
    np.testing.assert_array_equal(np.asarray(augment.random_erasing(jax.random.key(5), jnp.asarray(x), 0.0)), x)


def test_off_is_identity():
    x = _images()
    np.testing.assert_array_equal(np.asarray(augment.augment(jax.random.key(0), x)), np.asarray(x))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k, x: augment.random_crop(k, x, -1), "pad must be a non-negative int"),
        (lambda k, x: augment.random_crop(k, x, 1.5), "pad must be a non-negative int"),
        (lambda k, x: augment.random_flip(k, x, 1.5), r"prob must be a probability in \[0, 1\]"),
        (lambda k, x: augment.random_erasing(k, x, -0.1), r"prob must be a probability in \[0, 1\]"),
        (lambda k, x: augment.random_erasing(k, x, 0.5, area=(0.4, 0.02)), "area must be"),
        (lambda k, x: augment.random_erasing(k, x, 0.5, area=(0.0, 0.4)), "area must be"),
        (lambda k, x: augment.random_erasing(k, x, 0.5, aspect=(-1.0, 3.3)), "aspect must be"),
    ],
)
def test_out_of_range_arguments_are_refused(call, message):
    # Without these checks a negative pad fails inside jnp.pad, and a probability of 1.5 or a
    # reversed area range silently produce something else than asked.
    with pytest.raises(ValueError, match=message):
        call(jax.random.key(0), _images())
