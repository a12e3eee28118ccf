"""The pure steps and the loop, on small synthetic batches (28x28 or less)."""

import dataclasses
import functools
import operator
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import training
from resnet_jax.config import Config
from resnet_jax.data import Split, preprocess
from resnet_jax.model import ResNet18

RESIZE = 24


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, (n,)).astype(np.int32)


@pytest.fixture(scope="module")
def state():
    config = Config(resize=RESIZE)
    model = training.make_model(config)
    return training.create_train_state(model, training.make_optimizer(config), jax.random.key(0))


@pytest.mark.parametrize("recipe", ["d2l", "best"])
def test_a_fresh_state_is_built_by_one_program_with_the_values_of_op_by_op(recipe):
    # create_train_state jits the init (start-up time); the values must be those of Flax's init
    # run op by op, bit for bit, and every array its own buffer (the steps donate the state:
    # an EMA copy aliasing its parameter would be donated twice). Compiled once per model.
    from resnet_jax.recipes import BEST, D2L

    r = {"d2l": D2L, "best": BEST}[recipe]
    config = Config(resize=RESIZE, recipe=r)
    model, tx = training.make_model(config), training.make_optimizer(config, 4)
    jitted = training.create_train_state(model, tx, jax.random.key(3), recipe=r)
    eager = training.create_train_state(model, tx, jax.random.key(3), training.init_variables(model, jax.random.key(3)), r)
    leaves, ref = jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager) and len(leaves) > 100
    for a, b in zip(leaves, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    buffers = [a.unsafe_buffer_pointer() for a in leaves if isinstance(a, jax.Array)]
    assert len(set(buffers)) == len(buffers)
    assert training._jitted_init(training.make_model(config)) is training._jitted_init(model)


def test_make_model_takes_the_class_and_channel_counts_from_the_configs_dataset():
    # A config for CIFAR-10 must not give Fashion-MNIST's one-channel model (fit then refused its images).
    cifar = training.make_model(Config(dataset="cifar10"))
    assert (cifar.num_classes, cifar.input_channels) == (10, 3)
    fashion = training.make_model(Config())
    assert (fashion.num_classes, fashion.input_channels) == (10, 1)
    given = training.make_model(Config(dataset="cifar10"), num_classes=5, input_channels=1)
    assert (given.num_classes, given.input_channels) == (5, 1)


def test_update_is_params_minus_lr_times_grads(state):
    images, labels = _batch()
    new, metrics = jax.jit(training.train_step, static_argnums=3)(state, images, labels, RESIZE)

    def loss(params):
        logits, _ = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, preprocess(images, RESIZE), train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(training.cross_entropy(logits, labels))

    grads = jax.jit(jax.grad(loss))(state.params)
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(new.params),
        jax.tree_util.tree_leaves(state.params),
        jax.tree_util.tree_leaves(grads),
    )
    for (path, p_new), p_old, g in leaves:
        name = jax.tree_util.keystr(path)
        step = np.asarray(p_new, np.float64) - np.asarray(p_old, np.float64)
        want = -0.05 * np.asarray(g, np.float64)
        if name.endswith("['bias']") and ("['conv']" in name or "['conv1']" in name or "['conv2']" in name):
            # A conv bias in front of a train-mode BatchNorm: BN subtracts the batch mean,
            # so its gradient is zero in exact arithmetic (in PyTorch too); only float32
            # cancellation noise is left, far below the parameter's own scale.
            scale = np.linalg.norm(p_old)
            assert np.linalg.norm(step) < 1e-5 * scale and np.linalg.norm(want) < 1e-5 * scale, name
            continue
        rel = np.linalg.norm(step - want) / np.linalg.norm(want)
        assert rel < 1e-4, (name, rel)
    assert int(new.step) == 1
    assert int(metrics["count"]) == 16
    np.testing.assert_allclose(float(metrics["loss"]) / 16, float(loss(state.params)), rtol=1e-5)
    # batch_stats moved (train mode) and params changed.
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree_util.tree_leaves(new.batch_stats), jax.tree_util.tree_leaves(state.batch_stats)))


def test_steps_on_a_fixed_batch_lower_the_loss(state):
    # A learnable batch: the label is the brightness of the image.
    rng = np.random.default_rng(1)
    labels = np.tile(np.arange(10, dtype=np.int32), 4)
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 20, (40, 28, 28, 1)), 0, 255).astype(np.uint8)
    step = jax.jit(training.train_step, static_argnums=3)
    losses = []
    s = state
    for _ in range(10):
        s, m = step(s, images, labels, RESIZE)
        losses.append(float(m["loss"]) / 40)
    assert losses[-1] < 0.5 * losses[0], losses


def test_chunked_loop_equals_step_by_step(state):
    images, labels = _batch(48, seed=2)
    rows = jnp.arange(48).reshape(3, 16)
    chunk = jax.jit(functools.partial(training.train_chunk, resize=RESIZE))
    # Run only 2 of the 3 rows: the third must not be applied.
    s_chunk, sums = chunk(state, images, labels, rows, jnp.int32(2))
    s = state
    total = 0.0
    for r in range(2):
        s, m = jax.jit(training.train_step, static_argnums=3)(s, images[r * 16:(r + 1) * 16], labels[r * 16:(r + 1) * 16], RESIZE)
        total += float(m["loss"])
    assert int(s_chunk.step) == 2 and int(sums["count"]) == 32
    np.testing.assert_allclose(float(sums["loss"]), total, rtol=1e-5)
    # Two compiled programs, so float32 sums in other orders: per-tensor relative error.
    # 1e-4 leaves room for the rounding noise of the zero-gradient conv biases in
    # front of BatchNorm and still catches a wrongly applied third step (~1e-2).
    for a, b in zip(jax.tree_util.tree_leaves((s_chunk.params, s_chunk.batch_stats)), jax.tree_util.tree_leaves((s.params, s.batch_stats))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_a_constant_trip_count_runs_the_same_steps_bit_for_bit(state):
    # fit passes num_steps as a Python int when every chunk is full: XLA then knows the loop's
    # trip count (on a GPU, no read-back of the loop condition after each step). Same steps,
    # same order, same program body: the same bits.
    images, labels = _batch(32, seed=3)
    rows = jnp.arange(32).reshape(2, 16)
    traced = jax.jit(functools.partial(training.train_chunk, resize=RESIZE))(state, images, labels, rows, jnp.int32(2))
    static = jax.jit(functools.partial(training.train_chunk, num_steps=2, resize=RESIZE))(state, images, labels, rows)
    for a, b in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(static)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "while" in jax.jit(functools.partial(training.train_chunk, num_steps=2, resize=RESIZE)).lower(
        state, images, labels, rows).as_text()  # still a device loop, not 2 inlined steps


def test_fit_uses_the_constant_trip_count_when_the_chunks_divide_the_epoch(state):
    images, labels = _batch(72, seed=5)
    train, test = Split(images[:64], labels[:64]), Split(images[64:], labels[64:])
    runs = {}
    for k in (2, 3):  # 4 full batches of 16: K=2 divides them, K=3 leaves a partial chunk
        config = Config(epochs=1, batch_size=16, resize=RESIZE, steps_per_dispatch=k, eval_batch_size=8)
        runs[k] = training.fit(config, train, test, state).final
    assert runs[2]["static_trip_count"] and not runs[3]["static_trip_count"]
    assert runs[2]["steps_per_dispatch"] == 2 and runs[3]["steps_per_dispatch"] == 3
    np.testing.assert_allclose(runs[2]["train_loss"], runs[3]["train_loss"], rtol=1e-5)


def test_one_masked_program_and_two_programs_train_alike():
    # 70 = 4 x 16 + 6: five steps. One step per call (CPU's default) runs the full batches in a
    # program without the mask and the last in a masked one; K = 5 runs all five in one masked
    # program, with a constant trip count. The same steps on the same examples. In float64: in
    # float32 the two programs' summation orders alone move the loss by ~0.3% in five steps
    # (see tests/test_sharding.py on this network's amplification of rounding).
    images, labels = _batch(90, seed=9)
    train, test = Split(images[:70], labels[:70]), Split(images[70:], labels[70:])
    with jax.enable_x64(True):
        st = training.create_train_state(
            ResNet18(dtype=jnp.float64, param_dtype=jnp.float64), optax.sgd(0.05), jax.random.key(0))
        runs = {k: training.fit(Config(epochs=1, batch_size=16, resize=RESIZE, steps_per_dispatch=k, eval_batch_size=8),
                                train, test, st) for k in (1, 5)}
        assert sorted(runs[1].final["compile_s_by_program"]) == ["eval_test", "last_batch", "shuffle", "train"]
        assert sorted(runs[5].final["compile_s_by_program"]) == ["eval_test", "shuffle", "train"]
        assert runs[5].final["static_trip_count"] and int(runs[1].state.step) == int(runs[5].state.step) == 5
        np.testing.assert_allclose(runs[1].final["train_loss"], runs[5].final["train_loss"], rtol=1e-9)
        _assert_same_tree((runs[5].state.params, runs[5].state.batch_stats),
                          (runs[1].state.params, runs[1].state.batch_stats), rtol=1e-7)


@pytest.mark.parametrize("n,bs,k", [(1000, 64, 4), (256, 256, 32), (300, 256, 8), (100, 7, 3), (12, 32, 4)])
def test_epoch_plan_visits_every_example_once(n, bs, k):
    rows = np.asarray(training.epoch_plan(3, seed=0, n=n, batch_size=bs, chunk=k))
    steps = -(-n // bs)
    assert rows.shape == (-(-steps // k), k, bs)
    batches = rows.reshape(-1, bs)
    seen = batches[batches >= 0]
    assert sorted(seen.tolist()) == list(range(n))
    # Full batches first, then the smaller last one (its padding at the end), then nothing.
    valid = (batches >= 0).sum(1)
    assert valid[: n // bs].tolist() == [bs] * (n // bs)
    assert valid[n // bs :].tolist() == ([n % bs] if n % bs else []) + [0] * (len(valid) - steps)
    # Another epoch key, another order.
    assert not np.array_equal(rows, np.asarray(training.epoch_plan(4, seed=0, n=n, batch_size=bs, chunk=k)))


def _assert_same_tree(a, b, rtol):
    """Per tensor: |a - b| <= rtol |b| (norms), naming the first tensor that differs."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), jax.tree_util.keystr(path)


def test_a_padded_masked_batch_trains_as_the_smaller_batch_alone():
    # fit pads the epoch's last, smaller batch and masks it, so that one program runs every step.
    # The step must be the step on the valid examples alone: BatchNorm's statistics (and the
    # unbiased running variance, n = 5 * H * W), the mean loss, the gradients, the metrics.
    # float64, so that the two programs' different summation orders cannot hide a difference.
    with jax.enable_x64(True):
        st = training.create_train_state(
            ResNet18(dtype=jnp.float64, param_dtype=jnp.float64), optax.sgd(0.05), jax.random.key(0)
        )
        images, labels = _batch(8, seed=7)
        mask = np.array([True, False, True, True, False, True, True, False])
        step = jax.jit(training.train_step, static_argnums=3)
        padded, m_pad = step(st, images, labels, RESIZE, jnp.asarray(mask))
        alone, m_alone = step(st, images[mask], labels[mask], RESIZE)
        _assert_same_tree((padded.params, padded.batch_stats), (alone.params, alone.batch_stats), rtol=1e-9)
        assert int(m_pad["count"]) == 5 and int(m_pad["correct"]) == int(m_alone["correct"])
        np.testing.assert_allclose(float(m_pad["loss"]), float(m_alone["loss"]), rtol=1e-12)
        # Whatever class the step predicts for the padding, labelling the padding with it
        # changes nothing: padding never counts as correct (nor in the loss).
        for c in range(10):
            relabelled = np.where(mask, labels, c).astype(np.int32)
            _, m_c = step(st, images, relabelled, RESIZE, jnp.asarray(mask))
            assert int(m_c["correct"]) == int(m_alone["correct"]), c
            np.testing.assert_allclose(float(m_c["loss"]), float(m_alone["loss"]), rtol=1e-12)


def test_a_padded_masked_batch_is_the_smaller_batch_with_a_recipe_too():
    # --recipe best: augmentation, label smoothing, momentum, weight decay, EMA. The mask here
    # interleaves the padding, so the valid images' random draws (per position in the batch)
    # differ from those of the 5 alone: compare with augmentation off, everything else on.
    from resnet_jax.recipes import BEST

    recipe = dataclasses.replace(BEST, crop_pad=0, flip=False, erase_prob=0.0)
    config = Config(resize=RESIZE, recipe=recipe, lr=0.1, epochs=2)
    model = training.make_model(config)
    st = training.create_train_state(model, training.make_optimizer(config, 4), jax.random.key(0), recipe=recipe)
    images, labels = _batch(8, seed=8)
    mask = np.array([True, True, False, True, True, True, False, False])
    step = jax.jit(training.train_step, static_argnums=3)
    padded, _ = step(st, images, labels, RESIZE, jnp.asarray(mask))
    alone, _ = step(st, images[mask], labels[mask], RESIZE)
    # float32: 1e-4 per tensor, as in test_chunked_loop_equals_step_by_step (a batch of 5
    # instead of 8 in BatchNorm moves every tensor by ~1e-2).
    _assert_same_tree((padded.params, padded.batch_stats, padded.ema_params, padded.ema_batch_stats),
                      (alone.params, alone.batch_stats, alone.ema_params, alone.ema_batch_stats), rtol=1e-4)


def test_eval_step_masks_padding(state):
    images, labels = _batch(8, seed=3)
    # The padding's labels are what the network predicts for it: counted, they would add 3
    # to "correct" (checked below, so that the comparison can fail).
    labels[5:] = np.argmax(np.asarray(training.eval_logits(state, images, RESIZE)), -1)[5:]
    mask = jnp.array([True] * 5 + [False] * 3)
    m = training.eval_step(state, images, labels, RESIZE, mask)
    full = training.eval_step(state, images[:5], labels[:5], RESIZE)
    assert int(m["count"]) == 5
    np.testing.assert_allclose(float(m["loss"]), float(full["loss"]), rtol=1e-5)
    assert int(m["correct"]) == int(full["correct"])
    unmasked = training.eval_step(state, images, labels, RESIZE)
    assert int(unmasked["correct"]) == int(full["correct"]) + 3


@pytest.mark.parametrize("step", ["train_step", "eval_step"])
@pytest.mark.parametrize("mask, error, message", [
    (np.array([1, 1, 2, 0], np.int32), TypeError, "mask selects images: booleans, not int32"),
    (np.array([0.5, 0.5, 0.5, 0.0], np.float32), TypeError, "mask selects images: booleans, not float32"),
    (np.ones(3, bool), ValueError, "mask has one boolean per image, shape (4,); got (3,)"),
])
def test_a_mask_that_is_not_one_boolean_per_image_is_refused(state, step, mask, error, message):
    # Counts or weights in a mask weighed the examples: a wrong loss and metrics, no error.
    images, labels = _batch(4, seed=3)
    with pytest.raises(error, match=f"^{step}'s " + re.escape(message)):
        getattr(training, step)(state, images, labels, RESIZE, jnp.asarray(mask))


def test_evaluate_split_counts_the_confusion_matrix_in_the_same_pass(state):
    from resnet_jax import metrics

    images, labels = _batch(20, seed=5)
    config = Config(resize=RESIZE, eval_batch_size=8)  # 8 + 8 + 4: the last batch padded and masked
    plain = training.evaluate_split(config, state, Split(images, labels))
    result = training.evaluate_split(config, state, Split(images, labels), confusion=True)
    preds = training.predict(state, images, RESIZE).argmax(-1)
    np.testing.assert_array_equal(result["confusion"], metrics.confusion_matrix(labels, preds, 10))
    assert result["confusion"].sum() == 20 and np.trace(result["confusion"]) == round(result["acc"] * 20)
    assert "confusion" not in plain and {k: result[k] for k in plain} == plain


def test_fit_runs_epochs_and_reports(state):
    images, labels = _batch(100, seed=4)
    train = Split(images[:70], labels[:70])
    test = Split(images[70:], labels[70:])
    config = Config(epochs=2, batch_size=16, resize=RESIZE, steps_per_dispatch=2, eval_batch_size=8)
    seen = []
    kept = []  # what a hook may keep: per-epoch snapshots (the next epoch's steps donate fit's own state)
    result = training.fit(config, train, test, state, training.Hooks(
        on_epoch=seen.append, on_checkpoint=lambda s, h: kept.append((s, h))))
    assert [r["epoch"] for r in result.history] == [1, 2] == [r["epoch"] for r in seen]
    assert [len(h) for _, h in kept] == [1, 2] and [int(s.step) for s, _ in kept] == [5, 10]
    first, last = (jax.tree_util.tree_leaves(s.params) for s, _ in kept)
    assert all(np.array_equal(a, b) for a, b in zip(last, jax.tree_util.tree_leaves(result.state.params)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, last))
    # 70 = 4 x 16 + 6: five steps an epoch, the last one on 6 examples.
    assert int(result.state.step) == 10 and result.history[-1]["step"] == 10
    f = result.final
    # wall_s: the clock since fit began (compile and evaluation included), for "accuracy X after Y s".
    walls = [r["wall_s"] for r in result.history]
    assert walls[0] >= f["compile_s"] + result.history[0]["epoch_train_s"]
    assert walls[1] >= walls[0] + result.history[1]["epoch_train_s"] and walls[1] <= f["wall_time_s"]
    # Where the compile time went, program by program (the GPU's 18 s needed this to be read).
    parts = f["compile_s_by_program"]
    # One training program: the last, smaller batch runs in it, padded and masked.
    assert sorted(parts) == ["eval_test", "shuffle", "train"] and min(parts.values()) > 0
    assert sum(parts.values()) <= f["compile_s"]
    assert 0 <= f["test_acc"] <= 1 and np.isfinite(f["train_loss"]) and f["examples_per_sec"] > 0
    # The test metrics equal a direct evaluation of the final state.
    direct = training.eval_step(result.state, test.images, test.labels, RESIZE)
    np.testing.assert_allclose(f["test_loss"], float(direct["loss"]) / 30, rtol=1e-5)
    assert f["test_acc"] == int(direct["correct"]) / 30


def test_fit_takes_its_platform_from_its_devices_not_the_default_backend(state, monkeypatch):
    # fit(devices=jax.devices("cpu")) on a GPU host (made to look like one): the CPU's choices.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    images, labels = _batch(40, seed=6)
    config = Config(epochs=1, batch_size=8, resize=RESIZE, eval_batch_size=8)
    result = training.fit(config, Split(images[:32], labels[:32]), Split(images[32:], labels[32:]), state,
                          devices=jax.devices("cpu"))
    assert result.final["backend"] == "cpu"
    assert result.final["steps_per_dispatch"] == 1  # XLA:CPU's one step per call, not the GPU's 32


def test_fit_refuses_a_state_made_for_another_recipe(state):
    from resnet_jax.recipes import BEST

    images, labels = _batch(32, seed=5)
    config = Config(epochs=1, batch_size=16, resize=RESIZE, recipe=BEST)  # state: create_train_state's default, d2l
    with pytest.raises(ValueError, match="state was made for recipe 'd2l'.*pass recipe=config.recipe to create_train_state"):
        training.fit(config, Split(images, labels), Split(images, labels), state)


@pytest.mark.parametrize("change", [{"lr": 0.5}, {"dtype": "bfloat16"}, {"conv_impl": "xla"}, {"epochs": 3}])
def test_fit_refuses_a_state_built_for_another_optimizer_or_model(change):
    # fit trains with the state's optimizer and model: a config asking for another learning rate
    # (or schedule length, dtype, conv lowering) was silently ignored.
    from resnet_jax.recipes import BEST

    images, labels = _batch(32, seed=5)
    config = Config(epochs=2, batch_size=16, resize=RESIZE, recipe=BEST, train_limit=32, steps_per_dispatch=1)
    built = training.initial_state(config)
    name, value = next(iter(change.items()))
    with pytest.raises(ValueError, match=rf"state was built for {name} .*\(config: {value!r}\).*initial_state\(config"):
        training.fit(config.replace(**change), Split(images, labels), Split(images, labels), built)


def test_fit_refuses_to_run_a_schedule_on_from_its_end_without_history():
    # fit(config, ..., result.state) without result.history: the schedule's count was at its end,
    # the learning rate 0, and the second fit changed no parameter, without an error.
    from resnet_jax.recipes import BEST

    images, labels = _batch(32, seed=5)
    config = Config(epochs=2, batch_size=16, resize=RESIZE, recipe=BEST, train_limit=32, steps_per_dispatch=1)
    state = training.initial_state(config)
    grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    for _ in range(4):  # the two epochs' steps, as fit would have taken them
        state = state.apply_gradients(grads=grads)
    split = Split(images, labels)
    with pytest.raises(ValueError, match=r"the state's optimizer has taken 4 steps of its 'cosine' schedule, but fit was "
                                         r"told 0 epochs of 2 steps were done; to go on training, pass the records"):
        training.fit(config, split, split, state)
    with pytest.raises(ValueError, match=r"taken 4 steps .* told 1 epochs of 2 steps"):
        training.fit(config, split, split, state, history=[{"epoch": 1}])
    training._check_schedule_position(config, state, 2, 2)  # with its two epochs' history: where it should be
    # An optimizer of the caller's own is the caller's to match: not refused (it was, as "taken None steps").
    for tx in (optax.adamw(1e-3), optax.inject_hyperparams(optax.sgd)(learning_rate=optax.cosine_decay_schedule(0.1, 4))):
        own = training.create_train_state(training.make_model(config), tx, jax.random.key(0), recipe=config.recipe)
        training._check_schedule_position(config, own.apply_gradients(grads=grads), 0, 2)


def _compiled(fn):
    """fn's result, and the names of the functions XLA compiled while it ran (JAX's own compile events)."""
    names = []

    def listener(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, names


def _compiles(fn):
    """fn's result, and how many programs XLA compiled while it ran."""
    out, names = _compiled(fn)
    return out, len(names)


@pytest.mark.parametrize("steps_per_dispatch", [1, 2], ids=["step-per-call", "device-loop"])
def test_a_repeated_evaluation_or_a_continued_fit_compiles_nothing(steps_per_dispatch):
    # Each call used to build its programs with a new jax.jit: evaluate_split in a loop of one's
    # own, or fit continued on its result's state, compiled everything again (1.3 of the 1.8 s
    # of a 1,000-image evaluation at 28x28 on 2 CPU cores; on a GPU nearly all of it).
    # An lr of its own: a state of equal config built by another test shares its programs (see below).
    config = Config(epochs=1, batch_size=16, resize=RESIZE, eval_batch_size=8, steps_per_dispatch=steps_per_dispatch,
                    lr=0.03 + steps_per_dispatch / 1000)
    state = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(2))
    images, labels = _batch(60, seed=8)
    train, test = Split(images[:40], labels[:40]), Split(images[40:], labels[40:])
    first, compiled = _compiles(lambda: training.evaluate_split(config, state, test))
    assert compiled >= 1  # not vacuous: the listener hears compiles
    again, compiled = _compiles(lambda: training.evaluate_split(config, state, test))
    assert compiled == 0 and again == first
    one, compiled = _compiles(lambda: training.fit(config, train, test, state))
    assert compiled >= 1  # its training program at least (an earlier fit may have compiled its shuffle, which takes no state)
    two, compiled = _compiles(lambda: training.fit(config.replace(epochs=2), train, test, one.state, history=one.history))
    assert compiled == 0 and [r["epoch"] for r in two.history] == [1, 2]
    assert int(two.state.step) == 2 * int(one.state.step) == 2 * 3
    # Another confusion flag, resize or split size is another program, as it must be.
    _, compiled = _compiles(lambda: training.evaluate_split(config, state, test, confusion=True))
    assert compiled >= 1


def test_a_state_built_anew_from_an_equal_config_compiles_nothing_again():
    # A sweep in one process (seeds, or a notebook cell run again): each initial_state used to
    # bring a model.apply and an optimizer of its own, static parts of the state that JAX's jit
    # cache compares by identity, so every fit compiled all its programs again.
    config = Config(epochs=1, batch_size=16, resize=RESIZE, eval_batch_size=8, lr=0.0421)  # no other test's lr
    images, labels = _batch(60, seed=9)
    train, test = Split(images[:40], labels[:40]), Split(images[40:], labels[40:])
    first, names = _compiled(lambda: training.fit(config, train, test, training.initial_state(config)))
    assert names  # not vacuous: the first fit compiles its programs
    again, names = _compiled(lambda: training.fit(config, train, test, training.initial_state(config)))
    timings = ("epoch_train_s", "examples_per_sec", "wall_s")
    same = lambda a, b: [[{k: v for k, v in r.items() if k not in timings} for r in h] for h in (a, b)]
    assert names == [] and operator.eq(*same(again.history, first.history))
    # Another seed: new weights and a new shuffle, whose program is the only one compiled (the seed is static to it).
    other, names = _compiled(lambda: training.fit(config.replace(seed=1), train, test, training.initial_state(config.replace(seed=1))))
    assert len(names) == 1 and "epoch_plan" in names[0] and not operator.eq(*same(other.history, first.history))
    # Another learning rate is another optimizer, and so other programs.
    _, names = _compiled(lambda: training.fit(config.replace(lr=0.0422), train, test, training.initial_state(config.replace(lr=0.0422))))
    assert len(names) >= 2


def test_the_cached_shuffle_program_follows_jaxs_prng_implementation():
    # epoch_plan's jax.random.key is traced with JAX's default PRNG implementation, which JAX's
    # own jit cache does not key on: a fit after a switch reused the old implementation's shuffle.
    statics = (("seed", 0), ("n", 40), ("batch_size", 8), ("chunk", 1))
    planned = lambda: np.asarray(training._program(training.epoch_plan, "cpu", statics).lower(jnp.int32(0)).compile()(jnp.int32(0)))
    default = jax.config.jax_default_prng_impl
    before = planned()
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        after = planned()
        want = np.asarray(training.epoch_plan(0, seed=0, n=40, batch_size=8, chunk=1))
    finally:
        jax.config.update("jax_default_prng_impl", default)
    np.testing.assert_array_equal(after, want)
    assert not np.array_equal(after, before)  # not vacuous: the implementations shuffle apart
    np.testing.assert_array_equal(planned(), before)


def test_predict_compiles_one_program_per_power_of_two_of_small_calls():
    # A state of its own: the programs counted are this test's, whatever ran before it.
    config = Config(resize=RESIZE, lr=0.0123)  # an lr no other test uses: equal configs share programs
    state = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(1))
    images, _ = _batch(9)
    fn = training._program(training._probabilities, "cpu", (("resize", RESIZE),), state)  # predict's jitted function
    before = fn._cache_size()
    out = {n: training.predict(state, images[:n], RESIZE) for n in (5, 6, 7, 8)}  # all padded to 8
    assert fn._cache_size() - before == 1
    np.testing.assert_allclose(out[5], out[8][:5], rtol=1e-6, atol=1e-7)
    training.predict(state, images[:9], RESIZE, batch_size=8)  # two batches of 8
    assert fn._cache_size() - before == 1


@pytest.mark.parametrize("recipe", ["d2l", "best"])
def test_predict_is_the_softmax_of_the_evaluated_network(state, recipe):
    # Computed here from the model itself: eval mode, and for --recipe best the EMA weights and
    # statistics (moved away from the live ones) and the mean of the logits of each image and its
    # mirror image.
    from resnet_jax.recipes import BEST

    images, _ = _batch(6, seed=4)
    if recipe == "best":
        state = training.create_train_state(state.apply_fn.__self__, training.make_optimizer(Config(), 1),
                                            jax.random.key(0), recipe=BEST)
        state = state.replace(ema_params=jax.tree_util.tree_map(lambda p: p * 1.5, state.params),
                              ema_batch_stats=jax.tree_util.tree_map(lambda s: s + 0.25, state.batch_stats))
        variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    else:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = preprocess(images, RESIZE)
    logits = state.apply_fn(variables, x, train=False)
    if recipe == "best":
        logits = (logits + state.apply_fn(variables, x[:, :, ::-1], train=False)) / 2
    want = np.asarray(jax.nn.softmax(logits, axis=-1))
    got = training.predict(state, images, RESIZE)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got.shape == (6, 10) and np.allclose(got.sum(-1), 1) and want.max() - want.min() > 0.01


def test_hold_out_carves_the_last_n_examples_off():
    images, labels = _batch(10)
    train, val = Split(images, labels).hold_out(3)
    assert np.array_equal(train.images, images[:7]) and np.array_equal(train.labels, labels[:7])
    assert np.array_equal(val.images, images[7:]) and np.array_equal(val.labels, labels[7:])


def test_torch_tensors_into_the_steps_are_refused_with_how_to_pass_them(state):
    # A DataLoader's batch, passed as it is: a uint8 tensor was refused as "takes uint8 images, got
    # torch.uint8", and torch labels failed in JAX's "Cannot interpret 'torch.int64' as a data type".
    torch = pytest.importorskip("torch")
    images, labels = _batch(4)
    for step in (training.train_step, training.eval_step):
        with pytest.raises(TypeError, match=r"images must be a NumPy or JAX array, got a torch tensor: pass "
                                            r"images.numpy\(\) \(a PyTorch batch \(N, C, H, W\) as images.permute"):
            step(state, torch.from_numpy(images), labels, RESIZE)
        with pytest.raises(TypeError, match=r"labels must be a NumPy or JAX array, got a torch tensor: pass labels.numpy\(\)$"):
            step(state, images, torch.from_numpy(labels.astype(np.int64)), RESIZE)


def test_misused_inputs_are_refused_not_silently_wrong(state):
    images, labels = _batch(4)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # uint8 into the model: its layers would compute in uint8 (weights rounded to 0).
    with pytest.raises(TypeError, match="ResNet18 takes float input, got uint8 \\(images scaled to \\[0, 1\\]\\)"):
        state.apply_fn(variables, jnp.asarray(images), train=False)
    # Floats into preprocess, which scales uint8: they would be divided by 255 twice.
    with pytest.raises(TypeError, match="preprocess takes uint8 images"):
        preprocess(jnp.asarray(images, jnp.float32) / 255, RESIZE)
    for n in (0, 2.5):  # 2.5 failed in NumPy's slicing
        with pytest.raises(ValueError, match=f"hold_out needs an integer 0 < n < 4 \\(the split's size\\), got {n}"):
            Split(images, np.zeros(4, np.int32)).hold_out(n)
    # Labels that are not one integer per image: optax's broadcasting error, or a float loss.
    for step in (training.train_step, training.eval_step):
        with pytest.raises(ValueError, match=r"labels are one class index per image, shape \(4,\); got \(3,\)"):
            step(state, images, labels[:3], RESIZE)
        with pytest.raises(TypeError, match="labels are integer class indices, got float32"):
            step(state, images, labels.astype(np.float32), RESIZE)
    # Images without their batch axis: named, not "not enough values to unpack".
    with pytest.raises(ValueError, match=r"preprocess takes NHWC images \(N, H, W, C\), got shape \(28, 28, 1\)"):
        preprocess(jnp.asarray(images[0]), RESIZE)
    with pytest.raises(ValueError, match="preprocess takes square images, as every dataset here has, got 28x20"):
        preprocess(jnp.asarray(images[:, :, :20]), RESIZE)
    with pytest.raises(ValueError, match=r"the model takes uint8 NHWC images \(N, H, W, 1\), got shape \(28, 28, 1\)"):
        training.predict(state, images[0], RESIZE)
    # NCHW images: named as given, not as the (N, 28, 28, 28) that resizing H=1, W=28 made of them.
    nchw = images.transpose(0, 3, 1, 2)
    for call in (lambda: training.predict(state, nchw, RESIZE), lambda: training.train_step(state, nchw, labels, RESIZE),
                 lambda: training.eval_step(state, nchw, labels, RESIZE)):
        with pytest.raises(ValueError, match=r"the model takes uint8 NHWC images \(N, H, W, 1\), got shape \(4, 1, 28, 28\)"):
            call()
    # A traced image size (jax.jit without static_argnames): says what to do, not "got JitTracer".
    with pytest.raises(TypeError, match="the image size must be a Python int, got a JAX array: under jit, make it static"):
        jax.jit(training.train_step)(state, images, labels, RESIZE)
    with pytest.raises(TypeError, match="confusion must be a Python bool, got a JAX array: under jit, make it static"):
        jax.jit(training.eval_step, static_argnames="resize")(state, images, labels, RESIZE, None, True)
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        training.pad_batches(Split(images, labels), 0)
    assert training.pad_batches(Split(images, labels), np.int64(3))[2].shape == (2, 3)
    # No images: no probabilities (rather than "need at least one array to concatenate").
    assert training.predict(state, images[:0], RESIZE).shape == (0, 10)
    np.testing.assert_array_equal(training.predict(state, list(images), RESIZE), training.predict(state, images, RESIZE))
    # A split's images and labels must pair up: on the device a label without its image
    # would gather a clamped index, another image, and train on it silently.
    labels = np.arange(4, dtype=np.int32)
    with pytest.raises(ValueError, match="Split has 3 images but 4 labels"):
        Split(images[:3], labels)
    with pytest.raises(ValueError, match=r"Split images must be uint8 \(N, H, W, C\), got float32"):
        Split(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="Split labels must be integer class indices"):
        Split(images, labels.astype(np.float32))
    config = Config(epochs=1, batch_size=4, resize=RESIZE, eval_batch_size=4)
    good = Split(images, labels)
    for bad, message in ((Split(images, labels - 1), "the train split has label -1; the model's classes are 0..9"),
                         (Split(images, labels + 7), "the train split has label 10"),
                         (Split(images[:0], labels[:0]), "the train split has no examples")):
        with pytest.raises(ValueError, match=message):
            training.fit(config, bad, good, state)
    with pytest.raises(ValueError, match="the test split has no examples"):
        training.fit(config, good, Split(images[:0], labels[:0]), state)
    with pytest.raises(ValueError, match="the evaluated split has label 10"):
        training.evaluate_split(config, state, Split(images, labels + 7))


def test_fit_on_fewer_examples_than_one_batch_takes_one_smaller_step(state):
    images, labels = _batch(20, seed=6)
    train, test = Split(images[:12], labels[:12]), Split(images[12:], labels[12:])
    results, infos = {}, {}
    for bs in (12, 32, 10**6):
        config = Config(epochs=2, batch_size=bs, resize=RESIZE, eval_batch_size=8)
        results[bs] = training.fit(config, train, test, state, training.Hooks(on_start=lambda i, bs=bs: infos.update({bs: i})))
    result = results[32]
    # As a DataLoader without drop_last: each epoch is one step on all 12 examples.
    assert [r["step"] for r in result.history] == [1, 2] and int(result.state.step) == 2
    assert np.isfinite(result.final["train_loss"])
    assert sorted(result.final["compile_s_by_program"]) == ["eval_test", "shuffle", "train"]
    # A batch beyond the set is the set: its programs run 12 examples, not 32 or a million
    # mostly padding, and train exactly as --batch-size 12.
    assert infos[32]["batch_size"] == infos[10**6]["batch_size"] == 12
    for bs in (32, 10**6):
        assert results[bs].final["train_loss"] == results[12].final["train_loss"]
        same = jax.tree_util.tree_map(np.array_equal, results[bs].state.params, results[12].state.params)
        assert all(jax.tree_util.tree_leaves(same))


def test_non_finite_running_statistics_stop_fit_before_the_epoch_is_reported(state):
    # A NaN running variance leaves the training loss finite (training normalises with the
    # batch's statistics) but makes every test logit NaN: the epoch must not count.
    stats = jax.tree_util.tree_map(lambda a: a, state.batch_stats)
    stats["b1"]["bn"]["var"] = stats["b1"]["bn"]["var"].at[0].set(jnp.nan)
    images, labels = _batch(24, seed=7)
    config = Config(epochs=2, batch_size=8, resize=RESIZE, eval_batch_size=8)
    seen = []
    hooks = training.Hooks(on_epoch=seen.append, on_checkpoint=lambda s, h: seen.append("saved"))
    with pytest.raises(training.NonFiniteLoss) as caught:
        training.fit(config, Split(images[:16], labels[:16]), Split(images[16:], labels[16:]),
                     state.replace(batch_stats=stats), hooks)
    assert seen == [] and caught.value.split == "test" and caught.value.epoch == 1
    assert "test loss became nan after epoch 1 (step 2)" in str(caught.value)


def test_an_error_in_the_loop_leaves_fit_once_the_dispatched_steps_are_done(state):
    # A NaN loss is seen while the next step runs. The error left fit at once, and train.py
    # exited with that step still running on XLA's threads: exit 139 (a segmentation fault in
    # the exit handlers) instead of 1, in 1 of 3 runs.
    images, labels = _batch(64, seed=8)
    config = Config(epochs=1, batch_size=16, resize=RESIZE, eval_batch_size=16)

    class Stop(Exception):
        pass

    def stop_after_the_second_dispatch(done, total, last):
        if done == 2:  # step 2 was just dispatched; nothing has waited for it
            raise Stop

    with pytest.raises(Stop) as caught:
        training.fit(config, Split(images, labels), Split(images[:16], labels[:16]), state,
                     training.Hooks(on_progress=stop_after_the_second_dispatch))
    # The loop's arrays, still referenced by the traceback's frames (a step takes some 20 ms
    # here; this check follows the raise within microseconds).
    loop = _frame_of(caught.value, "fit").f_locals
    assert loop["state"].step.is_ready() and all(x.is_ready() for x in jax.tree_util.tree_leaves(loop["sums"]))
    assert int(loop["state"].step) == 2


def _frame_of(err, name):
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_name != name:
        tb = tb.tb_next
    return tb.tb_frame


def test_same_seed_same_run(state):
    images, labels = _batch(40, seed=5)
    train, test = Split(images[:32], labels[:32]), Split(images[32:], labels[32:])
    config = Config(epochs=1, batch_size=8, resize=RESIZE, eval_batch_size=8)
    a = training.fit(config, train, test, state).state
    b = training.fit(config, train, test, state).state
    c = training.fit(config.replace(seed=1), train, test, state).state
    la, lb, lc = (jax.tree_util.tree_leaves(s.params) for s in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not all(np.array_equal(x, y) for x, y in zip(la, lc))


def test_bfloat16_compute_lowers_the_loss_and_keeps_float32_state():
    config = Config(dtype="bfloat16", resize=RESIZE)
    s = training.create_train_state(training.make_model(config), training.make_optimizer(config), jax.random.key(0))
    rng = np.random.default_rng(1)
    labels = np.tile(np.arange(10, dtype=np.int32), 4)
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 20, (40, 28, 28, 1)), 0, 255).astype(np.uint8)
    step = jax.jit(training.train_step, static_argnums=3)
    losses = []
    for _ in range(10):
        s, m = step(s, images, labels, RESIZE)
        losses.append(float(m["loss"]) / 40)
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((s.params, s.batch_stats))} == {jnp.dtype("float32")}


def test_the_initial_state_draws_from_the_seeds_init_key_as_train_py_always_has():
    # The derivation of a run's weights from --seed: a change would make every seed another run
    # (and README's example disagreed with train.py while it used another key).
    config = Config(seed=3, resize=17)
    state = training.initial_state(config)
    expected = training.create_train_state(training.make_model(config), training.make_optimizer(config),
                                           jax.random.fold_in(jax.random.key(3), 0))
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(expected.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = training.initial_state(config.replace(seed=4)).params["dense"]["kernel"]
    assert not np.array_equal(np.asarray(other), np.asarray(state.params["dense"]["kernel"]))


def test_the_cpu_is_named_by_its_model_on_macos(monkeypatch):
    # platform.processor() says "arm" on Apple silicon: results.json named no CPU there.
    import subprocess
    import sys

    calls = []

    def sysctl(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="Apple M2 Pro\n", stderr="")

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(subprocess, "run", sysctl)
    assert training.cpu_name() == "Apple M2 Pro"
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]


def test_the_programs_of_six_runs_are_kept():
    # The bound was 8 jitted functions, two runs' worth (a run has three to five): a notebook
    # alternating three configs compiled all of them at every call.
    def program(run: int, k: int):
        statics = (("seed", run), ("n", 64 + k), ("batch_size", 32), ("chunk", 1))
        return training._program(training.epoch_plan, "cpu", statics)

    first = [program(0, k) for k in range(5)]
    for run in range(1, 6):
        for k in range(5):
            program(run, k)
    assert all(program(0, k) is made for k, made in enumerate(first))
