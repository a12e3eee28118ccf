"""ResNet-18 of the chapter ("Dive into Deep Learning" variant), in Flax linen.

The modules mirror the chapter's PyTorch code block by block:

    Residual       <- class Residual(nn.Module)
    resnet_block   <- def resnet_block(...)
    ResNet18       <- net = nn.Sequential(b1, b2, b3, b4, b5, AdaptiveAvgPool2d, Flatten, Linear)

Layout is NHWC (JAX's native layout); kernels are HWIO. The arithmetic is the
PyTorch original's, and where Flax's defaults differ from PyTorch's we do not use
them:

* Padding is explicit and symmetric, as ``nn.Conv2d(padding=p)`` pads. Flax's
  'SAME' would pad a 96x96 input to a stride-2 7x7 conv as (2, 3), not (3, 3),
  and shift every feature map by a pixel.
* Every conv keeps its bias (``nn.Conv2d`` has ``bias=True`` by default), even
  the ones followed by BatchNorm, so the parameter count is the original's
  11,178,378.
* :class:`BatchNorm` is ``nn.BatchNorm2d``: epsilon 1e-5, momentum 0.1 in
  PyTorch's convention, and running variance updated with the *unbiased* batch
  variance, which ``flax.linen.BatchNorm`` does not do.
* Initialisation is the chapter's (d2l ``train_ch6``): Xavier-uniform for every
  conv and dense kernel; biases keep PyTorch's default U(-1/sqrt(fan_in),
  1/sqrt(fan_in)); BatchNorm scale 1, bias 0, running mean 0, running var 1.

``dtype`` is the computation dtype (``jnp.bfloat16`` for mixed precision);
parameters and BatchNorm statistics are ``param_dtype``, float32 unless asked.
(float64, with ``jax_enable_x64``, serves numerical verification: the multi-device
tests compare runs in float64, where rounding cannot hide or mimic a real difference.)
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import ops

Dtype = Any

# PyTorch's BatchNorm2d defaults.
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
BN_EPSILON = 1e-5

xavier_uniform = nn.initializers.xavier_uniform()


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for Conv2d and Linear: U(-1/sqrt(fan_in), +1/sqrt(fan_in)).

    d2l's ``init_weights`` re-initialises only the weights, so the biases keep
    this default. Flax's bias initialisers never see fan_in, hence the closure.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv2d(nn.Module):
    """``torch.nn.Conv2d(in, features, kernel_size, stride, padding)`` in NHWC.

    A thin module rather than ``flax.linen.Conv`` for two reasons: the bias
    initialiser needs fan_in (see :func:`torch_bias_init`), and the convolution
    itself goes through :func:`resnet_jax.ops.conv2d`, which picks the fastest
    exact lowering for the platform and shape (``conv_impl``).
    Parameters are named ``kernel`` (HWIO) and ``bias`` like Flax's own Conv.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    dtype: Dtype | None = None
    conv_impl: str = "auto"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for name in ("features", "kernel_size", "strides", "padding"):
            value = getattr(self, name)
            # Square kernels, strides and padding only, as every conv of the chapter; a
            # tuple would otherwise fail deep inside the parameter initialiser.
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Conv2d.{name} must be an int (square kernels, strides and padding), got {value!r}")
            if value < (0 if name == "padding" else 1):
                raise ValueError(f"Conv2d.{name} must be {'>= 0' if name == 'padding' else '>= 1'}, got {value}")
        _check_float(x, self.dtype, "Conv2d")
        in_features = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", xavier_uniform, (k, k, in_features, self.features), self.param_dtype)
        bias = self.param("bias", torch_bias_init(in_features * k * k), (self.features,), self.param_dtype)
        dtype = self.dtype or x.dtype
        y = ops.conv2d(
            x.astype(dtype),
            kernel.astype(dtype),
            strides=self.strides,
            padding=self.padding,
            impl=self.conv_impl,
        )
        return y + bias.astype(dtype)


def batch_norm_train(x, scale, bias, epsilon: float, mask=None):
    """Training-mode BatchNorm over the last axis: ``(y, batch mean, biased batch variance)``.

    Forward: ``(x - mean) * (scale / sqrt(var + eps)) + bias`` with the two-pass
    variance E[(x - mean)^2], statistics in float32 (or ``scale``'s dtype if wider)
    whatever ``x``'s dtype. Centring first loses less than the folded form
    ``x * mul + (bias - mean * mul)`` (PyTorch's CPU kernel, with an FMA) when
    |mean| >> std, as after a conv of post-ReLU, all-positive inputs. (With
    autodiff's backward, the folded form also made the gradient compute
    sum(dy * x) - mean * sum(dy), which put 1e-3 relative errors into every
    gradient below b4 at 96x96; the backward below computes ``x - mean`` itself.)

    Backward: the closed form PyTorch's batch_norm_backward uses,
    ``dx = scale/std * (dy - mean(dy) - xhat * mean(dy * xhat))`` (plus the
    mean's and variance's own cotangents), rather than autodiff's transpose of
    the forward. Same math, same centred sums; XLA gets two reductions and one
    elementwise pass per BatchNorm instead of a chain it recomputed inside
    every consumer (BENCHMARKS.md, "CPU: bench.py, batch 64").

    ``mask``: optional (N,) booleans over the batch. The statistics are then
    those of the examples where ``mask`` alone, exactly as if the others were
    not in the batch; the others' outputs are 0 and pass no gradient back. This
    is how :func:`resnet_jax.training.fit` runs the epoch's last, smaller batch
    (96 of 256 in the chapter's epoch) padded to full size: on GPU and TPU inside
    the same compiled program as every other step, on CPU in a second, masked
    program. (Zeros rather than the padding normalised with the valid
    examples' statistics: those can be degenerate, a variance of 0 for one
    example on a 1x1 map, and would scale the padding by 1/sqrt(eps) at every
    layer; zeros keep everything the padding touches finite.)
    """
    return _batch_norm(x, scale, bias, mask, epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm(x, scale, bias, mask, epsilon):
    y, mean, var, _ = _batch_norm_forward(x, scale, bias, mask, epsilon)
    return y, mean, var


def _where_valid(mask, a):
    """``a`` where the example is valid, 0 elsewhere (``a`` unchanged without a mask)."""
    if mask is None:
        return a
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, 0)


def _masked_sum(a, mask):
    """Per-channel sum over the examples where ``mask``: per example first, then weighted."""
    if mask is None:
        return jnp.sum(a, tuple(range(a.ndim - 1)))
    per_example = jnp.sum(a, tuple(range(1, a.ndim - 1)))  # (N, C)
    return jnp.sum(_where_valid(mask, per_example), 0)


def _count(x, mask, dtype):
    """Values per channel that the statistics average: N*H*W, or the valid examples' share of it."""
    per_example = math.prod(x.shape[1:-1])
    if mask is None:
        return math.prod(x.shape[:-1])
    # At least one: a batch with no valid example gives statistics of 0, not NaN (fit never
    # runs one; BatchNorm then keeps its running averages as they were).
    return jnp.maximum(jnp.sum(mask, dtype=dtype), 1) * per_example


def _batch_norm_forward(x, scale, bias, mask, epsilon):
    xf = x.astype(jnp.promote_types(jnp.float32, scale.dtype))
    n = _count(x, mask, xf.dtype)
    mean = _masked_sum(xf, mask) / n
    var = _masked_sum(jnp.square(xf - mean), mask) / n
    inv_std = jax.lax.rsqrt(var + epsilon)
    mul = scale * inv_std
    y = (x - mean.astype(x.dtype)) * mul.astype(x.dtype) + bias.astype(x.dtype)
    return _where_valid(mask, y), mean, var, inv_std


def _batch_norm_fwd(x, scale, bias, mask, epsilon):
    y, mean, var, inv_std = _batch_norm_forward(x, scale, bias, mask, epsilon)
    return (y, mean, var), (x, scale, mask, mean, inv_std)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, scale, mask, mean, inv_std = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = _count(x, mask, mean.dtype)
    xc = x.astype(mean.dtype) - mean  # centred, in the statistics' dtype
    dyf = _where_valid(mask, dy.astype(mean.dtype))  # the padding's outputs are constant zeros
    dbias = jnp.sum(dyf, axes)
    dscale = jnp.sum(dyf * xc, axes) * inv_std  # sum(dy * xhat)
    k = scale * inv_std
    # dx = k * dy + (dmean - k * dbias) / n + xc * (2 * dvar - k * inv_std * dscale) / n
    dx = _where_valid(mask, dyf * k + (dmean - k * dbias) / n + xc * ((2.0 * dvar - k * inv_std * dscale) / n))
    # The mask is not differentiable: no cotangent.
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype), None


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` with its defaults, over the last (channel) axis.

    ``train=True`` normalises with the batch's mean and biased variance and
    moves the running averages (collection ``batch_stats``) by PyTorch's rule,
    using the unbiased variance ``var * n / (n - 1)`` for ``running_var`` as
    PyTorch does. ``train=False`` normalises with the running averages and
    changes nothing.

    Statistics are computed in float32 (or ``param_dtype`` if wider) whatever the input dtype, with the
    two-pass formula E[(x - mean)^2] (``flax.linen.BatchNorm`` defaults to
    E[x^2] - E[x]^2, which loses digits). Under ``jax.jit`` with a batch sharded
    over devices the means are over the global batch: XLA inserts the reductions.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        """``mask`` (train mode only): (N,) booleans, the examples the statistics are taken over
        (see :func:`batch_norm_train`); the running averages then move by those statistics,
        their unbiased variance included. Eval mode ignores it."""
        _check_float(x, self.dtype, "BatchNorm")
        if train and x.size == 0:  # (shapes are static) statistics of nothing: NaN running averages, silently
            raise ValueError(f"BatchNorm in train mode needs at least one value per channel, got shape {x.shape}")
        if not self.is_initializing() and not self.has_variable("batch_stats", "mean"):
            # Flax would create fresh statistics (mean 0, var 1) in train mode and go on, silently.
            raise ValueError(
                "BatchNorm has no running statistics: apply the model to {'params': ..., 'batch_stats': ...}, "
                "not the params alone"
            )
        if train and not self.is_mutable_collection("batch_stats"):
            # Flax's own error, at the first update, says the collection is immutable but not what to pass.
            raise ValueError(
                "BatchNorm with train=True moves its running statistics: apply with mutable=['batch_stats'], "
                "which returns (output, {'batch_stats': ...}), or with train=False to use the running statistics"
            )
        features = x.shape[-1]
        pdt = self.param_dtype
        scale = self.param("scale", nn.initializers.ones, (features,), pdt)
        bias = self.param("bias", nn.initializers.zeros, (features,), pdt)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), pdt)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), pdt)

        dtype = self.dtype or x.dtype
        if train:
            y, mean, var = batch_norm_train(x.astype(dtype), scale, bias, self.epsilon, mask)
            if not self.is_initializing():
                n = _count(x, mask, var.dtype)
                # n == 1 (one image whose feature map here is 1x1: b5 at inputs of 32x32 or
                # less): PyTorch raises "Expected more than 1 value per channel when training".
                # A deliberate difference: we keep the biased value (0) rather than divide by
                # zero or fail, so a last batch of one example does not stop a run.
                unbiased = var * (n / (max(n - 1, 1) if mask is None else jnp.maximum(n - 1, 1)))
                m = self.momentum
                new_mean = (1.0 - m) * running_mean.value + m * mean
                new_var = (1.0 - m) * running_var.value + m * unbiased
                if mask is not None:  # no valid example, no statistics: the averages stay as they were
                    new_mean = jnp.where(jnp.any(mask), new_mean, running_mean.value)
                    new_var = jnp.where(jnp.any(mask), new_var, running_var.value)
                running_mean.value, running_var.value = new_mean, new_var
            return y
        mul = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
        return (x.astype(dtype) - running_mean.value.astype(dtype)) * mul.astype(dtype) + bias.astype(dtype)


class Residual(nn.Module):
    """The chapter's residual block.

    conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (the input,
    or a 1x1 conv with the stride when ``use_1x1conv``), then ReLU. PyTorch's
    ``input_channels`` argument is not needed: Flax infers it from the input.
    """

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1
    dtype: Dtype | None = None
    conv_impl: str = "auto"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        """``mask``: optional (N,) booleans, the examples BatchNorm's batch statistics are over (train mode)."""
        x = _nhwc_float(x, "Residual")
        _check_float(x, self.dtype, "Residual")
        if not isinstance(self.use_1x1conv, (bool, np.bool_)):
            # Residual(3, 3), typed from the chapter, would set use_1x1conv=3: a different block, silently.
            raise TypeError(
                f"Residual.use_1x1conv must be True or False, got {self.use_1x1conv!r}; the chapter's "
                "Residual(input_channels, num_channels, ...) is Residual(num_channels, ...) here: "
                "Flax reads the input channels from the input"
            )
        if not self.use_1x1conv and self.strides != 1:
            raise ValueError(f"Residual(strides={self.strides}) needs use_1x1conv=True: the shortcut must "
                             "downsample as the block does (as in the chapter)")
        if not self.use_1x1conv and x.shape[-1] != self.num_channels:
            # The shortcut adds the input itself to the output (NHWC: channels last).
            raise ValueError(
                f"Residual({self.num_channels}) without use_1x1conv adds its input to its output, so the input "
                f"needs {self.num_channels} channels, last (NHWC); got shape {x.shape}"
            )
        conv = dict(dtype=self.dtype, conv_impl=self.conv_impl, param_dtype=self.param_dtype)
        bn = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv1 = Conv2d(self.num_channels, 3, strides=self.strides, padding=1, name="conv1", **conv)
        y = nn.relu(BatchNorm(name="bn1", **bn)(conv1(x), train, mask))
        y = _stored(y, conv1, train)
        y = Conv2d(self.num_channels, 3, padding=1, name="conv2", **conv)(y)
        y = BatchNorm(name="bn2", **bn)(y, train, mask)
        if self.use_1x1conv:
            x = Conv2d(self.num_channels, 1, strides=self.strides, name="conv3", **conv)(x)
        return _stored(nn.relu(y + x.astype(y.dtype)), conv1, train)


def _nhwc_float(x, who: str, hint: str = "") -> jax.Array:
    """``x`` as a JAX array if it is a float NHWC batch, else a ValueError/TypeError that says what came instead.

    As a JAX array, NumPy's default float64 becomes float32 (unless x64 is on) here, once,
    rather than through each layer's explicit cast to the input's dtype, which JAX warns about.
    """
    _refuse_torch(x, who)
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{who} takes an array (N, H, W, C), got a {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{who} expects NHWC input (N, H, W, C), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        # The layers compute in the input's dtype when none is set: uint8 would round every
        # weight to 0 and give the same output for every input, silently.
        raise TypeError(f"{who} takes float input, got {x.dtype}{hint}")
    return jnp.asarray(x)


def is_torch_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor, recognised by its methods: the JAX side never imports torch."""
    return hasattr(x, "detach") and hasattr(x, "is_floating_point")


def _refuse_torch(x, who: str) -> None:
    """A torch tensor is a TypeError that says how to pass it. JAX's own error, from the dtype
    check, was "Cannot interpret 'torch.float32' as a data type", and the README's PyTorch
    example has such a batch, in NCHW, at hand."""
    if is_torch_tensor(x):
        raise TypeError(
            f"{who} takes a NumPy or JAX array (N, H, W, C), got a torch tensor of shape {tuple(x.shape)}: "
            "pass x.numpy(), and a PyTorch batch (N, C, H, W) as x.permute(0, 2, 3, 1).numpy()"
        )


def _check_float(x, dtype, who: str) -> None:
    """A float input and a float ``dtype`` (or None), else a TypeError. The layers compute in
    ``dtype``, or the input's when it is None: in an integer dtype every weight rounds to 0 and
    the output is the same for every input, silently."""
    _refuse_torch(x, who)
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{who} takes float input, got {jnp.result_type(x).name}")
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{who}.dtype is what the layers compute in: a float dtype, got {jnp.dtype(dtype).name}")


def _stored(y, conv: Conv2d, train: bool):
    """A ReLU output that the next convolution's weight gradient reads: on XLA:CPU,
    stored once instead of recomputed inside that gradient's transpose
    (:func:`resnet_jax.ops.materialize`, exact). ``conv``'s bias anchors the trick."""
    return ops.materialize(y, conv.variables["params"]["bias"]) if train else y


def resnet_block(
    input_channels: int,
    num_channels: int,
    num_residuals: int,
    first_block: bool = False,
    **kwargs,
) -> list[Residual]:
    """The chapter's ``resnet_block``: a list of ``num_residuals`` Residual modules.

    The first residual of every stage but the first halves height and width and
    changes the channel count through a strided 1x1 shortcut. ``input_channels``
    is kept for fidelity to the chapter; Flax infers it. ``kwargs`` (dtype,
    conv_impl, param_dtype) go to every Residual.

    The chapter chains them with ``nn.Sequential(*resnet_block(...))``. Flax's
    ``nn.Sequential`` passes ``train`` to its first module only, so chain them
    with a loop, ``for r in resnet_block(...): x = r(x, train)``, or use
    :class:`Stage`, which does that.
    """
    del input_channels  # inferred from the input by Flax
    if num_residuals < 0:
        raise ValueError(f"num_residuals must be >= 0, got {num_residuals}")
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(num_channels, use_1x1conv=True, strides=2, **kwargs))
        else:
            blk.append(Residual(num_channels, **kwargs))
    return blk


class Stem(nn.Module):
    """b1: 7x7 conv, 64 channels, stride 2, padding 3 -> BN -> ReLU -> 3x3 max-pool, stride 2, padding 1."""

    dtype: Dtype | None = None
    conv_impl: str = "auto"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        pdt = self.param_dtype
        conv = Conv2d(64, 7, strides=2, padding=3, dtype=self.dtype, conv_impl=self.conv_impl, param_dtype=pdt, name="conv")
        x = nn.relu(BatchNorm(dtype=self.dtype, param_dtype=pdt, name="bn")(conv(x), train, mask))
        x = _stored(x, conv, train)
        # Pads with -inf, as nn.MaxPool2d(padding=1) does; the gradient goes to the
        # first maximum of each window, as in PyTorch. "patches" selects the
        # slice-based pool that goes with the patch convolutions.
        pool_impl = {"auto": "auto", "xla": "xla", "patches": "slices"}[self.conv_impl]
        return ops.max_pool(x, 3, stride=2, padding=1, impl=pool_impl)


class Stage(nn.Module):
    """b2..b5: ``nn.Sequential(*resnet_block(...))`` with the ``train`` flag threaded through."""

    input_channels: int
    num_channels: int
    num_residuals: int = 2
    first_block: bool = False
    dtype: Dtype | None = None
    conv_impl: str = "auto"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        # The chapter's first residual has Conv2d(input_channels, ...), which refuses another
        # count; with first_block its residuals are Residual(num_channels, num_channels). Flax
        # infers the count and took any (Stage(999, 128) ran on 64 channels).
        want = self.num_channels if self.first_block else self.input_channels
        if x.shape[-1] != want:
            raise ValueError(f"Stage({self.input_channels}, {self.num_channels}, first_block={self.first_block}) "
                             f"takes {want} input channels, as the chapter's resnet_block; got shape {x.shape}")
        for residual in resnet_block(
            self.input_channels,
            self.num_channels,
            self.num_residuals,
            self.first_block,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            param_dtype=self.param_dtype,
        ):
            x = residual(x, train, mask)
        return x


# (input_channels, num_channels, first_block) of b2..b5, as in the chapter.
STAGES: Sequence[tuple[int, int, bool]] = ((64, 64, True), (64, 128, False), (128, 256, False), (256, 512, False))


def check_mask(mask, n: int, who: str) -> None:
    """Refuse a mask that is not (n,) booleans.

    A float or integer mask (0.5s, or counts) would weigh the examples instead of
    selecting them: BatchNorm's statistics and the loss came out wrong without an error.
    Shape and dtype are static, so this runs once, when the program is traced.
    """
    if jnp.shape(mask) != (n,):
        raise ValueError(f"{who}'s mask has one boolean per image, shape ({n},); got {jnp.shape(mask)}")
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"{who}'s mask selects images: booleans, not {jnp.result_type(mask).name} "
                        "(for weights of your own, weigh the per-example losses)")


class ResNet18(nn.Module):
    """The chapter's ``net``: b1, b2..b5, global average pool, flatten, Linear(512, num_classes).

    Input: NHWC images with ``input_channels`` channels (float, any size: every
    stride-2 reduction leaves at least 1x1; training's lower bound is Config's). Output:
    float32 logits (``param_dtype`` if wider).
    ``mask`` (train mode): optional (N,) booleans; every BatchNorm takes its batch
    statistics over those examples only, as if the batch held them alone (how
    fit pads the epoch's last, smaller batch). The logits of the others are
    meaningless and must be left out of the loss.
    ``apply(..., mutable=['intermediates'])`` also returns the pooled features,
    ``(N, 512)``, as ``['intermediates']['pool'][0]`` (Flax's ``sow`` keeps a tuple);
    ``capture_intermediates`` gives b1..b5.

    Reverse-mode autodiff (``grad``, ``vjp``, and ``jvp`` of a ``grad``) works everywhere;
    forward mode (``jvp``, ``jacfwd``) does not go through train-mode BatchNorm nor the
    slice-based max-pool (on CPU, or with ``conv_impl="patches"``), whose faster lowerings
    define their own VJPs. In eval mode
    ``conv_impl="xla"`` (the same maths) takes forward mode.
    """

    num_classes: int = 10
    input_channels: int = 1
    dtype: Dtype | None = None
    conv_impl: str = "auto"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        for name in ("num_classes", "input_channels"):
            value = getattr(self, name)
            try:  # Python, NumPy and concrete JAX integers (labels.max() + 1), not a float or a bool
                if isinstance(value, bool):
                    raise TypeError
                operator.index(value)
            except TypeError:
                raise TypeError(f"ResNet18.{name} must be an int, got {value!r}") from None
            if value < 1:
                raise ValueError(f"ResNet18.{name} must be >= 1, got {value}")
        x = _nhwc_float(x, "ResNet18", hint=(
            " (images scaled to [0, 1]); resnet_jax.data.preprocess(images, size) resizes and scales "
            "data.load's uint8 images"))
        if x.shape[-1] != self.input_channels:
            raise ValueError(
                f"ResNet18 expects NHWC images with {self.input_channels} channel(s), got shape {x.shape}"
            )
        _check_float(x, self.dtype, "ResNet18")
        if mask is not None:
            check_mask(mask, x.shape[0], "ResNet18")
        common = dict(dtype=self.dtype, conv_impl=self.conv_impl, param_dtype=self.param_dtype)
        wide = jnp.promote_types(jnp.float32, self.param_dtype)  # float32, or float64 for verification
        x = Stem(name="b1", **common)(x, train, mask)
        for i, (cin, cout, first) in enumerate(STAGES):
            x = Stage(cin, cout, 2, first, name=f"b{i + 2}", **common)(x, train, mask)
        x = jnp.mean(x.astype(wide), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + Flatten
        self.sow("intermediates", "pool", x)
        dense = nn.Dense(
            self.num_classes,
            kernel_init=xavier_uniform,
            bias_init=torch_bias_init(x.shape[-1]),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dense",
        )
        return dense(x.astype(self.dtype or x.dtype)).astype(wide)


def init_variables(model: ResNet18, rng: jax.Array, image_size: int = 96) -> dict:
    """Fresh {'params', 'batch_stats'} for ``model`` (PyTorch's initial state, in distribution)."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
    dummy = jnp.zeros((1, image_size, image_size, model.input_channels), jnp.float32)
    return dict(model.init(rng, dummy, train=False))


def count_params(tree) -> int:
    """Number of scalars in a pytree (e.g. variables['params'])."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
