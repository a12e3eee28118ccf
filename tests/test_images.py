"""A user's images and .npy batches become the dataset's native uint8 arrays; every bad file is named."""

import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.images import ImageError, load_images, load_npy

GRAY, COLOUR = data.FASHION_MNIST, data.CIFAR10


def _save(path, array, mode=None, **kw):
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
    return path


def _gradient(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- images ------------------------------------------------------------------


def test_native_size_greyscale_png_is_taken_exactly(tmp_path):
    a = _gradient(28, 28)[..., 0]
    out = load_images([_save(tmp_path / "a.png", a)], GRAY)
    assert out.shape == (1, 28, 28, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, ..., 0], a)


def test_native_size_rgb_png_for_cifar_is_taken_exactly(tmp_path):
    a = _gradient(32, 32)
    out = load_images([str(_save(tmp_path / "a.png", a))], COLOUR)
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(out[0], a)


def test_the_dataset_may_be_given_by_name_as_data_load_takes_it(tmp_path):
    a = _gradient(32, 32)
    path = _save(tmp_path / "c.png", a)
    np.testing.assert_array_equal(load_images([path], "cifar10"), load_images([path], COLOUR))
    with pytest.raises(ValueError, match="unknown dataset 'fashion': one of fashion_mnist"):
        load_images([path], "fashion")


def test_colour_to_greyscale_is_the_luma_of_itu_601(tmp_path):
    a = _gradient(28, 28)
    out = load_images([_save(tmp_path / "c.png", a)], GRAY)[0, ..., 0].astype(int)
    luma = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    assert np.abs(out - luma).max() <= 1


def test_greyscale_for_a_colour_set_fills_three_equal_channels(tmp_path):
    a = _gradient(32, 32)[..., 1]
    out = load_images([_save(tmp_path / "g.png", a)], COLOUR)[0]
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], a)


def test_odd_sizes_are_resized_bilinearly_to_native(tmp_path):
    paths = [_save(tmp_path / f"{h}x{w}.png", _gradient(h, w, h)[..., 0]) for h, w in ((13, 45), (7, 5), (100, 61))]
    out = load_images(paths, GRAY)
    assert out.shape == (3, 28, 28, 1)
    for p, got in zip(paths, out):
        want = np.asarray(Image.open(p).resize((28, 28), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(got[..., 0], want)


def test_a_large_uniform_photo_shrinks_without_artefacts(tmp_path):
    a = np.full((600, 400, 3), (200, 10, 90), np.uint8)
    out = load_images([_save(tmp_path / "big.jpg", a, quality=95)], COLOUR)[0]
    assert np.abs(out.astype(int) - [200, 10, 90]).max() <= 3  # JPEG's loss only


def _alpha_bands(size):
    a = np.zeros((size, size, 4), np.uint8)
    a[..., :3] = 200
    a[:, :10, 3] = 0  # transparent: becomes the black background
    a[:, 10:20, 3] = 255  # opaque: the colour itself
    a[:, 20:, 3] = 128  # half: half of it
    return a


def test_rgba_alpha_is_composited_over_black(tmp_path):
    out = load_images([_save(tmp_path / "rgba32.png", _alpha_bands(32))], COLOUR)[0].astype(int)
    assert (out[:, :10] == 0).all()
    assert (out[:, 10:20] == 200).all()
    assert (np.abs(out[:, 20:] - 100) <= 1).all()
    grey = load_images([_save(tmp_path / "rgba28.png", _alpha_bands(28))], GRAY)[0, ..., 0].astype(int)
    assert (grey[:, :10] == 0).all() and (grey[:, 10:20] == 200).all() and (np.abs(grey[:, 20:] - 100) <= 1).all()


def test_palette_transparency_is_composited_over_black(tmp_path):
    p = Image.new("P", (28, 28), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
    p.paste(0, (0, 0, 14, 28))
    p.info["transparency"] = 1  # the white half is transparent
    p.save(tmp_path / "pal.png", transparency=1)
    assert Image.open(tmp_path / "pal.png").mode == "P"
    out = load_images([tmp_path / "pal.png"], GRAY)[0, ..., 0]
    assert (out == 0).all()


def _old_to_l_or_rgb(image):
    """images._to_l_or_rgb as it was before it worked in strips (26d06e4): the reference."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        levels = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        levels += 128
        levels //= 257
        return Image.fromarray(levels.astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def _old_pipeline(image, spec):
    """What load_images made of a decoded image before (26d06e4): convert whole, then resize whole."""
    size, mode = spec.image_size, "L" if spec.channels == 1 else "RGB"
    image = _old_to_l_or_rgb(image).convert(mode)
    return np.asarray(image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR))


def _every_value_and_alpha():
    """256x256 images whose pixels are every (value, alpha) pair: RGBA (three different values
    a pixel), LA, and palette images (256 of them, 16x16) whose entries' alphas cover the pairs."""
    v, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    yield Image.fromarray(np.stack([v, 255 - v, v ^ 0x5A, a], -1), "RGBA")
    yield Image.fromarray(np.stack([v, a], -1), "LA")
    entries = np.arange(256, dtype=np.uint8)
    palette = np.stack([entries, 255 - entries, entries ^ 0x5A], -1).ravel().tolist()
    for shift in range(256):
        p = Image.fromarray(entries.reshape(16, 16), "P")
        p.putpalette(palette)
        p.info["transparency"] = bytes(((entries.astype(int) + shift) % 256).astype(np.uint8))  # entry j: alpha j+shift
        yield p
    p = Image.fromarray(entries.reshape(16, 16), "P")
    p.putpalette(palette)
    p.info["transparency"] = 7  # one transparent entry, the rest opaque
    yield p
    grey = Image.fromarray(v)
    grey.info["transparency"] = 9
    yield grey
    rgb = Image.fromarray(np.stack([v, a, v], -1), "RGB")
    rgb.info["transparency"] = (3, 3, 3)
    yield rgb


@pytest.mark.parametrize("spec", [GRAY, COLOUR], ids=["L", "RGB"])
def test_compositing_over_black_is_bit_identical_to_alpha_composite_for_every_value_and_alpha(spec):
    from resnet_jax.images import _to_l_or_rgb

    mode = "L" if spec.channels == 1 else "RGB"
    for image in _every_value_and_alpha():
        want = np.asarray(_old_to_l_or_rgb(image).convert(mode))
        got = _to_l_or_rgb(image, mode)
        assert got.mode == mode and np.array_equal(np.asarray(got), want), (image.mode, image.info)
    # and it is round(value * alpha / 255): the (value, alpha) grid above is every pair
    v, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    la = Image.fromarray(np.stack([v, a], -1).astype(np.uint8), "LA")
    assert np.array_equal(np.asarray(_to_l_or_rgb(la, "L")), (v * a + 127) // 255)


@pytest.mark.parametrize("spec", [GRAY, COLOUR], ids=["L", "RGB"])
def test_converting_in_strips_then_resizing_is_bit_identical_to_whole(tmp_path, monkeypatch, spec):
    # Strips of a few rows (and a last one of fewer), images shrunk, enlarged, one side kept,
    # and every kind of mode: the same bytes as converted and resized whole.
    from resnet_jax import images

    rng = np.random.default_rng(1)
    sizes = [(28, 28), (32, 32), (13, 45), (7, 5), (100, 61), (28, 90), (90, 28), (32, 77), (77, 32), (301, 17), (3, 400)]
    for h, w in sizes:
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        cases = [Image.fromarray(pixels, "RGBA"), Image.fromarray(pixels[..., :3]), Image.fromarray(pixels[..., 0]),
                 Image.fromarray(pixels[..., [0, 3]], "LA"), Image.fromarray(pixels[..., 0]).convert("1"),
                 Image.fromarray(pixels[..., :3]).convert("P"), Image.fromarray(pixels[..., :3]).convert("CMYK"),
                 Image.fromarray((pixels[..., 0].astype(np.uint16) * 250))]
        pal = Image.fromarray(pixels[..., 1] // 64, "P")
        pal.putpalette(rng.integers(0, 256, 768).tolist())
        pal.info["transparency"] = bytes([0, 90, 200, 255])
        cases.append(pal)
        for strip_pixels in (2 * w + 1, 7 * w, 10**9):
            monkeypatch.setattr(images, "_STRIP_PIXELS", strip_pixels)
            for image in cases:
                got = images._converted(image, "x.png", "L" if spec.channels == 1 else "RGB")
                got = np.asarray(got.resize((spec.image_size,) * 2, Image.Resampling.BILINEAR) if got.size != (spec.image_size,) * 2 else got)
                assert np.array_equal(got, _old_pipeline(image, spec)), ((h, w), image.mode, strip_pixels)
    path = _save(tmp_path / "rgba.png", rng.integers(0, 256, (61, 100, 4), dtype=np.uint8))
    monkeypatch.setattr(images, "_STRIP_PIXELS", 300)
    want = _old_pipeline(Image.open(path), spec)
    assert np.array_equal(load_images([path], spec)[0], want if spec.channels == 3 else want[..., None])


def test_a_large_image_with_alpha_takes_little_beyond_its_decoded_pixels(tmp_path):
    # Converted whole, a 19000x9000 RGBA PNG (684 MB decoded) took 3262 MB at its peak (about 4.8
    # decoded images); in strips, the decoded image and the RGB result, 2 of them. Here 3000x3000
    # (36 MB decoded), in a process of its own (ru_maxrss is its peak).
    import subprocess
    import sys

    rgba = np.zeros((3000, 3000, 4), np.uint8)
    rgba[..., 0] = np.arange(3000, dtype=np.uint32) % 251
    rgba[..., 3] = (np.arange(3000, dtype=np.uint32) % 256)[:, None]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "big.png", compress_level=1)
    code = (
        "import resource, sys; from resnet_jax.images import load_images; "
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; "
        "start = rss(); load_images([sys.argv[1]], 'cifar10'); print(rss() - start)"
    )
    grown = int(subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True, text=True,
                               check=True, timeout=300).stdout)
    decoded = 3000 * 3000 * 4
    assert grown < 2.6 * decoded, f"{grown / decoded:.2f} decoded images"


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100, 65535, 30000]] * 28, np.uint16)[:, [0, 1, 2, 3] * 7]
    Image.fromarray(a).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    out = load_images([tmp_path / "16.png"], GRAY)[0, 0, :4, 0]
    assert out.tolist() == [0, 100, 255, round(30000 / 257)]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_greyscale_is_rounded_in_integers_as_through_floats_for_every_value(mode):
    from resnet_jax.images import _to_l_or_rgb

    every = np.arange(65536).reshape(256, 256)
    if mode == "I":  # a 32-bit "I" image may hold values beyond 16 bits: clipped
        every = np.concatenate([every, [[-(2**31), -1, 65536, 2**31 - 1] * 64]]).astype(np.int32)
    image = Image.fromarray(every.astype(np.uint16) if mode == "I;16" else every)
    assert image.mode == mode
    want = np.clip(np.rint(every / 257), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(_to_l_or_rgb(image)), want)


def test_sixteen_bit_greyscale_takes_no_float64_copy():
    # Through float64 (8 bytes a pixel, several copies), a 16-bit image at Pillow's pixel limit
    # (179 million pixels, 358 MB as "I;16") took gigabytes.
    import tracemalloc

    from resnet_jax.images import _to_l_or_rgb

    image = Image.fromarray(np.full((1000, 1000), 40_000, np.uint16))
    tracemalloc.start()
    try:
        out = _to_l_or_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.asarray(out).max() == round(40_000 / 257)
    assert peak < 10 * 1_000_000, f"{peak / 1e6:.1f} bytes a pixel"


def test_jpeg_greyscale_and_colour(tmp_path):
    g = np.zeros((40, 40), np.uint8)
    g[:, 20:] = 255
    gray = load_images([_save(tmp_path / "g.jpg", g, quality=100)], GRAY)[0, ..., 0].astype(int)
    assert gray[:, :12].max() <= 8 and gray[:, 16:].min() >= 247  # the edge is blurred by the resize
    c = np.full((32, 32, 3), (10, 200, 30), np.uint8)
    colour = load_images([_save(tmp_path / "c.jpg", c, quality=100)], COLOUR)[0].astype(int)
    assert np.abs(colour - [10, 200, 30]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((28, 56), np.uint8)
    a[:, :28] = 255  # left half white as stored
    image = Image.fromarray(a)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_images([tmp_path / "rot.jpg"], GRAY)[0, ..., 0].astype(int)
    # Displayed upright, the stored left half is on top.
    assert out[:10].min() >= 240 and out[-10:].max() <= 15


def test_no_automatic_inversion(tmp_path):
    white = np.full((28, 28), 255, np.uint8)  # a dark-on-white photo stays as it is
    assert (load_images([_save(tmp_path / "w.png", white)], GRAY) == 255).all()


def test_no_paths_give_an_empty_batch_and_a_bare_path_is_a_mistake(tmp_path):
    assert load_images([], COLOUR).shape == (0, 32, 32, 3)
    with pytest.raises(TypeError, match="sequence of paths"):
        load_images(str(tmp_path / "a.png"), GRAY)


def test_a_large_image_reads_without_pillows_warning_and_a_huge_one_is_refused(tmp_path, monkeypatch, recwarn):
    # Pillow's limits scaled down: a warning above MAX_IMAGE_PIXELS, an error above twice it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    large = load_images([_save(tmp_path / "large.png", _gradient(40, 40)[..., 0])], GRAY)  # 1,600 pixels
    assert large.shape == (1, 28, 28, 1)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ImageError, match="huge.png: image too large"):
        load_images([_save(tmp_path / "huge.png", _gradient(50, 50)[..., 0])], GRAY)  # 2,500 pixels


def test_a_missing_file_is_named(tmp_path):
    good = _save(tmp_path / "ok.png", _gradient(28, 28)[..., 0])
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_images([good, tmp_path / "nope.png"], GRAY)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        load_images([tmp_path], GRAY)


def test_a_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.png: not an image file"):
        load_images([tmp_path / "notes.png"], GRAY)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_a_truncated_image_is_refused(tmp_path, ext):
    path = _save(tmp_path / f"full.{ext}", _gradient(64, 64))
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{ext}: truncated or corrupt"):
        load_images([cut], COLOUR)


def test_a_float_image_mode_is_refused(tmp_path):
    Image.fromarray(np.zeros((28, 28), np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(ImageError, match=r"f\.tiff: cannot convert an image of mode 'F'"):
        load_images([tmp_path / "f.tiff"], GRAY)


# --- .npy --------------------------------------------------------------------


def _npy(tmp_path, array, name="x.npy"):
    np.save(tmp_path / name, array)
    return tmp_path / name


@pytest.mark.parametrize("shape, n", [((5, 28, 28), 5), ((5, 28, 28, 1), 5), ((28, 28), 1), ((28, 28, 1), 1)])
def test_npy_greyscale_shapes(tmp_path, shape, n):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = load_npy(_npy(tmp_path, a), GRAY)
    assert out.shape == (n, 28, 28, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out.reshape(-1), a.reshape(-1))


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (32, 32, 3)])
def test_npy_colour_shapes(tmp_path, shape):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = load_npy(_npy(tmp_path, a), COLOUR)
    assert out.shape == (shape[0] if len(shape) == 4 else 1, 32, 32, 3)
    np.testing.assert_array_equal(out.reshape(-1), a.reshape(-1))


def test_npy_float_in_unit_range_is_scaled_and_rounded(tmp_path):
    a = np.array([0.0, 1.0, 0.5, 0.2, 1 / 255], np.float32)
    img = np.resize(a, (2, 28, 28))
    out = load_npy(_npy(tmp_path, img), GRAY)
    assert out[0, 0, :5, 0].tolist() == [0, 255, 128, 51, 1]


@pytest.mark.parametrize(
    "array, spec, message",
    [
        (np.zeros((2, 32, 32), np.uint8), GRAY, r"shape \(2, 32, 32\) is not fashion_mnist's native 28x28x1"),
        (np.zeros((2, 32, 32), np.uint8), COLOUR, r"not cifar10's native 32x32x3 \(accepted: \(N, 32, 32, 3\), \(32, 32, 3\)\)$"),
        (np.zeros((2, 3, 32, 32), np.uint8), COLOUR, "channels-first: use array.transpose"),
        (np.zeros((0, 28, 28), np.uint8), GRAY, "holds no images"),
        (np.zeros((2, 28, 28), np.int64), GRAY, "dtype int64 is neither uint8"),
        (np.zeros((2, 28, 28), bool), GRAY, "dtype bool is neither uint8"),
        (np.full((2, 28, 28), 255.0), GRAY, r"values in \[0, 1\]; it holds \[255, 255\]"),
        (np.full((2, 28, 28), np.nan, np.float32), GRAY, "NaN or infinite"),
    ],
)
def test_npy_refusals_name_the_file_and_the_reason(tmp_path, array, spec, message):
    path = _npy(tmp_path, array, "batch.npy")
    with pytest.raises(ImageError, match=message) as err:
        load_npy(path, spec)
    assert str(err.value).startswith(f"{path}: ")


def test_npy_missing_npz_pickle_and_garbage_are_refused(tmp_path):
    with pytest.raises(ImageError, match=r"none\.npy: no such file"):
        load_npy(tmp_path / "none.npy", GRAY)
    np.savez(tmp_path / "two.npz", a=np.zeros(3))
    with pytest.raises(ImageError, match=r"two\.npz: an \.npz archive"):
        load_npy(tmp_path / "two.npz", GRAY)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match=r"obj\.npy: not a readable \.npy array"):
        load_npy(tmp_path / "obj.npy", GRAY)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ImageError, match=r"junk\.npy: not a readable \.npy array"):
        load_npy(tmp_path / "junk.npy", GRAY)
    with pytest.raises(ImageError, match="not a file"):
        load_npy(tmp_path, GRAY)


@pytest.mark.parametrize("shape", [(10**12, 28, 28), (2 * 10**7, 28, 28)])
def test_an_npy_whose_header_declares_more_than_the_file_holds_is_refused_unread(tmp_path, shape):
    # np.load allocated what the header declared first: 100 bytes asking for 713 TiB ended in a
    # MemoryError traceback; 15 GB was allocated, then refused as short.
    path = tmp_path / "short.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.write(bytes(100))
    with pytest.raises(ImageError, match=rf"short\.npy: not a readable \.npy array \(its header declares uint8 "
                                         rf"\({shape[0]}, 28, 28\), {shape[0] * 784:,} bytes, in a file of \d+ bytes"):
        load_npy(path, GRAY)


@pytest.mark.parametrize("version", [2, 3])
def test_an_npy_of_format_2_or_3_is_checked_as_1_is(tmp_path, version):
    # A format 3.0 header (2.0's, in UTF-8) went unchecked: np.load asked for 713 TiB, a MemoryError traceback.
    path = tmp_path / "short.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 28, 28)})
        f.write(bytes(100))
    with open(path, "r+b") as f:
        f.seek(6)  # the major version, after b"\x93NUMPY"
        f.write(bytes([version]))
    with pytest.raises(ImageError, match=r"short\.npy: not a readable \.npy array \(its header declares uint8 "
                                         r"\(1000000000000, 28, 28\), 784,000,000,000,000 bytes"):
        load_npy(path, GRAY)
    whole = np.ones((2, 28, 28), np.float32)  # and a whole one is read
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, np.lib.format.header_data_from_array_1_0(whole))
        f.write(whole.tobytes())
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(bytes([version]))
    assert (load_npy(path, GRAY) == 255).all()


def test_an_npy_of_format_3_with_a_long_utf8_header_is_checked(tmp_path):
    # np.load's limit of 10,000 header characters is up to 40,000 bytes in UTF-8: a header of 9,000
    # "é" (18,000 bytes), read as Latin-1, was over the 2.0 reader's limit, so nothing was checked
    # and np.load asked for 931 GiB, a MemoryError traceback.
    path = tmp_path / "short.npy"
    header = ("{'descr': [('%s', '|u1')], 'fortran_order': False, 'shape': (%d,), }" % ("\u00e9" * 9000, 10**12)).encode()
    header += b" " * (-(len(header) + 13) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x03\x00" + len(header).to_bytes(4, "little") + header + bytes(100))
    with pytest.raises(ImageError, match=r"short\.npy: not a readable \.npy array \(its header declares .* "
                                         r"\(1000000000000,\), 1,000,000,000,000 bytes, in a file of"):
        load_npy(path, GRAY)
    # and read as np.load reads it: the field's name is "é" * 9000, not its UTF-8 bytes as Latin-1
    with open(path, "rb") as f:
        assert data.npy_header(f)[2].names == ("\u00e9" * 9000,)


@pytest.mark.parametrize("version", [2, 3])
def test_an_npy_header_longer_than_numpy_reads_is_refused_before_np_load(tmp_path, monkeypatch, version):
    # 2.0 and 3.0 give the header's length in 4 bytes: np.load allocated a buffer of the 4 GB
    # declared before its 10,000-character limit applied (a MemoryError traceback under ulimit -v).
    path = tmp_path / "long.npy"
    path.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + b"\xff\xff\xff\xff{}")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was reached"))
    with pytest.raises(ImageError, match=r"long\.npy: not a readable \.npy array \(an \.npy header of 4,294,967,295 "
                                         r"bytes, which np\.load does not read\)$"):
        load_npy(path, GRAY)
    path.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + (20_000).to_bytes(4, "little") + b" " * 20_000)
    with pytest.raises(ImageError, match=r"\(an \.npy header of 20,000 characters, which np\.load does not read\)$"):
        load_npy(path, GRAY)


def test_an_npy_with_a_dimension_numpy_cannot_count_is_refused(tmp_path):
    # (2**64, 0, 28) holds no byte, so the header check lets it by; np.load's OverflowError was a traceback.
    path = tmp_path / "wide.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (2**64, 0, 28)})
    with pytest.raises(ImageError, match=r"wide\.npy: not a readable \.npy array \("):
        load_npy(path, GRAY)
