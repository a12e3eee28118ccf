"""The recipes wired into training: d2l unchanged, best's state, EMA and augmentation in the step, end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import cli, training
from resnet_jax.config import Config
from resnet_jax.data import Split, preprocess
from resnet_jax.recipes import BEST, D2L

RESIZE = 24


def _chapter_train_step(state, images, labels, resize):
    """training.train_step as it was before recipes existed (commit 2c6bd09), verbatim."""
    x = preprocess(images, resize)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(losses), (losses, logits, updates["batch_stats"])

    grads, (losses, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, training._sums(losses, logits, labels)


def _chapter_eval_step(state, images, labels, resize, mask):
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, preprocess(images, resize), train=False
    )
    return training._sums(optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits, labels, mask)


def _learnable(n, seed=0):
    """Images whose label is their brightness: a model can learn it in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int32) % 10
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 20, (n, 28, 28, 1)), 0, 255).astype(np.uint8)
    return Split(images, labels)


def _state(config, steps_per_epoch=5):
    model = training.make_model(config)
    tx = training.make_optimizer(config, steps_per_epoch)
    return training.create_train_state(model, tx, jax.random.key(0), recipe=config.recipe)


def _equal_trees(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_d2l_cli_defaults_are_the_old_config():
    config = cli.config_from_args(cli.build_parser().parse_args([]))
    assert config == Config() and config.recipe == D2L
    assert (config.epochs, config.batch_size, config.lr, config.resize) == (10, 256, 0.05, 96)
    assert cli.config_from_args(cli.build_parser().parse_args(["--batch-size", "64"])).lr == 0.05


def test_d2l_step_is_unchanged():
    config = Config(resize=RESIZE)
    state = _state(config)
    assert state.aug_key is None and state.ema_params is None and state.ema_batch_stats is None
    batch = _learnable(16)
    args = (state, batch.images, batch.labels, RESIZE)
    # The same program, operation for operation, for the train and the eval step...
    assert str(jax.make_jaxpr(training.train_step, static_argnums=3)(*args)) == str(
        jax.make_jaxpr(_chapter_train_step, static_argnums=3)(*args))
    mask = np.ones(16, bool)
    eval_args = (state, batch.images, batch.labels, RESIZE, mask)
    assert str(jax.make_jaxpr(training.eval_step, static_argnums=3)(*eval_args)) == str(
        jax.make_jaxpr(_chapter_eval_step, static_argnums=3)(*eval_args))
    # ...and so the same numbers, bit for bit.
    new, m_new = jax.jit(training.train_step, static_argnums=3)(*args)
    old, m_old = jax.jit(_chapter_train_step, static_argnums=3)(*args)
    assert _equal_trees((new.params, new.batch_stats, new.opt_state, m_new), (old.params, old.batch_stats, old.opt_state, m_old))


def test_best_step_augments_reproducibly_and_follows_the_ema_rule():
    config = Config(resize=RESIZE, batch_size=16, epochs=2, recipe=BEST)
    state = _state(config)
    assert state.aug_key is not None and state.ema_params is not None
    assert _equal_trees(state.ema_params, state.params)
    batch = _learnable(16)
    step = jax.jit(training.train_step, static_argnums=3)
    s1, m1 = step(state, batch.images, batch.labels, RESIZE)
    s1b, m1b = step(state, batch.images, batch.labels, RESIZE)
    assert _equal_trees((s1.params, m1), (s1b.params, m1b))  # the key is in the state: reproducible
    # A different step number draws a different augmentation: same params, same batch, another loss.
    _, m_other = step(state.replace(step=state.step + 7), batch.images, batch.labels, RESIZE)
    assert float(m_other["loss"]) != float(m1["loss"])
    # Update 2 (the warmup starts at lr 0, so update 1 moved only the statistics):
    # EMA <- d * EMA + (1 - d) * new, with d = min(0.99, (1 + 2) / (10 + 2)), for weights and statistics.
    s2, _ = step(s1, batch.images, batch.labels, RESIZE)
    assert not _equal_trees(s2.params, s1.params)
    d = 3 / 12
    for ema, old, new in ((s2.ema_params, s1.ema_params, s2.params),
                          (s2.ema_batch_stats, s1.ema_batch_stats, s2.batch_stats)):
        for e, o, n in zip(*map(jax.tree_util.tree_leaves, (ema, old, new))):
            np.testing.assert_allclose(e, d * o + (1 - d) * n, rtol=1e-5, atol=1e-7)
    # Evaluation reads the EMA weights: changing them changes the test metrics, changing params does not.
    mask = np.ones(16, bool)
    ev = jax.jit(training.eval_step, static_argnums=3)
    base = ev(s2, batch.images, batch.labels, RESIZE, mask)
    assert _equal_trees(base, ev(s2.replace(params=state.params), batch.images, batch.labels, RESIZE, mask))
    halved = jax.tree_util.tree_map(lambda p: 0.5 * p, s2.ema_params)
    assert not _equal_trees(base, ev(s2.replace(ema_params=halved), batch.images, batch.labels, RESIZE, mask))


def test_each_ingredient_of_best_is_wired_into_the_steps():
    # What the recipe says, assembled here from its parts, against what the steps compute: the loss
    # with the recipe's smoothing, on the batch augmented with each of its ingredients; evaluation
    # of the EMA weights and statistics, averaged over flips, scored by the plain cross-entropy.
    from resnet_jax import augment, recipes

    r = BEST
    assert r.label_smoothing and r.erase_prob and r.flip and r.crop_pad and r.tta_flip and r.ema_decay
    config = Config(resize=RESIZE, batch_size=16, epochs=2, recipe=r)
    state = _state(config)
    batch = _learnable(16)

    key = jax.random.fold_in(jax.random.wrap_key_data(state.aug_key), state.step)
    augmented = augment.augment(key, batch.images, r.crop_pad, r.flip, r.erase_prob)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def train_loss(images, smoothing):
        logits, _ = state.apply_fn(variables, preprocess(images, RESIZE), train=True, mutable=["batch_stats"])
        return float(jnp.sum(recipes.loss(logits, batch.labels, smoothing)))

    want = train_loss(augmented, r.label_smoothing)
    _, m = jax.jit(training.train_step, static_argnums=3)(state, batch.images, batch.labels, RESIZE)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    # Each ingredient moves that loss ten times the tolerance or more, so none can be dropped unseen.
    without = [train_loss(augmented, 0.0), train_loss(augment.augment(key, batch.images, r.crop_pad, r.flip, 0.0), r.label_smoothing),
               train_loss(augment.augment(key, batch.images, r.crop_pad, False, r.erase_prob), r.label_smoothing),
               train_loss(augment.augment(key, batch.images, 0, r.flip, r.erase_prob), r.label_smoothing)]
    assert all(abs(w - want) > 1e-4 * abs(want) for w in without), (want, without)

    # EMA statistics unlike the live ones, so that evaluating with the live ones shows; and a
    # sharper last layer than a fresh one's (nearly uniform outputs, whatever the input). Images of
    # pixel noise, unlike their mirror images: the brightness images above are nearly symmetric,
    # and flip averaging moved their loss by only 4e-5 of itself.
    images = np.random.default_rng(1).integers(0, 256, batch.images.shape, dtype=np.uint8)
    ema_params = {**state.ema_params, "dense": {**state.ema_params["dense"], "kernel": 30 * state.ema_params["dense"]["kernel"]}}
    s = state.replace(ema_params=ema_params,
                      ema_batch_stats=jax.tree_util.tree_map(lambda v: 0.5 * v - 0.1, state.ema_batch_stats))
    x = preprocess(images, RESIZE)

    def eval_loss(variables, flip=True, smoothing=0.0):
        logits = s.apply_fn(variables, x, train=False)
        if flip:
            logits = 0.5 * (logits + s.apply_fn(variables, x[:, :, ::-1], train=False))
        return float(jnp.sum(recipes.loss(logits, batch.labels, smoothing))), int(jnp.sum(jnp.argmax(logits, -1) == batch.labels))

    ema = {"params": s.ema_params, "batch_stats": s.ema_batch_stats}
    want_loss, want_correct = eval_loss(ema)
    got = jax.jit(training.eval_step, static_argnums=3)(s, images, batch.labels, RESIZE)
    np.testing.assert_allclose(float(got["loss"]), want_loss, rtol=1e-5)
    assert int(got["correct"]) == want_correct
    others = [eval_loss({"params": s.ema_params, "batch_stats": s.batch_stats})[0], eval_loss(ema, flip=False)[0],
              eval_loss(ema, smoothing=r.label_smoothing)[0]]
    print("eval loss with the recipe, without each ingredient:", want_loss, others)
    assert all(abs(o - want_loss) > 1e-4 * abs(want_loss) for o in others), (want_loss, others)


def test_recipe_best_flags_train_end_to_end_and_lower_the_loss():
    args = cli.build_parser().parse_args([
        "--recipe", "best", "--resize", str(RESIZE), "--batch-size", "16", "--epochs", "6", "--ema-decay", "0.9",
        "--steps-per-dispatch", "4",  # the GPU's path: steps in a device loop
        "--train-limit", "64",  # the split below: the schedule counts config.steps_per_epoch
    ])
    config = cli.config_from_args(args)
    assert config.recipe.name == "best" and config.recipe.ema_decay == 0.9 and config.recipe.flip
    assert config.lr == pytest.approx(0.4 * 16 / 512)  # scaled to the batch
    assert Config(**config.to_dict()) == config  # the recipe survives a round trip through JSON-able data
    train, test = _learnable(64), _learnable(32, seed=1)
    state = _state(config, steps_per_epoch=config.steps_per_epoch)
    result = training.fit(config, train, test, state)
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    assert np.isfinite(result.final["test_loss"]) and 0 <= result.final["test_acc"] <= 1
    assert int(result.state.step) == 24


def test_a_split_of_another_size_than_the_schedule_was_planned_for_is_refused():
    # 512 examples where the config says 60,000: the warmup would span 118 steps of a 1-step epoch
    # at batch 512, and the run trained at lr ~0 without a word.
    config = Config.for_recipe("best", resize=RESIZE, epochs=2)
    train, test = _learnable(512), _learnable(32, seed=1)
    state = _state(config, steps_per_epoch=config.steps_per_epoch)
    with pytest.raises(ValueError, match=r"the 'cosine' learning-rate schedule counts config.steps_per_epoch = 118 "
                                         r"steps per epoch \(60000 training examples\), but the train split gives 1 "
                                         r"\(512 examples\); give the config train_limit"):
        training.fit(config, train, test, state)
    constant = Config(resize=RESIZE, epochs=1, batch_size=256)  # the chapter's: no schedule, any split
    training.fit(constant, train, test, _state(constant))


def test_bad_ingredient_flags_exit_2(capsys):
    assert cli.main(["--recipe", "best", "--erase-prob", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "train.py: error: --erase-prob must be in [0, 1], got 2.0"
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal of an unknown choice
        cli.main(["--schedule", "linear"])
    assert exit_.value.code == 2
