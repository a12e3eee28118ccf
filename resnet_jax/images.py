"""A user's own images, made into the uint8 arrays the model was trained on.

The training data reaches the model as uint8 (N, H, W, C) at the dataset's
native size (28x28x1 for the MNIST family, 32x32x3 for CIFAR-10); the jitted steps'
:func:`resnet_jax.data.preprocess` then resizes to ``--resize`` and scales to
[0, 1] on the device. So a prediction input only has to be brought to
that same native uint8 form, and everything after it is the training path
itself. :func:`load_images` does that for image files (with Pillow), and
:func:`load_npy` for arrays saved with NumPy.

Every failure is an :class:`ImageError` whose message names the file, so a
command line can print it as one line.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from resnet_jax.data import DATASETS, DatasetSpec, npy_header


class ImageError(Exception):
    """An input file that cannot be used; the message names the file and why."""


def load_images(paths: Sequence[str | Path], spec: DatasetSpec | str) -> np.ndarray:
    """Image files (anything Pillow opens: PNG, JPEG, ...) as uint8 (N, size, size, channels) for ``spec``
    (a :class:`~resnet_jax.data.DatasetSpec` or its name, as ``data.load`` takes: ``"fashion_mnist"``).

    Each file is converted the way the dataset's own images are:

    * EXIF orientation is applied first, so a phone photo is upright as its
      owner sees it.
    * Transparency is composited over **black**. The MNIST family draws light
      strokes/garments on a black background, so a transparent background
      must become that background; CIFAR-10 has no background convention and
      gets the same rule, for one rule everywhere.
    * 16-bit greyscale is scaled to 8 bits (x / 257, rounded), not clipped as
      Pillow's own ``convert("L")`` would.
    * Then mode ``"L"`` for 1-channel sets (Pillow's ITU-R 601-2 luma) and
      ``"RGB"`` for 3-channel sets (a greyscale file is repeated into all
      three channels).
    * Finally a bilinear resize (Pillow's, which widens its filter when
      shrinking, so a large photo is averaged rather than aliased) to the
      dataset's native square size. A non-square image is stretched, not
      cropped or padded: crop it to the object first if its shape matters.

    Fashion-MNIST (like MNIST and KMNIST) shows a light object on a black
    background. A photo of a dark garment on a white table is the opposite
    and should be inverted (and cropped to the garment) before it is given
    here; nothing does that automatically, because no rule can tell a dark
    shirt on white from a white shirt on black.

    An empty ``paths`` gives an empty (0, size, size, channels) array.
    Raises :class:`ImageError` naming the file if one is missing, is not an
    image, is truncated or corrupt, or is in a mode that cannot be converted.
    """
    if isinstance(paths, (str, Path)):  # one path would otherwise be read as a sequence of characters
        raise TypeError("load_images takes a sequence of paths; wrap a single path in a list")
    if isinstance(spec, str):
        if spec not in DATASETS:
            raise ValueError(f"unknown dataset {spec!r}: one of {', '.join(DATASETS)}")
        spec = DATASETS[spec]
    size, channels = spec.image_size, spec.channels
    out = np.zeros((len(paths), size, size, channels), np.uint8)
    for i, path in enumerate(paths):
        array = np.asarray(_open(Path(path), size, "L" if channels == 1 else "RGB"), np.uint8)
        out[i] = array[..., None] if channels == 1 else array
    return out


# Pixels converted at a time (see _converted): 2M pixels, 8 MB a copy in RGBA.
_STRIP_PIXELS = 1 << 21


def _open(path: Path, size: int, mode: str):
    """The file as a Pillow image of ``mode`` ("L" or "RGB") and ``size`` x ``size``, fully decoded
    (so truncation shows here)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        # Pillow warns (two lines on stderr) between its pixel limit and twice that, and
        # refuses above (DecompressionBombError, below). The user chose this file, and it is
        # shrunk to the model's input next: read it without the warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes now: a truncated file fails here, not later
                # A copy of the whole image only where the EXIF orientation turns it (exif_transpose
                # copies even when it does not; its in_place=True needs Pillow 10.0). Converted inside
                # the `with`, as closing the file drops the decoded pixels.
                if image.getexif().get(0x0112, 1) != 1:  # 0x0112: the Orientation tag
                    image = ImageOps.exif_transpose(image)
                image = _converted(image, path, mode)
    except UnidentifiedImageError:
        hint = "; arrays go in .npy files (np.save), one array each" if path.suffix.lower() == ".npz" else ""
        raise ImageError(f"{path}: not an image file Pillow can read{hint}") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: image too large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's truncated/corrupt-data errors
        raise ImageError(f"{path}: truncated or corrupt image ({err})") from None
    # Resized once the file is closed, which frees the decoded pixels.
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR)


def _converted(image, path: Path, mode: str):
    """The decoded ``image`` as ``mode`` by :func:`_to_l_or_rgb`, in horizontal strips of about
    ``_STRIP_PIXELS``, so that only the decoded image and the result are ever whole.

    Converted whole, an image at Pillow's limit (2 * MAX_IMAGE_PIXELS, 179 million pixels) took
    about five full-size copies beside the decoded one (EXIF-transpose copy, RGBA copy, black
    layer, composite, RGB, the dataset's convert): on a 19000x9000 RGBA PNG (171 Mpixels, 684 MB
    decoded; Pillow keeps RGB, RGBA and LA at 4 bytes a pixel) load_images peaked 3262 MB above its
    start. In strips: 1339 MB for a 3-channel set (decoded + RGB), 850 MB for a 1-channel set
    (decoded + L), and the same for the image as LA. Every conversion here is per pixel, so strips
    give the same bytes as the whole image.
    (The resize stays one call on the whole result: two calls, one a direction, can round
    differently from Pillow's one call, so a strip-wise resize is not the same to the bit.)
    """
    from PIL import Image

    w, h = image.size
    out = Image.new(mode, (w, h))
    rows = max(1, _STRIP_PIXELS // max(1, w))
    try:
        for top in range(0, h, rows):
            out.paste(_to_l_or_rgb(image.crop((0, top, w, min(h, top + rows))), mode), (0, top))
    except (ValueError, OSError) as err:
        raise ImageError(f"{path}: cannot convert an image of mode {image.mode!r} ({err})") from None
    return out


def _to_l_or_rgb(image, mode: str | None = None):
    """``image`` as ``mode`` ("L" or "RGB"; by default whichever of the two keeps its colour),
    alpha composited over black, 16-bit scaled to 8."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG's 16-bit grey opens as "I;16" or "I"): full scale is 65535.
        # rint(x / 257) in integers, exactly (257 is odd: no x is halfway between two levels),
        # at 4 bytes a pixel: through float64, an image at Pillow's pixel limit took gigabytes.
        levels = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # "I" holds any int32
        levels += 128
        levels //= 257
        image = Image.fromarray(levels.astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("floating-point images are not supported; save it as an 8- or 16-bit PNG")
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Over opaque black, Image.alpha_composite gives each colour value v of alpha a as
        # round(v * a / 255) exactly, and so does Image.composite(colour, black, alpha): one layer
        # fewer, and the same to the bit for every (v, a) (tests/test_images.py checks all 65536).
        # Grey with alpha for a grey set is composited as "L" directly: the luma of equal R, G and
        # B is that value, so going through RGB gave the same.
        if image.mode == "LA" and mode == "L":
            colour = image.convert("L")
        else:
            image = image if image.mode == "RGBA" else image.convert("RGBA")
            colour = image.convert("RGB")
        image = Image.composite(colour, Image.new(colour.mode, colour.size), image.getchannel("A"))
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # palette, CMYK, YCbCr...: "L" is then taken from RGB if needed
    return image if mode is None or image.mode == mode else image.convert(mode)


def _npy_declared(path: Path) -> tuple[tuple, np.dtype, int] | None:
    """(shape, dtype, bytes) that an .npy file's header declares; None where the file does not begin
    as an .npy does (np.load then says what it is). ImageError for an .npy header np.load would not
    read: it is refused here, as np.load could first allocate the 4 GB its length may declare."""
    try:
        with open(path, "rb") as f:
            if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                return None
            f.seek(0)
            _, shape, dtype = npy_header(f)
    except OSError:
        return None
    except (ValueError, EOFError) as err:  # UnicodeDecodeError (a 3.0 header that is no UTF-8) too
        raise ImageError(f"{path}: not a readable .npy array ({err})") from None
    return shape, dtype, int(np.prod(shape, dtype=object)) * dtype.itemsize


def load_npy(path: str | Path, spec: DatasetSpec) -> np.ndarray:
    """A NumPy ``.npy`` batch as uint8 (N, size, size, channels) for ``spec``.

    The array must already be at the dataset's native size (it is taken as
    what the dataset itself holds; :func:`load_images` is the way for
    pictures of other sizes). Accepted shapes, with S the native side and C
    the dataset's channels: (S, S) and (S, S, C) for one image; (N, S, S) for
    1-channel sets; (N, S, S, C). Accepted dtypes: uint8 (0..255, as in the
    dataset) or floating point in [0, 1] (as after ``ToTensor``), which is
    scaled by 255 and rounded. Anything else is refused rather than guessed
    at: an int64 array may hold 0..255 or 0..65535, and a channels-first
    (N, C, S, S) array from PyTorch must be transposed by its owner.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if (declared := _npy_declared(path)) and declared[2] > path.stat().st_size:
        # np.load allocates what the header declares before it reads: 100 bytes could ask for terabytes.
        shape, dtype, nbytes = declared
        raise ImageError(f"{path}: not a readable .npy array (its header declares {dtype} {shape}, {nbytes:,} bytes, "
                         f"in a file of {path.stat().st_size:,} bytes: not written whole?)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, OverflowError) as err:  # OverflowError: a dimension over 2**63
        # NumPy's advice to load "pickled" data with allow_pickle=True would be wrong (and unsafe) here.
        if "Object arrays" in str(err):  # an .npy of dtype object: Python objects, read only by unpickling
            why = "an array of Python objects (dtype object), which is not read; save the pixels as numbers"
        else:  # anything else NumPy would unpickle is no .npy at all
            why = "not an .npy file" if "pickle" in str(err) else str(err)
        raise ImageError(f"{path}: not a readable .npy array ({why})") from None
    if not isinstance(array, np.ndarray):  # np.load returns an NpzFile for .npz archives
        array.close()
        raise ImageError(f"{path}: an .npz archive; save one array with np.save(...) as .npy")

    s, c = spec.image_size, spec.channels
    shape = array.shape
    if shape == (s, s) and c == 1:
        array = array[None, :, :, None]
    elif shape == (s, s, c):
        array = array[None]
    elif array.ndim == 3 and shape[1:] == (s, s) and c == 1:
        array = array[..., None]
    elif array.ndim == 4 and shape[1:] == (s, s, c):
        pass
    else:
        accepted = [f"(N, {s}, {s}, {c})", f"({s}, {s}, {c})"] + ([f"(N, {s}, {s})", f"({s}, {s})"] if c == 1 else [])
        hint = ""
        if array.ndim == 4 and shape[1] == c and shape[2:] == (s, s):
            hint = "; it looks channels-first: use array.transpose(0, 2, 3, 1)"
        raise ImageError(
            f"{path}: shape {shape} is not {spec.tfds_name}'s native {s}x{s}x{c} "
            f"(accepted: {', '.join(accepted)}){hint}"
        )
    if array.shape[0] == 0:
        raise ImageError(f"{path}: holds no images")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageError(f"{path}: a float array must hold values in [0, 1]; it holds NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ImageError(
                f"{path}: a float array must hold values in [0, 1]; it holds [{array.min():g}, {array.max():g}]"
            )
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    raise ImageError(f"{path}: dtype {array.dtype} is neither uint8 (0..255) nor float in [0, 1]")
