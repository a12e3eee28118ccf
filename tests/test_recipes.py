"""The recipe's pure pieces: presets, weight-decay mask, schedules, loss, EMA rule, flip averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import recipes
from resnet_jax.model import ResNet18, init_variables
from resnet_jax.recipes import BEST, D2L, Recipe


@pytest.fixture(scope="module")
def variables():
    return init_variables(ResNet18(), jax.random.key(0), image_size=24)


def test_d2l_preset_is_the_chapter():
    assert D2L == Recipe() and not D2L.augments
    assert recipes.resolve("d2l") == (D2L, {"epochs": 10, "batch_size": 256, "lr": 0.05, "resize": 96})
    # d2l keeps lr 0.05 whatever the batch, as the program always did.
    assert recipes.resolve("d2l", batch_size=128)[1]["lr"] == 0.05
    # The optimizer is plain SGD with a constant lr: the same transformation as optax.sgd(0.05).
    tx = recipes.sgd(D2L, 0.05, 10, 2)
    g = {"w": jnp.array([1.0, -2.0])}
    upd, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_array_equal(upd["w"], optax.sgd(0.05).update(g, optax.sgd(0.05).init(g), g)[0]["w"])


def test_resolve_scales_lr_and_applies_overrides():
    r, run = recipes.resolve("best", {"ema_decay": 0.0, "flip": None}, batch_size=256)
    assert r.ema_decay == 0.0 and r.flip is True and r.name == "best"
    assert run["lr"] == pytest.approx(0.4 * 256 / 512)
    assert recipes.resolve("best", batch_size=256, lr=0.3)[1]["lr"] == 0.3


@pytest.mark.parametrize("change, flag", [
    (dict(momentum=1.0), "--momentum"), (dict(momentum=0.0, nesterov=True), "--nesterov"),
    (dict(weight_decay=-1e-4), "--weight-decay"), (dict(weight_decay=1e39), "--weight-decay"),  # inf in float32
    (dict(schedule="step"), "--schedule"),
    (dict(warmup_epochs=float("nan")), "--warmup-epochs"), (dict(label_smoothing=1.0), "--label-smoothing"),
    (dict(ema_decay=1.0), "--ema-decay"), (dict(crop_pad=-1), "--crop-pad"), (dict(erase_prob=1.5), "--erase-prob"),
])
def test_problem_names_the_flag(change, flag):
    assert recipes.problem(BEST.replace(**change)).startswith(flag)
    assert recipes.problem(BEST) is None and recipes.problem(D2L) is None


def test_weight_decay_mask_excludes_batchnorm_and_biases(variables):
    params = variables["params"]
    mask = recipes.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = [k for k, m in flat.items() if m]
    assert decayed and all(k.endswith("['kernel']") for k in decayed)
    assert not any(m for k, m in flat.items() if k.endswith("['bias']") or k.endswith("['scale']"))
    # 20 convs (17 + 3 1x1 shortcuts) and the dense layer.
    assert len(decayed) == 21
    # And the optimizer applies it so: a zero gradient moves kernels only.
    tx = recipes.sgd(BEST.replace(momentum=0.0, nesterov=False, warmup_epochs=0, schedule="constant"), 1.0, 10, 1)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(upd), jax.tree_util.tree_leaves(params)):
        want = -5e-4 * p if flat[jax.tree_util.keystr(path)] else jnp.zeros_like(p)
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=0)


def test_nesterov_momentum_update():
    tx = recipes.sgd(Recipe(momentum=0.9, nesterov=True), 0.1, 10, 1)
    p = {"kernel": jnp.array([1.0])}
    g = {"kernel": jnp.array([2.0])}
    s = tx.init(p)
    u1, s = tx.update(g, s, p)
    u2, s = tx.update(g, s, p)
    # Nesterov (optax/PyTorch form): v <- 0.9 v + g; step = -lr (g + 0.9 v).
    np.testing.assert_allclose(u1["kernel"], [-0.1 * (2 + 0.9 * 2)], rtol=1e-6)
    np.testing.assert_allclose(u2["kernel"], [-0.1 * (2 + 0.9 * (0.9 * 2 + 2))], rtol=1e-6)


def test_schedule_values():
    # 10 steps per epoch, 4 epochs, 1 warmup epoch, peak 0.4.
    s = recipes.schedule(BEST, 0.4, 10, 4)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.2)
    assert float(s(10)) == pytest.approx(0.4)
    assert float(s(25)) == pytest.approx(0.2, rel=1e-5)  # half-way through the cosine
    assert float(s(40)) == pytest.approx(0.0, abs=1e-7)
    one = recipes.schedule(BEST.replace(schedule="onecycle"), 0.4, 10, 4)
    assert float(one(0)) == pytest.approx(0.4 / 25) and float(one(10)) == pytest.approx(0.4)
    assert float(one(40)) == pytest.approx(0.4 / 25e4, rel=1e-3)
    assert recipes.schedule(D2L, 0.05, 10, 4) == 0.05
    w = recipes.schedule(D2L.replace(warmup_epochs=0.5), 0.05, 10, 4)
    assert float(w(0)) == 0.0 and float(w(5)) == pytest.approx(0.05) and float(w(39)) == pytest.approx(0.05)


def test_label_smoothing_loss():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([0])
    logp = jax.nn.log_softmax(logits)[0]
    np.testing.assert_allclose(recipes.loss(logits, labels, 0.0), [-logp[0]], rtol=1e-6)
    # nn.CrossEntropyLoss(label_smoothing=a): (1 - a) * nll + a * mean over classes of -log p.
    a = 0.3
    np.testing.assert_allclose(recipes.loss(logits, labels, a), [-(1 - a) * logp[0] - a * logp.mean()], rtol=1e-6)


def test_ema_follows_its_update_rule():
    ema = {"w": jnp.array([0.0, 10.0])}
    new = {"w": jnp.array([1.0, 0.0])}
    for step, d in [(0, 0.1), (5, 6 / 15), (1000, 0.99)]:
        assert float(recipes.ema_decay_at(0.99, step)) == pytest.approx(d)
        out = recipes.ema_update(ema, new, 0.99, step)
        np.testing.assert_allclose(out["w"], d * ema["w"] + (1 - d) * new["w"], rtol=1e-6)
    # Iterated on a constant target, the EMA converges to it.
    e = ema
    for t in range(2000):
        e = recipes.ema_update(e, new, 0.99, t)
    np.testing.assert_allclose(e["w"], new["w"], atol=1e-6)


def test_flip_averaging(variables):
    net = ResNet18()
    x = jax.random.uniform(jax.random.key(1), (4, 24, 24, 1))
    plain = recipes.test_logits(net.apply, variables, x)
    both = recipes.test_logits(net.apply, variables, x, tta_flip=True)
    mirrored = net.apply(variables, x[:, :, ::-1], train=False)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    # Invariant to flipping the input, which plain logits are not.
    np.testing.assert_allclose(recipes.test_logits(net.apply, variables, x[:, :, ::-1], tta_flip=True), both, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, mirrored, atol=1e-4)
    # One pass over both views: the network appears once in the program, as without flips.
    convs = lambda tta: jax.jit(lambda v, x: recipes.test_logits(net.apply, v, x, tta_flip=tta)).lower(
        variables, x).as_text().count("stablehlo.convolution")
    assert convs(True) == convs(False) > 0
