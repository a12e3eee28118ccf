"""Convolution lowerings: one function, the same math, the fastest form per platform and shape.

``conv2d`` computes exactly ``torch.nn.functional.conv2d`` (cross-correlation,
symmetric zero padding) in NHWC/HWIO. Two lowerings:

* ``"xla"``: ``lax.conv_general_dilated``. On GPU and TPU this is cuDNN / the
  MXU convolution emitter and is what we want everywhere there.
* ``"patches"``: gather the kernel taps as strided slices, concatenate them on
  the channel axis and do one matmul. Taps that read only padding for every
  output position are dropped, so a 3x3 conv on a 1x1 map becomes a dense layer
  (only the centre tap touches data) and a 3x3 stride-2 conv on a 2x2 map keeps
  four of its nine taps. XLA:CPU runs its generic convolution on
  such small maps with many channels at a few GFLOP/s, while the matmul goes
  through its fast GEMM (BENCHMARKS.md, "CPU conv lowering", has the numbers).

``"auto"`` picks "patches" on CPU where XLA's convolution is slow (see
:func:`cpu_prefers_patches`) and "xla" everywhere else. Both are tested against
each other (tests/test_ops.py).

On CPU the convolutions themselves also depend on a compiler option:
:func:`compiler_options` (every jitted program of the package passes it).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
import warnings

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "patches")

# The largest output map (Ho * Wo) for which "auto" uses patches on CPU for a
# k x k conv (k > 1). Measured with benchmarks/cpu_conv.py, batch 64, 2 cores,
# under compiler_options("cpu"): XLA's convolution takes 20-92 ms (forward and
# backward) for outputs of 2x2 and 1x1 where patches take 0.7-3.2 ms, and is as
# fast or faster from 3x3 outputs up (BENCHMARKS.md, "CPU conv lowering").
CPU_PATCHES_MAX_OUT = 4

# XLA:CPU hands convolutions, dots and some reductions to YNNPACK by default
# (jaxlib 0.10). For this network's convolutions at 96x96 YNNPACK is 1.2-3.5x
# slower than XLA's own (Eigen) convolution, forward and backward (BENCHMARKS.md,
# "CPU conv lowering"); dots and reductions are faster with it. So on CPU we keep the
# default set minus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION. The option only
# chooses which kernel library computes the same convolution. jaxlib 0.12.1's YNNPACK
# convolutions are faster than 0.10's, but the 96x96 step is still 10% faster with this
# option (2026-12-07; BENCHMARKS.md, "The newest JAX on CPU").
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


# The platform whose programs are being traced: set by resnet_jax.training.jit for the devices
# its program runs on, so that fit(devices=jax.devices("cpu")) on a GPU host picks the CPU's
# lowerings. Unset (a user's own jax.jit), JAX's default backend is where the program runs.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("resnet_jax_target_platform", default=None)


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") the network being traced will run on."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def targeting(platform: str):
    """Trace for ``platform``: inside, :func:`target_platform` is ``platform``."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


@functools.cache
def compiler_options(platform: str) -> dict | None:
    """XLA options for programs that run the network on ``platform`` (pass to ``jax.jit``).

    ``None`` on GPU and TPU, and on a jaxlib that does not know the CPU option
    (it is experimental): such a jaxlib keeps its own defaults.
    """
    if platform != "cpu":
        return None
    try:
        cpu = jax.devices("cpu")[0]
        jax.jit(lambda a: a + 1, compiler_options=_CPU_OPTIONS).lower(jax.device_put(jnp.float32(0), cpu)).compile()
    except Exception as err:  # an unknown option or enum value: keep XLA's defaults, and say what it costs
        warnings.warn(
            f"this jaxlib does not take resnet_jax's XLA:CPU options {_CPU_OPTIONS} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the network runs with its "
            "default kernels on CPU (jaxlib 0.10's default, YNNPACK, computes this network's convolutions "
            "1.2-3.5x slower: BENCHMARKS.md, \"CPU conv lowering\")",
            RuntimeWarning, stacklevel=2,
        )
        return None
    return dict(_CPU_OPTIONS)


def materialize(x, anchor):
    """``x``, bit for bit, but computed once and kept in memory by XLA:CPU.

    XLA:CPU copies cheap elementwise chains (BatchNorm, residual add, ReLU) into
    every consumer. In a training step one consumer of each activation is the
    transpose XLA inserts for the weight gradient of the next convolution, and
    inside it the copied chain reads its inputs with large strides: at 96x96 one
    such fusion recomputed two whole residual blocks and took 49 ms of the step
    (505 ms before this, 453 ms after, interleaved; BENCHMARKS.md, "How we got here"). XLA's fusion heuristic does not
    duplicate a floating-point division into several consumers, so dividing by a
    one the compiler cannot fold makes it compute the value once and store it.
    ``x / 1`` is ``x`` exactly in IEEE arithmetic (NaN, infinities and -0
    included; subnormals go to zero, as in every XLA:CPU arithmetic op, the
    ReLU's max among them) and the gradient ``g / 1`` is ``g``: the math is unchanged, and a
    compiler that saw through the trick would only lose the speed.
    (``lax.optimization_barrier`` would say this directly, but XLA:CPU drops it
    before fusion; measured.)

    ``anchor`` is any small replicated array, a parameter in practice: the one
    is ``(bits | 1) & 1`` of its first element, so a batch-sharded ``x`` needs no
    communication. The identity on GPU and TPU, whose fusion is not affected.
    """
    if target_platform() != "cpu":
        return x
    probe = lax.stop_gradient(anchor.reshape(-1)[0])
    bits = lax.bitcast_convert_type(probe, jnp.dtype(f"uint{8 * probe.dtype.itemsize}"))
    one = ((bits | 1) & 1).astype(x.dtype)
    return x / one


def cpu_prefers_patches(in_hw: tuple[int, int], kernel: int, stride: int, padding: int) -> bool:
    """Whether "auto" lowers this conv as patches + matmul on CPU (measured; see CPU_PATCHES_MAX_OUT)."""
    ho = output_size(in_hw[0], kernel, stride, padding)
    wo = output_size(in_hw[1], kernel, stride, padding)
    return kernel > 1 and ho * wo <= CPU_PATCHES_MAX_OUT


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """PyTorch's output size for one spatial axis (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(x, kernel, *, strides: int = 1, padding: int = 0, impl: str = "auto"):
    """Cross-correlate NHWC ``x`` with HWIO ``kernel``, symmetric zero ``padding``, square ``strides``."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    for name, value in (("strides", strides), ("padding", padding)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"conv2d's {name} is one int (square, as every conv of the chapter), got {value!r}")
        if value < (1 if name == "strides" else 0):
            raise ValueError(f"conv2d's {name} must be {'>= 1' if name == 'strides' else '>= 0'}, got {value}")
    kh, kw = kernel.shape[:2]
    if output_size(x.shape[1], kh, strides, padding) < 1 or output_size(x.shape[2], kw, strides, padding) < 1:
        # XLA's lowering returns an empty map, the patches one fails in NumPy: say it, once, for both.
        raise ValueError(f"conv2d: a {kh}x{kw} kernel does not fit the {x.shape[1]}x{x.shape[2]} input padded by "
                         f"{padding} on each side: the output would be empty")
    if impl == "auto":
        on_cpu = target_platform() == "cpu"
        impl = "patches" if on_cpu and cpu_prefers_patches(x.shape[1:3], kernel.shape[0], strides, padding) else "xla"
    if impl == "xla":
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(strides, strides),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return _conv2d_patches(x, kernel, strides, padding)


def _live_taps(size: int, kernel: int, stride: int, padding: int, out: int) -> list[int]:
    """Kernel offsets along one axis that read at least one real (non-padding) input."""
    return [
        k for k in range(kernel) if any(0 <= o * stride + k - padding < size for o in range(out))
    ]


def _conv2d_patches(x, kernel, stride: int, padding: int):
    n, h, w, c = x.shape
    kh, kw, _, features = kernel.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    rows = _live_taps(h, kh, stride, padding, ho)
    cols = _live_taps(w, kw, stride, padding, wo)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taps = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        for i in rows
        for j in cols
    ]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    # Rows of the matrix in the same (i, j, channel) order as the patches.
    w_mat = kernel[jnp.array(rows)][:, jnp.array(cols)].reshape(len(rows) * len(cols) * c, features)
    return jnp.dot(patches, w_mat, preferred_element_type=x.dtype)


# --------------------------------------------------------------------------- max-pool

POOL_IMPLS = ("auto", "xla", "slices")


def max_pool(x, window: int, stride: int | None = None, padding: int = 0, impl: str = "auto"):
    """``nn.MaxPool2d(window, stride, padding)`` in NHWC: -inf padding, gradient to the first maximum.

    The defaults are PyTorch's (``stride`` = ``window``, no padding); the stem's pool is
    ``max_pool(x, 3, 2, 1)``. As in PyTorch, ``padding`` may be at most half the window:
    more would give whole windows of padding, whose maximum is -inf.

    ``"xla"`` is ``reduce_window`` (its gradient is XLA's select-and-scatter).
    ``"slices"`` takes the max over the window's strided slices, with a custom
    gradient that, like PyTorch and select-and-scatter, sends each window's
    gradient to the first (row-major) position holding the maximum; a plain
    ``jnp.maximum`` chain would split it between ties. On XLA:CPU select-and-
    scatter is slow: "slices" is 4-10x faster there for b1's pool (BENCHMARKS.md, "CPU max-pool":
    measured before the package's compiler options, not rerun).
    """
    if impl not in POOL_IMPLS:
        raise ValueError(f"max-pool impl must be one of {POOL_IMPLS}, got {impl!r}")
    stride = window if stride is None else stride
    for name, value, least in (("window", window, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"max_pool's {name} must be an int >= {least} (square windows), got {value!r}")
    window, stride, padding = int(window), int(stride), int(padding)
    if padding > window // 2:
        raise ValueError(f"max_pool's padding must be at most half the window ({window} // 2 = {window // 2}), got {padding}")
    if min(output_size(n, window, stride, padding) for n in x.shape[1:3]) < 1:
        raise ValueError(f"max_pool's {window}x{window} window does not fit in the {x.shape[1]}x{x.shape[2]} map "
                         f"padded by {padding}: the output would be empty")
    if impl == "auto":
        impl = "slices" if target_platform() == "cpu" else "xla"
    if impl == "xla":
        return lax.reduce_window(
            x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
            ((0, 0), (padding, padding), (padding, padding), (0, 0)),
        )
    return _max_pool_slices(x, window, stride, padding)


def _pool_taps(xp, window, stride, out_hw):
    n, _, _, c = xp.shape
    ho, wo = out_hw
    return [
        lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c), (1, stride, stride, 1))
        for i in range(window)
        for j in range(window)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_slices(x, window, stride, padding):
    return _max_pool_slices_fwd(x, window, stride, padding)[0]


def _max_pool_slices_fwd(x, window, stride, padding):
    out_hw = (output_size(x.shape[1], window, stride, padding), output_size(x.shape[2], window, stride, padding))
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    taps = _pool_taps(xp, window, stride, out_hw)
    out = functools.reduce(jnp.maximum, taps)
    return out, (x, out)


def _max_pool_slices_bwd(window, stride, padding, res, g):
    x, out = res
    n, h, w, c = x.shape
    ho, wo = out.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    hp, wp = h + 2 * padding, w + 2 * padding
    taken = jnp.zeros(out.shape, bool)
    grad = jnp.zeros((n, hp, wp, c), g.dtype)
    zero = jnp.zeros((), g.dtype)
    for k, tap in enumerate(_pool_taps(xp, window, stride, (ho, wo))):
        i, j = divmod(k, window)
        first = (tap == out) & ~taken  # the first position of the window holding the max
        taken = taken | first
        # Transpose of the strided slice: scatter back with interior padding.
        grad = grad + lax.pad(
            jnp.where(first, g, zero), zero,
            ((0, 0, 0), (i, hp - i - (ho - 1) * stride - 1, stride - 1), (j, wp - j - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)),
        )
    return (grad[:, padding : padding + h, padding : padding + w, :],)


_max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)
