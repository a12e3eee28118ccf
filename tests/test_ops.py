"""The convolution lowerings compute exactly the plain convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import ops

# Every (map size, kernel, stride, padding) the network meets at 28x28 and 96x96, plus odd ones.
CASES = [
    ((2, 1, 1, 32), 3, 1, 1),  # b5 at 28x28: 1x1 map, only the centre tap is live
    ((2, 2, 2, 32), 3, 2, 1),  # b5's strided conv at 28x28
    ((2, 2, 2, 16), 1, 2, 0),  # a 1x1 strided shortcut
    ((2, 2, 2, 32), 3, 1, 1),
    ((2, 3, 3, 16), 3, 1, 1),  # b5 at 96x96
    ((2, 4, 4, 16), 3, 2, 1),
    ((2, 7, 7, 8), 3, 1, 1),
    ((2, 9, 9, 3), 7, 2, 3),  # the stem on an odd map
    ((1, 5, 5, 2), 3, 2, 0),
]


@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_patches_equals_xla_conv(shape, k, s, p):
    kx, kw = jax.random.split(jax.random.key(hash((shape, k, s, p)) % 2**31))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (k, k, shape[-1], 24))
    ref = ops.conv2d(x, w, strides=s, padding=p, impl="xla")
    out = ops.conv2d(x, w, strides=s, padding=p, impl="patches")
    assert out.shape == ref.shape == (shape[0], ops.output_size(shape[1], k, s, p), ops.output_size(shape[2], k, s, p), 24)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_auto_matches_both_and_gradients_agree():
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 8))
    f = lambda impl: lambda x, w: jnp.sum(jnp.sin(ops.conv2d(x, w, strides=1, padding=1, impl=impl)))
    for impl in ("auto", "patches"):
        gx, gw = jax.grad(f(impl), argnums=(0, 1))(x, w)
        rx, rw = jax.grad(f("xla"), argnums=(0, 1))(x, w)
        # float32 sums in another order: agree to 1e-5 of the tensor's scale.
        np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(rx))))
        np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(rw))))


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="conv impl"):
        ops.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((1, 1, 1, 1)), impl="fft")


@pytest.mark.parametrize("impl", ["xla", "slices"])
@pytest.mark.parametrize("args", [(2,), (3,), (3, 2, 1), (3, 1, 1), (2, 1), (np.int64(3), np.int32(2), np.int64(1))])
def test_max_pool_takes_torch_max_pool2d_arguments_and_defaults(impl, args):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
    want = torch.nn.MaxPool2d(*args)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ops.max_pool(jnp.asarray(x), *args, impl=impl), want)


@pytest.mark.parametrize("args, message", [((3, 2, 2), "at most half the window"), ((2, 2, 2), "at most half"),
                                           ((0,), "window must be an int >= 1"), ((3, 0), "stride must be"),
                                           ((3, 2, -1), "padding must be an int >= 0"), ((3.0,), "window must be"),
                                           ((7,), "7x7 window does not fit in the 6x6 map padded by 0")])
def test_max_pool_refuses_what_torch_refuses(args, message):
    # A padding over half the window made whole windows of padding: rows of -inf, silently.
    with pytest.raises(ValueError, match=message):
        ops.max_pool(jnp.ones((1, 6, 6, 1)), *args)


@pytest.mark.parametrize("shape", [(4, 14, 14, 8), (2, 48, 48, 4), (3, 7, 6, 2)])
def test_slice_max_pool_equals_reduce_window_with_first_max_gradient(shape):
    y = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    y = jnp.round(y * 4) / 4  # many ties: the gradient must still go to the first maximum only
    a, b = ops.max_pool(y, 3, 2, 1, impl="xla"), ops.max_pool(y, 3, 2, 1, impl="slices")
    np.testing.assert_array_equal(a, b)
    g = jax.random.normal(jax.random.key(1), a.shape)
    ga = jax.grad(lambda y: jnp.sum(ops.max_pool(y, 3, 2, 1, impl="xla") * g))(y)
    gb = jax.grad(lambda y: jnp.sum(ops.max_pool(y, 3, 2, 1, impl="slices") * g))(y)
    # Equal but for the order of sums where windows overlap.
    np.testing.assert_allclose(gb, ga, rtol=0, atol=1e-6)
    # Each window's gradient lands on exactly one position: the totals agree exactly per window count.
    np.testing.assert_allclose(float(jnp.sum(gb)), float(jnp.sum(g)), rtol=1e-5)


@pytest.mark.parametrize(
    "hw,k,s,p,want",
    [
        ((1, 1), 3, 1, 1, True),  # b5 at 28x28
        ((2, 2), 3, 1, 1, True),
        ((2, 2), 3, 2, 1, True),
        ((4, 4), 3, 2, 1, True),  # 2x2 output
        ((4, 4), 3, 1, 1, False),  # 4x4 output: XLA's convolution is faster
        ((3, 3), 3, 1, 1, False),  # b5 at 96x96
        ((2, 2), 1, 2, 0, False),  # a 1x1 conv is one matmul either way
        ((24, 24), 3, 1, 1, False),
    ],
)
def test_cpu_lowering_rule(hw, k, s, p, want):
    assert ops.cpu_prefers_patches(hw, k, s, p) is want


def test_a_jaxlib_without_the_cpu_options_keeps_its_defaults_and_says_so(monkeypatch):
    # The option is experimental: a jaxlib that renamed it lost the faster kernels without a word.
    monkeypatch.setattr(ops, "_CPU_OPTIONS", {"xla_cpu_no_such_option_for_the_test": "1"})
    with pytest.warns(RuntimeWarning, match="this jaxlib does not take resnet_jax's XLA:CPU options"):
        assert ops.compiler_options.__wrapped__("cpu") is None


def test_cpu_compiler_options_keep_convolutions_out_of_ynnpack():
    opts = ops.compiler_options("cpu")
    assert ops.compiler_options("gpu") is None and ops.compiler_options("tpu") is None
    if opts is None:
        pytest.skip("this jaxlib does not know xla_cpu_experimental_ynn_fusion_type")
    x, w = jnp.ones((2, 6, 6, 8)), jnp.ones((3, 3, 8, 8))
    f = lambda x, w: ops.conv2d(x, w, strides=1, padding=1, impl="xla")

    with_opts = jax.jit(f, compiler_options=opts).lower(x, w).compile().as_text()
    # The program is one convolution: with the options it is XLA's own, not a YNNPACK fusion.
    assert " convolution(" in with_opts and "__ynn_fusion" not in with_opts
    # Same numbers as the default program.
    np.testing.assert_allclose(jax.jit(f, compiler_options=opts)(x, w), jax.jit(f)(x, w), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_materialize_is_the_identity_bit_for_bit(dtype):
    # Normal numbers only: XLA:CPU flushes subnormals to zero in every arithmetic op
    # (the ReLU's max included), so a ReLU output holds none for x / 1 to flush.
    x = jnp.array([[0.0, -0.0, 1.5, -3.25], [jnp.inf, -jnp.inf, jnp.nan, 1e-30]], dtype)
    for anchor in (jnp.array([0.7, 2.0]), jnp.array([-jnp.inf]), jnp.array([jnp.nan]), jnp.zeros((2, 2))):
        y = jax.jit(ops.materialize)(x, anchor)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(
            np.asarray(y).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
            np.asarray(x).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
        )
    g = jax.random.normal(jax.random.key(0), x.shape, dtype)
    _, vjp = jax.vjp(lambda x: ops.materialize(x, jnp.ones(3)), x)
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_materialize_survives_xla_cpu_as_a_division():
    # The speed trick only works while XLA keeps a full-size division at each
    # stored activation of the real training step (17 in the forward, one per
    # ReLU, and as many in the backward). If this fails, the step is still exact but
    # slower: re-measure benchmarks/cpu_step.py and revisit ops.materialize.
    if jax.default_backend() != "cpu":
        pytest.skip("materialize is the identity off CPU")
    import re

    from resnet_jax import training
    from resnet_jax.config import Config

    cfg = Config(resize=28, batch_size=2)
    state = training.create_train_state(training.make_model(cfg), training.make_optimizer(cfg), jax.random.key(0))
    images, labels = jnp.zeros((2, 28, 28, 1), jnp.uint8), jnp.zeros((2,), jnp.int32)
    hlo = training.jit(training.train_step, static_argnums=3).lower(state, images, labels, 28).compile().as_text()
    full_size_divides = re.findall(r"= f32\[2,\d+,\d+,\d+\]\{[\d,]+\} divide\(", hlo)
    assert len(full_size_divides) >= 17, len(full_size_divides)


def test_the_lowerings_follow_the_devices_a_program_runs_on_not_the_default_backend(monkeypatch):
    # fit(devices=jax.devices("cpu")) on a GPU host: its programs run on the CPU and must get the
    # CPU's lowerings. Here the host is made to look like a GPU host by its default backend.
    from resnet_jax import training

    x, w = jnp.ones((2, 2, 2, 32)), jnp.ones((3, 3, 32, 8))
    conv = lambda x, w: ops.conv2d(x, w, strides=1, padding=1)  # a 2x2 output: patches on CPU
    cpu_hlo = training.jit(conv, jax.devices("cpu")).lower(x, w).as_text()
    assert "convolution" not in cpu_hlo and "dot_general" in cpu_hlo
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert training.jit(conv, jax.devices("cpu")).lower(x, w).as_text() == cpu_hlo
    assert "convolution" in jax.jit(conv).lower(x, w).as_text()  # a plain jax.jit: the default backend's
    with ops.targeting("cpu"):
        assert ops.target_platform() == "cpu"
    assert ops.target_platform() == "gpu"
    # The program keeps the name of what it runs (profiles and the compile cache go by it), partials included.
    import functools

    named = training.jit(functools.partial(ops.conv2d, strides=1, padding=1), jax.devices("cpu"))
    assert "@jit_conv2d" in named.lower(x, w).as_text()
