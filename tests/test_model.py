"""The modules against the chapter: output shapes, parameter counts, BatchNorm semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import BatchNorm, Residual, ResNet18, count_params, init_variables, ops, resnet_block
from resnet_jax.data import preprocess
from resnet_jax.model import BN_EPSILON, BN_MOMENTUM, Conv2d


def test_residual_keeps_shape():
    blk = Residual(3)
    x = jax.random.uniform(jax.random.key(0), (4, 6, 6, 3))
    v = blk.init(jax.random.key(1), x, train=False)
    assert blk.apply(v, x, train=False).shape == (4, 6, 6, 3)
    assert "conv3" not in v["params"]


def test_residual_1x1conv_stride2_halves_and_widens():
    blk = Residual(6, use_1x1conv=True, strides=2)
    x = jax.random.uniform(jax.random.key(0), (4, 6, 6, 3))
    v = blk.init(jax.random.key(1), x, train=False)
    assert blk.apply(v, x, train=False).shape == (4, 3, 3, 6)
    assert v["params"]["conv3"]["kernel"].shape == (1, 1, 3, 6)


def test_the_chapters_residual_3_3_is_refused_not_built_with_a_1x1_conv():
    # The chapter checks Residual(3, 3); here the second argument is use_1x1conv, and 3 built
    # a block with a shortcut conv and the same output shape.
    x = jnp.ones((1, 6, 6, 3))
    with pytest.raises(TypeError, match=r"use_1x1conv must be True or False, got 3; the chapter's "
                                        r"Residual\(input_channels, num_channels, ...\) is Residual\(num_channels, ...\)"):
        Residual(3, 3).init(jax.random.key(0), x, train=False)
    assert "conv3" in Residual(3, np.bool_(True)).init(jax.random.key(0), x, train=False)["params"]


def test_the_class_count_may_be_any_integer_scalar():
    # labels.max() + 1 is a NumPy or JAX integer; a float or a bool is refused (test below).
    for n in (np.int64(5), jnp.int32(5)):
        variables = ResNet18(num_classes=n).init(jax.random.key(0), jnp.zeros((1, 17, 17, 1)))
        assert variables["params"]["dense"]["bias"].shape == (5,)


def test_numpys_float64_input_is_taken_as_float32_without_a_warning():
    import warnings

    x = np.random.default_rng(0).random((2, 17, 17, 1))  # NumPy's default dtype
    net = ResNet18()
    v = init_variables(net, jax.random.key(0), image_size=17)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX warned "Explicitly requested dtype float64" in each layer
        out = net.apply(v, x, train=False)
        np.testing.assert_array_equal(out, net.apply(v, jnp.asarray(x, jnp.float32), train=False))
        blk = Residual(1)
        y = blk.apply(blk.init(jax.random.key(1), x, train=False), x, train=False)
    assert out.dtype == y.dtype == jnp.float32


def test_a_stage_is_the_chapters_sequential_of_residuals_with_train_threaded_through():
    from resnet_jax import Stage

    stage = Stage(3, 6, 2)  # a later stage: the first residual halves and widens
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    v = stage.init(jax.random.key(1), x, train=False)
    assert sorted(v["params"]) == ["Residual_0", "Residual_1"]
    y, updates = stage.apply(v, x, train=True, mutable=["batch_stats"])
    assert y.shape == (4, 4, 4, 6)
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], updates["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))  # both residuals ran in train mode


def test_resnet_block_rule():
    first = resnet_block(64, 64, 2, first_block=True)
    later = resnet_block(64, 128, 2)
    assert [(r.use_1x1conv, r.strides) for r in first] == [(False, 1), (False, 1)]
    assert [(r.use_1x1conv, r.strides, r.num_channels) for r in later] == [(True, 2, 128), (False, 1, 128)]


def test_chapter_shape_table():
    """The chapter's table for one 224x224 single-channel image."""
    net = ResNet18()
    x = jax.random.uniform(jax.random.key(0), (1, 224, 224, 1))
    v = net.init(jax.random.key(1), x)
    logits, state = net.apply(
        v, x, capture_intermediates=lambda m, _: m.name in {"b1", "b2", "b3", "b4", "b5"}, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    shapes = {k: inter[k]["__call__"][0].shape for k in ("b1", "b2", "b3", "b4", "b5")}
    assert shapes == {
        "b1": (1, 56, 56, 64),
        "b2": (1, 56, 56, 64),
        "b3": (1, 28, 28, 128),
        "b4": (1, 14, 14, 256),
        "b5": (1, 7, 7, 512),
    }
    assert inter["pool"][0].shape == (1, 512)
    assert logits.shape == (1, 10)


def test_parameter_and_batchnorm_counts_match_pytorch():
    v = init_variables(ResNet18(), jax.random.key(0), image_size=28)
    assert count_params(v["params"]) == 11_178_378
    assert count_params(v["batch_stats"]) == 7_808
    # Every conv keeps its bias, as nn.Conv2d(bias=True) does.
    convs = [p for p, _ in jax.tree_util.tree_leaves_with_path(v["params"]) if "kernel" in jax.tree_util.keystr(p)]
    biases = [p for p, _ in jax.tree_util.tree_leaves_with_path(v["params"]) if "conv" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p)]
    assert len(convs) == 21 and len(biases) == 20  # 20 convs + 1 dense kernel; 20 conv biases


@pytest.mark.parametrize("channels,classes", [(3, 100), (1, 2)])
def test_channels_and_classes_are_parameters(channels, classes):
    net = ResNet18(num_classes=classes, input_channels=channels)
    v = init_variables(net, jax.random.key(0), image_size=32)
    assert v["params"]["b1"]["conv"]["kernel"].shape == (7, 7, channels, 64)
    assert net.apply(v, jnp.ones((2, 32, 32, channels))).shape == (2, classes)
    with pytest.raises(ValueError, match=f"{channels} channel"):
        net.apply(v, jnp.ones((2, 32, 32, channels + 1)))


def _bn_problem(seed: int, shape: tuple):
    """A float64 BatchNorm problem (call under jax.enable_x64): x with a large mean against a small
    spread (where an uncentred formula cancels), scale, bias, and cotangents for its three outputs."""
    k = jax.random.split(jax.random.key(seed), 6)
    normal = lambda key, shp: jax.random.normal(key, shp, jnp.float64)
    c = shape[-1]
    x = 3.0 + 0.1 * normal(k[0], shape)
    return x, normal(k[1], (c,)), normal(k[2], (c,)), (normal(k[3], shape), normal(k[4], (c,)), normal(k[5], (c,)))


def test_masked_batch_norm_is_batch_norm_of_the_valid_examples_alone_in_float64():
    # fit's padded last batch: statistics, outputs of the valid examples, every gradient (the
    # padding's included: zero) equal those of the valid examples as a batch of their own.
    from resnet_jax.model import batch_norm_train

    with jax.enable_x64(True):
        x, scale, bias, (dy, *cots) = _bn_problem(1, (6, 5, 5, 4))
        mask = np.array([True, True, False, True, False, False])
        masked = lambda x, s, b: batch_norm_train(x, s, b, BN_EPSILON, jnp.asarray(mask))
        alone = lambda x, s, b: batch_norm_train(x[mask], s, b, BN_EPSILON)
        outs, vjp = jax.vjp(masked, x, scale, bias)
        ref_outs, ref_vjp = jax.vjp(alone, x, scale, bias)
        np.testing.assert_allclose(outs[0][mask], ref_outs[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(outs[0][~mask], 0.0)  # the padding's outputs: zeros
        for a, b in zip(outs[1:], ref_outs[1:]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        # Cotangents on the padding's outputs too (dy): those outputs are constants, so nothing flows back.
        got, want = vjp((dy, *cots)), ref_vjp((dy[mask], *cots))
        np.testing.assert_array_equal(got[0][~mask], 0.0)  # no gradient into the padding
        for a, b in zip(got, want):  # the reference's x gradient is zero off the mask too
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # The module: the running variance moves by the valid examples' unbiased variance.
    bn = BatchNorm()
    v = bn.init(jax.random.key(1), x.astype(jnp.float32), train=False)
    _, upd = bn.apply(v, x.astype(jnp.float32), train=True, mask=jnp.asarray(mask), mutable=["batch_stats"])
    _, ref = bn.apply(v, x.astype(jnp.float32)[mask], train=True, mutable=["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_mask_with_no_valid_example_leaves_the_running_statistics_as_they_were():
    # Statistics of nothing (zeros) moved the running averages 10% toward 0.
    bn = BatchNorm()
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 2.0 + 1.5
    v = bn.init(jax.random.key(1), x, train=False)
    v = {"params": v["params"], "batch_stats": {"mean": jnp.array([0.3, -0.2, 1.0]), "var": jnp.array([2.0, 0.5, 1.0])}}
    y, upd = bn.apply(v, x, train=True, mask=jnp.zeros(4, bool), mutable=["batch_stats"])
    np.testing.assert_array_equal(y, 0.0)
    for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]), jax.tree_util.tree_leaves(v["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    _, one = bn.apply(v, x, train=True, mask=jnp.array([False, True, False, False]), mutable=["batch_stats"])
    assert not np.array_equal(one["batch_stats"]["mean"], v["batch_stats"]["mean"])  # one valid example moves them


def test_batchnorm_train_moves_stats_by_pytorch_momentum_rule():
    bn = BatchNorm()
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 2.0 + 1.5
    v = bn.init(jax.random.key(1), x, train=False)
    stats = {"mean": jnp.array([0.3, -0.2, 1.0]), "var": jnp.array([2.0, 0.5, 1.0])}
    v = {"params": v["params"], "batch_stats": stats}
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64).reshape(-1, 3)
    n = xn.shape[0]
    mean, var = xn.mean(0), xn.var(0)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * np.asarray(stats["mean"]) + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], 0.9 * np.asarray(stats["var"]) + 0.1 * var * n / (n - 1), rtol=1e-5
    )
    # Train mode normalises with the batch's biased variance.
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, 3), (xn - mean) / np.sqrt(var + BN_EPSILON), rtol=1e-4, atol=1e-5
    )
    assert BN_MOMENTUM == 0.1 and BN_EPSILON == 1e-5


def test_batchnorm_eval_uses_running_stats_and_changes_nothing():
    bn = BatchNorm()
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    v = bn.init(jax.random.key(1), x, train=False)
    v = {"params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
         "batch_stats": {"mean": jnp.array([0.3, -0.2, 1.0]), "var": jnp.array([2.0, 0.5, 1.0])}}
    y1, upd = bn.apply(v, x, train=False, mutable=["batch_stats"])
    y2 = bn.apply(v, x, train=False)
    np.testing.assert_array_equal(y1, y2)
    for k in ("mean", "var"):
        np.testing.assert_array_equal(upd["batch_stats"][k], v["batch_stats"][k])
    expect = (np.asarray(x) - v["batch_stats"]["mean"]) / np.sqrt(v["batch_stats"]["var"] + 1e-5)
    np.testing.assert_allclose(y1, expect * v["params"]["scale"] + v["params"]["bias"], rtol=1e-5, atol=1e-6)


def test_resnet_eval_mode_is_deterministic_and_train_mode_updates_all_stats():
    net = ResNet18()
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 1))
    v = init_variables(net, jax.random.key(1), image_size=32)
    a, b = net.apply(v, x), net.apply(v, x)
    np.testing.assert_array_equal(a, b)
    _, upd = net.apply(v, x, train=True, mutable=["batch_stats"])
    moved = jax.tree_util.tree_map(lambda o, n: bool(jnp.any(o != n)), v["batch_stats"], upd["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))


def test_padding_is_symmetric_like_pytorch():
    """A 'SAME'-padded port would shift b1's output on even inputs; ours pads (3, 3)."""
    net = ResNet18()
    v = init_variables(net, jax.random.key(0), image_size=96)
    conv = v["params"]["b1"]["conv"]
    x = jax.random.uniform(jax.random.key(1), (2, 96, 96, 1))
    _, st = net.apply(v, x, capture_intermediates=lambda m, _: m.name == "conv", mutable=["intermediates"])
    ours = st["intermediates"]["b1"]["conv"]["__call__"][0]
    ref = jax.lax.conv_general_dilated(
        x, conv["kernel"], (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + conv["bias"]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def _batch_norm_by_autodiff(x, scale, bias, eps):
    """The textbook forward, differentiated by JAX: what batch_norm_train's closed-form VJP must equal."""
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    return (x - mean) * (scale * jax.lax.rsqrt(var + eps)) + bias, mean, var


def test_batch_norm_closed_form_gradient_equals_autodiff_in_float64():
    from resnet_jax.model import batch_norm_train

    with jax.enable_x64(True):
        # Cotangents for all three outputs, so the mean's and variance's own terms are checked too.
        x, scale, bias, cots = _bn_problem(0, (4, 5, 5, 6))
        outs, vjp = jax.vjp(lambda *a: batch_norm_train(*a, BN_EPSILON), x, scale, bias)
        ref_outs, ref_vjp = jax.vjp(lambda *a: _batch_norm_by_autodiff(*a, BN_EPSILON), x, scale, bias)
        for a, b in zip(outs, ref_outs):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(vjp(cots), ref_vjp(cots)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(b))))


def test_the_package_lists_its_lazy_names():
    import resnet_jax

    assert {"ResNet18", "Residual", "Stage", "resnet_block"} <= set(dir(resnet_jax))
    assert all(getattr(resnet_jax, name) is not None for name in resnet_jax.__all__)


@pytest.mark.parametrize("field", ["kernel_size", "strides", "padding"])
def test_conv2d_refuses_non_square_settings_with_a_clear_message(field):
    settings = {"features": 4, "kernel_size": 3, "strides": 1, "padding": 1, field: (3, 3)}
    with pytest.raises(TypeError, match=f"Conv2d.{field} must be an int"):
        Conv2d(**settings).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def _init(module, shape, dtype=jnp.float32, *args):
    return module.init(jax.random.key(0), jnp.zeros(shape, dtype), *args)


def _params_alone(train: bool):
    net = ResNet18()
    variables = init_variables(net, jax.random.key(0), 28)
    x = jnp.zeros((2, 28, 28, 1))
    return net.apply({"params": variables["params"]}, x, train=train, mutable=["batch_stats"] if train else False)


@pytest.mark.parametrize("build, error, message", [
    (lambda: _init(ResNet18(num_classes=0), (1, 28, 28, 1)), ValueError, "ResNet18.num_classes must be >= 1, got 0"),
    (lambda: _init(ResNet18(input_channels=0), (1, 28, 28, 0)), ValueError, "ResNet18.input_channels must be >= 1, got 0"),
    (lambda: init_variables(ResNet18(), jax.random.key(0), 0), ValueError, "image_size must be an integer >= 1, got 0"),
    (lambda: init_variables(ResNet18(), jax.random.key(0), 28.0), ValueError, "image_size must be an integer >= 1, got 28.0"),
    (lambda: ResNet18().init(jax.random.key(0), jnp.zeros((0, 28, 28, 1)), train=True), ValueError,
     "BatchNorm in train mode needs at least one value per channel, got shape (0, 14, 14, 64)"),
    (lambda: _init(ResNet18(dtype=jnp.int8), (1, 28, 28, 1)), TypeError,
     "ResNet18.dtype is what the layers compute in: a float dtype, got int8"),
    (lambda: ResNet18().init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=True, mask=jnp.ones((2, 1), bool)),
     ValueError, "ResNet18's mask has one boolean per image, shape (2,); got (2, 1)"),
    # A float or int mask weighed the examples: BatchNorm's mean with 0.5s was twice the boolean one's.
    (lambda: ResNet18().init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=True, mask=jnp.full((2,), 0.5)),
     TypeError, "ResNet18's mask selects images: booleans, not float32"),
    (lambda: ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2)), strides=(2, 2)),
     TypeError, "conv2d's strides is one int (square, as every conv of the chapter), got (2, 2)"),
    (lambda: preprocess(jnp.zeros((1, 28, 28, 1), jnp.uint8), 0), ValueError,
     "preprocess resizes to a positive integer size, got 0"),
    (lambda: ResNet18().init(jax.random.key(0), [[0.0]]), TypeError, "ResNet18 takes an array (N, H, W, C), got a list"),
    (lambda: _init(ResNet18(), (28, 28, 1)), ValueError, "ResNet18 expects NHWC input (N, H, W, C), got shape (28, 28, 1)"),
    (lambda: _init(ResNet18(), (2, 1, 28, 28)), ValueError, "ResNet18 expects NHWC images with 1 channel(s), got shape (2, 1, 28, 28)"),
    # Residual computed in uint8 (its input's dtype) would round every weight to 0, silently.
    (lambda: _init(Residual(64), (1, 8, 8, 64), jnp.uint8, False), TypeError, "Residual takes float input, got uint8"),
    # So would the building blocks on their own, and any block given an integer dtype.
    (lambda: _init(Residual(64, dtype=jnp.int32), (1, 8, 8, 64), jnp.float32, False), TypeError,
     "Residual.dtype is what the layers compute in: a float dtype, got int32"),
    (lambda: _init(Conv2d(3, 3, padding=1), (1, 8, 8, 4), jnp.uint8), TypeError, "Conv2d takes float input, got uint8"),
    (lambda: _init(BatchNorm(), (1, 8, 8, 4), jnp.uint8, False), TypeError, "BatchNorm takes float input, got uint8"),
    (lambda: _init(Conv2d(3, 3, dtype=jnp.int32), (1, 8, 8, 4)), TypeError,
     "Conv2d.dtype is what the layers compute in: a float dtype, got int32"),
    (lambda: _init(ResNet18(num_classes=10.0), (1, 28, 28, 1)), TypeError, "ResNet18.num_classes must be an int, got 10.0"),
    # A kernel larger than the padded input: no output (XLA's lowering) or NumPy's error (patches).
    (lambda: _init(Conv2d(3, 9), (1, 8, 8, 4)), ValueError,
     "conv2d: a 9x9 kernel does not fit the 8x8 input padded by 0 on each side: the output would be empty"),
    (lambda: _init(Residual(64), (1, 64, 8, 8), jnp.float32, False), ValueError,
     "Residual(64) without use_1x1conv adds its input to its output, so the input needs 64 channels, last (NHWC)"),
    (lambda: _init(Residual(64, strides=2), (1, 8, 8, 64), jnp.float32, False), ValueError,
     "Residual(strides=2) needs use_1x1conv=True"),
    (lambda: resnet_block(64, 128, -1), ValueError, "num_residuals must be >= 0, got -1"),
    # The params alone in train mode: Flax made fresh statistics (mean 0, var 1) and went on.
    (lambda: _params_alone(train=True), ValueError, "BatchNorm has no running statistics: apply the model to {'params'"),
    (lambda: _params_alone(train=False), ValueError, "BatchNorm has no running statistics: apply the model to {'params'"),
    # train=True without mutable: Flax's ModifyScopeVariableError said "collection is immutable", not what to pass.
    (lambda: ResNet18().apply(init_variables(ResNet18(), jax.random.key(0), 28), jnp.zeros((2, 28, 28, 1)), train=True),
     ValueError, "BatchNorm with train=True moves its running statistics: apply with mutable=['batch_stats']"),
])
def test_impossible_modules_and_inputs_are_named(build, error, message):
    with pytest.raises(error) as caught:
        build()
    assert message in str(caught.value)


@pytest.mark.parametrize("who, build", [
    ("ResNet18", lambda x: ResNet18().init(jax.random.key(0), x)),
    ("BatchNorm", lambda x: BatchNorm().init(jax.random.key(0), x, False)),
    ("Conv2d", lambda x: Conv2d(3, 3).init(jax.random.key(0), x)),
])
def test_a_torch_batch_is_refused_with_how_to_pass_it(who, build):
    # The README's PyTorch example has x = torch.rand(8, 1, 96, 96) at hand: passed as it is,
    # JAX's dtype check said "Cannot interpret 'torch.float32' as a data type".
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError) as caught:
        build(torch.zeros(2, 1, 28, 28))
    assert str(caught.value).startswith(f"{who} takes a NumPy or JAX array (N, H, W, C), got a torch tensor "
                                        "of shape (2, 1, 28, 28)")
    assert "x.permute(0, 2, 3, 1).numpy()" in str(caught.value)


@pytest.mark.parametrize("field, value, message", [
    ("features", 0, "Conv2d.features must be >= 1, got 0"),
    ("strides", 0, "Conv2d.strides must be >= 1, got 0"),
    ("kernel_size", 0, "Conv2d.kernel_size must be >= 1, got 0"),
    ("padding", -1, "Conv2d.padding must be >= 0, got -1"),
])
def test_conv2d_refuses_impossible_sizes(field, value, message):
    from resnet_jax.model import Conv2d

    settings = {"features": 4, "kernel_size": 3, "strides": 1, "padding": 1, field: value}
    with pytest.raises(ValueError, match=message):
        Conv2d(**settings).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_forward_mode_autodiff_goes_through_the_eval_model_with_xla_lowerings():
    # As the ResNet18 docstring says: the custom-VJP max-pool (CPU) refuses jvp; conv_impl="xla" does not.
    x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1)), jnp.float32)
    t = jnp.ones_like(x)
    net = ResNet18(conv_impl="xla")
    variables = init_variables(net, jax.random.key(0), 28)
    f = lambda x: net.apply(variables, x, train=False)
    logits, tangent = jax.jvp(f, (x,), (t,))
    # The adjoint identity u . (J t) = (J^T u) . t, with reverse mode's J^T u: exact up to rounding,
    # where a finite difference straddles ReLU and max-pool kinks (it failed under another init).
    u = jnp.asarray(np.random.default_rng(1).standard_normal(logits.shape), jnp.float32)
    (back,) = jax.vjp(f, x)[1](u)
    np.testing.assert_allclose(jnp.vdot(u, tangent), jnp.vdot(back, t), rtol=1e-4)
    assert float(jnp.abs(tangent).max()) > 0
    if jax.default_backend() == "cpu":
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jvp(lambda x: ResNet18().apply(variables, x, train=False), (x,), (t,))


def test_a_stage_refuses_the_channel_counts_the_chapters_resnet_block_refuses():
    # Flax infers a convolution's input channels: Stage(999, 128) ran on 64 channels, where the
    # chapter's Conv2d(999, 128, ...) fails. With first_block the chapter ignores input_channels.
    from resnet_jax.model import Stage

    x = jnp.zeros((1, 8, 8, 64))
    with pytest.raises(ValueError, match=r"Stage\(999, 128, first_block=False\) takes 999 input channels"):
        Stage(999, 128).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="takes 128 input channels"):
        Stage(64, 128, first_block=True).init(jax.random.key(0), x, False)
    assert Stage(64, 128).apply(Stage(64, 128).init(jax.random.key(0), x, False), x, False).shape == (1, 4, 4, 128)
    assert Stage(999, 64, first_block=True).init(jax.random.key(0), x, False)
