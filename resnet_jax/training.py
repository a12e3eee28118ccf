"""Train state, the pure step functions, and the one training loop.

One batch's way: the uint8 splits sit on the device; each epoch draws a
permutation with ``jax.random`` on the device; a jitted call gathers
``steps_per_dispatch`` batches from it in turn (on GPU and TPU a ``lax.fori_loop``
around :func:`train_step`; on CPU, where XLA runs a step inside a loop many
times slower, one step per call), preprocesses them (resize, scale) and updates
the state, summing loss and correct predictions on the device. The host only
dispatches and reads the sums once per chunk, one chunk late, so the device
never waits for it.

Every example is seen exactly once per epoch, as with PyTorch's DataLoader
(drop_last=False): 60,000 = 234 x 256 + 96 makes 235 steps, the last one on 96
examples. That last batch is padded to 256 and runs in the same compiled
program as the others, with a mask: BatchNorm takes its statistics over the 96
alone and the loss averages over them, so the step is the chapter's step on 96
examples (tests/test_training.py checks it against the unpadded step). One
training program instead of two halves what fit compiles for training. (On
CPU, where the mask's cost over an epoch's hundreds of steps exceeds a second
compile, the full batches keep a program without the mask.)

Scale-out is JAX's own: a 1-D ``Mesh`` over all devices (``jax.devices()``, all
hosts included after ``jax.distributed.initialize()``), the batch constrained to
be sharded over its ``data`` axis, everything else replicated. XLA partitions
the step; the BatchNorm means and the gradient sums become all-reduces over the
global batch, so N devices compute what one device computes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import ops, processes, recipes
from resnet_jax.augment import augment
from resnet_jax.config import Config
from resnet_jax.data import DATASETS, Split, preprocess
from resnet_jax.model import ResNet18, check_mask, init_variables, is_torch_tensor
from resnet_jax.recipes import D2L, Recipe


def jit(fn: Callable, devices=None, **kwargs):
    """``jax.jit`` for the platform of ``devices`` (default: ``jax.devices()``).

    The program is traced for that platform (the lowerings ``ops`` picks, see
    :func:`resnet_jax.ops.target_platform`) and compiled with its XLA options
    (on CPU, XLA's faster convolution kernels: ops.compiler_options; on GPU and
    TPU none), whatever JAX's default backend is. Every program that trains or
    evaluates the network goes through here, so a benchmark measures what
    training runs. (Initialisation, :func:`_jitted_init`, runs once and keeps
    plain ``jax.jit``.)
    """
    return _jit_for(fn, _platform(devices), **kwargs)


def _jit_for(fn: Callable, target: str, **kwargs):
    """:func:`jit` for the platform named ``target`` ("cpu", "gpu", "tpu")."""

    @functools.wraps(fn)  # the signature, for static_argnames
    def traced(*args, **kw):
        with ops.targeting(target):
            return fn(*args, **kw)

    # The program's name (jit_train_rows, ...: profiles, the compile cache) stays fn's, partials included.
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    traced.__name__ = traced.__qualname__ = getattr(inner, "__name__", "program")
    return jax.jit(traced, compiler_options=ops.compiler_options(target), **kwargs)


def _platform(devices=None) -> str:
    return (devices[0] if devices else jax.devices()[0]).platform


def _program(fn: Callable, target: str, statics: tuple = (), state=None, **jit_kwargs):
    """``jit(functools.partial(fn, **dict(statics)))`` for platform ``target``, made once per
    (fn, target, statics, structure of ``state``, jit options) in a process.

    fit and evaluate_split build their programs here rather than with a new jit each call: JAX
    caches a jitted function's traced and compiled programs by its arguments' structure, shapes
    and shardings, so with the same jitted function a repeated call lowers and compiles in a
    millisecond instead of seconds (evaluate_split in a loop of one's own, fit continued on its
    result's state).

    ``state``, for the programs that take one: its tree structure (the model, the optimizer, the
    recipe: the static parts) is part of the key, so that each state lineage has jitted functions
    of its own and the cache's bound, 32 of them, bounds the compiled programs it keeps: a fit's
    three to five (the shuffle, training, the last batch's, the test's and validation's
    evaluation), so those of the last six fits at least. (8 kept two fits': a notebook
    alternating three configs compiled every call.) (Keyed without it, each state built anew,
    with an optimizer of its own, added its programs to the same jitted functions for the life
    of the process: 45 MiB per fit at 17x17.) JAX's default
    PRNG implementation is part of the key as well: ``jax.random.key`` inside a program (the
    epoch's shuffle) is traced with it, and JAX's own cache does not tell them apart.
    """
    structure = None if state is None else jax.tree_util.tree_structure(state)
    return _cached_program(fn, target, statics, structure, jax.config.jax_default_prng_impl, **jit_kwargs)


@functools.lru_cache(maxsize=32)
def _cached_program(fn: Callable, target: str, statics: tuple, structure, prng_impl: str, **jit_kwargs):
    return _jit_for(functools.partial(fn, **dict(statics)), target, **jit_kwargs)


Metrics = dict[str, jax.Array]  # sums over examples: loss, correct, count


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, tx, opt_state) plus BatchNorm running statistics.

    With a recipe (resnet_jax.recipes) it also carries what the recipe needs,
    so that the step functions and fit() keep their signatures: the recipe
    itself (static, like ``apply_fn``), the augmentation key (raw key data;
    step t uses ``fold_in(aug_key, t)``, so a run is reproducible and a resumed
    one continues the same stream) and the EMA of the weights and statistics.
    Each stays None when its ingredient is off, as everything is for d2l.

    ``built_from``: the config values the model and ``tx`` were built from (:func:`built_from`),
    so that :func:`fit` can refuse a config that asks for another learning rate or dtype; None
    when unknown (``create_train_state`` with a model and optimizer of one's own).
    """

    batch_stats: Any = None
    recipe: Recipe = struct.field(pytree_node=False, default=D2L)
    built_from: tuple | None = struct.field(pytree_node=False, default=None)
    aug_key: jax.Array | None = None
    ema_params: Any = None
    ema_batch_stats: Any = None


def make_model(config: Config, num_classes: int | None = None, input_channels: int | None = None) -> ResNet18:
    """The ResNet-18 ``config`` trains: its dtype and conv lowering; the class and channel counts of
    ``config.dataset`` unless given (Fashion-MNIST: 10 classes, 1 channel)."""
    spec = DATASETS[config.dataset]  # Config has checked the name
    return _model(
        int(spec.num_classes if num_classes is None else num_classes),
        int(spec.channels if input_channels is None else input_channels),
        jnp.dtype(config.dtype),
        config.conv_impl,
    )


# make_model and make_optimizer give the same object for the same values, so that two states
# built from equal configs have equal static parts (a state's apply_fn is a bound method, which
# compares its module by identity; an optimizer compares its functions by identity): fit and
# evaluate_split then reuse the programs the first state compiled (see _program) instead of
# compiling them again for each state built anew, a seed sweep for instance.
@functools.lru_cache(maxsize=32)
def _model(num_classes: int, input_channels: int, dtype, conv_impl: str) -> ResNet18:
    return ResNet18(num_classes=num_classes, input_channels=input_channels, dtype=dtype, conv_impl=conv_impl)


@functools.lru_cache(maxsize=32)
def _sgd(recipe: Recipe, lr: float, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
    return recipes.sgd(recipe, lr, steps_per_epoch, epochs)


def make_optimizer(config: Config, steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """The recipe's optimizer; d2l's is the chapter's torch.optim.SGD(lr): no momentum, no weight decay.

    A learning-rate schedule needs ``steps_per_epoch`` (ceil(train examples / batch size)).
    """
    if not config.recipe.scheduled:  # a constant learning rate: the run's length plays no part
        return _sgd(config.recipe, config.lr, 1, 1)
    if steps_per_epoch is None:
        raise ValueError(f"the {config.recipe.schedule!r} schedule needs steps_per_epoch")
    return _sgd(config.recipe, config.lr, int(steps_per_epoch), config.epochs)


def built_from(config: Config, steps_per_epoch: int | None = None) -> tuple:
    """The values of ``config`` that :func:`make_model` and :func:`make_optimizer` build from, besides
    the recipe: dtype, conv lowering, learning rate, and with a schedule the epochs and steps per
    epoch it spans (default ``config.steps_per_epoch``). As (name, value) pairs: a static field."""
    plan = (("dtype", config.dtype), ("conv_impl", config.conv_impl), ("lr", config.lr))
    if config.recipe.scheduled:
        spe = config.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
        plan += (("epochs", config.epochs), ("steps_per_epoch", spe))
    return plan


def create_train_state(
    model: ResNet18, tx, rng: jax.Array, variables: dict | None = None, recipe: Recipe = D2L
) -> TrainState:
    """A fresh state (PyTorch's init in distribution), or one from given variables.

    ``recipe`` adds its augmentation key (from ``rng``) and EMA copies, when it uses them.

    Fresh variables come from one jitted program per model, with the same values
    as op by op (tested): run eagerly, Flax's init dispatches a few hundred
    operations (the forward pass it traces the shapes with, a random draw per
    tensor), each compiled on first use: most of the 7.4-9.1 s a run spent outside
    fit on 2 CPU cores. One program compiles faster, and train.py's persistent
    compile cache keeps it for the next run (BENCHMARKS.md, "Start-up").
    """
    if variables is None:
        variables = _jitted_init(model)(rng)
    extra = {}
    if recipe.augments:
        key = jax.random.fold_in(rng, 1)
        extra["aug_key"] = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if recipe.ema_decay:
        # Copies: the EMA must not alias the live arrays the steps donate.
        extra["ema_params"] = jax.tree_util.tree_map(jnp.copy, variables["params"])
        extra["ema_batch_stats"] = jax.tree_util.tree_map(jnp.copy, variables["batch_stats"])
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"],
        recipe=recipe, **extra,
    )
    # Flax starts the count at the Python int 0, which steps taken outside jit keep as a Python
    # int (saved as int64); the jitted steps, and checkpoints' templates, have an int32 array.
    return state.replace(step=jnp.zeros((), jnp.int32))


def init_key(seed: int) -> jax.Array:
    """The key a run's initial weights come from: a pure function of the seed, apart from
    :func:`epoch_key`'s shuffles."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def initial_state(config: Config, variables: dict | None = None) -> TrainState:
    """The state train.py starts a run from: ``config.dataset``'s model, ``config``'s optimizer (a
    schedule counts ``config.steps_per_epoch``), weights drawn from ``config.seed`` (or ``variables``).

    Given the same config, ``fit`` then computes what ``python train.py`` computes.
    """
    tx = make_optimizer(config, steps_per_epoch=config.steps_per_epoch)
    state = create_train_state(make_model(config), tx, init_key(config.seed), variables, recipe=config.recipe)
    return state.replace(built_from=built_from(config))


@functools.cache
def _jitted_init(model: ResNet18) -> Callable:
    """``init_variables`` for ``model``, jitted once per model (modules compare by value), so that
    later calls in the process reuse the compiled program."""
    return jax.jit(functools.partial(init_variables, model))


def _num_classes(state: TrainState) -> int:
    """The number of classes the state's model tells apart (its last layer's width)."""
    return state.params["dense"]["bias"].shape[0]


def _check_images(state: TrainState, images, labels=None) -> None:
    """Refuse images the state's model cannot take, naming the shape given, before preprocess
    resizes it (an NCHW batch (N, 1, 28, 28) was reported as the resized (N, 28, 28, 28)); and
    labels that are not one integer per image."""
    for name, a in (("images", images), ("labels", labels)):
        # A torch tensor (a DataLoader's batch): preprocess said "takes uint8 images, got torch.uint8"
        # of a uint8 tensor, and the labels' dtype check "Cannot interpret 'torch.int64' as a data type".
        if is_torch_tensor(a):
            raise TypeError(f"{name} must be a NumPy or JAX array, got a torch tensor: pass {name}.numpy()" + (
                " (a PyTorch batch (N, C, H, W) as images.permute(0, 2, 3, 1).numpy(); uint8, 0-255)"
                if name == "images" else ""))
    channels = state.params["b1"]["conv"]["kernel"].shape[2]
    if np.ndim(images) != 4 or np.shape(images)[-1] != channels:
        raise ValueError(f"the model takes uint8 NHWC images (N, H, W, {channels}), got shape {np.shape(images)}")
    if labels is not None and np.shape(labels) != np.shape(images)[:1]:
        # Their values cannot be checked under jit, but their shape is static (optax's error was a
        # broadcasting of shapes (6, 1) and (8, 1)).
        raise ValueError(f"labels are one class index per image, shape ({np.shape(images)[0]},); got {np.shape(labels)}")
    if labels is not None and not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"labels are integer class indices, got {jnp.result_type(labels).name}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (nn.CrossEntropyLoss(reduction='none'))."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _sums(losses, logits, labels, mask=None, confusion: bool = False) -> Metrics:
    preds = jnp.argmax(logits, -1)
    correct = preds == labels
    if mask is None:
        mask = jnp.ones_like(labels, dtype=bool)
    sums = {
        "loss": jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32),
        "correct": jnp.sum(correct & mask).astype(jnp.int32),
        "count": jnp.sum(mask).astype(jnp.int32),
    }
    if confusion:  # counts[true, predicted], from the same argmax as "correct": its trace is "correct"
        num_classes = logits.shape[-1]
        sums["confusion"] = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, preds].add(mask.astype(jnp.int32))
    return sums


def train_step(
    state: TrainState, images: jax.Array, labels: jax.Array, resize: int, mask: jax.Array | None = None
) -> tuple[TrainState, Metrics]:
    """One SGD step on one batch of uint8 images. Pure: state in, state and metric sums out.

    The metrics are sums over the batch (``loss`` summed, ``correct``, ``count``):
    divide by ``count`` for means. ``resize`` fixes shapes, so it is static under
    jit: ``training.jit(train_step, static_argnames="resize")`` (:func:`jit`: on CPU
    it compiles with faster convolution kernels than plain ``jax.jit``); :func:`fit`
    runs it inside its own jitted epoch programs.

    ``labels``: int (B,) class indices in 0..num_classes-1. Their shape and dtype are checked,
    their values not (under jit they cannot be): one out of range gives a NaN or a wrong loss.
    :func:`fit` checks its splits.

    ``mask``: optional (B,) booleans. The step is then the step on the examples
    where ``mask`` alone (BatchNorm's statistics, the mean loss, the metrics);
    the others are padding and change nothing. A mask with no valid example is
    an update with zero gradients: BatchNorm's running averages stay, but the
    step count, and with them momentum, weight decay and the schedule, move on.

    The recipe's ingredients that are off add nothing to the computation: for
    d2l this is the chapter's step, operation for operation. With label
    smoothing the reported loss is the smoothed loss that is minimised.
    """
    _check_images(state, images, labels)
    if mask is not None:
        check_mask(mask, np.shape(images)[0], "train_step")
    r = state.recipe
    if r.augments:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.aug_key), state.step)
        images = augment(key, images, r.crop_pad, r.flip, r.erase_prob)
    x = preprocess(images, resize)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mask=mask, mutable=["batch_stats"]
        )
        losses = recipes.loss(logits, labels, r.label_smoothing)
        if mask is None:
            mean = jnp.mean(losses)
        else:
            mean = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        return mean, (losses, logits, updates["batch_stats"])

    grads, (losses, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if r.ema_decay:
        # state.step now counts this update: the EMA's decay ramp is a function of updates done.
        state = state.replace(
            ema_params=recipes.ema_update(state.ema_params, state.params, r.ema_decay, state.step),
            ema_batch_stats=recipes.ema_update(state.ema_batch_stats, state.batch_stats, r.ema_decay, state.step),
        )
    return state, _sums(losses, logits, labels, mask)


def eval_logits(state: TrainState, images: jax.Array, resize: int) -> jax.Array:
    """The model in eval mode (running statistics) on a batch of uint8 images.

    With EMA on, the averaged weights and statistics are evaluated; with
    ``tta_flip`` the logits are averaged over each image and its mirror image.
    """
    _check_images(state, images)
    return recipes.test_logits(state.apply_fn, evaluated_variables(state), preprocess(images, resize), state.recipe.tta_flip)


def evaluated_variables(state: TrainState) -> dict:
    """The ``{"params", "batch_stats"}`` that evaluation runs: the moving averages when EMA is on."""
    if state.ema_params is not None:
        return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    return {"params": state.params, "batch_stats": state.batch_stats}


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, resize: int, mask: jax.Array | None = None,
              confusion: bool = False) -> Metrics:
    """Metric sums of the model in eval mode over the batch, or the examples where ``mask``.

    The arguments are :func:`train_step`'s, in its order.

    The loss is the plain cross-entropy, whatever the training loss. With
    ``confusion``, also the confusion matrix's counts ``[true, predicted]``.
    """
    if isinstance(confusion, jax.Array):  # a tracer: jax.jit(eval_step) with confusion not static
        raise TypeError("confusion must be a Python bool, got a JAX array: under jit, make it static "
                        "(training.jit(eval_step, static_argnames=('resize', 'confusion')))")
    _check_images(state, images, labels)
    if mask is not None:
        check_mask(mask, np.shape(images)[0], "eval_step")
    logits = eval_logits(state, images, resize)
    return _sums(cross_entropy(logits, labels), logits, labels, mask, confusion)


def _probabilities(state: TrainState, images: jax.Array, resize: int) -> jax.Array:
    """predict's program: softmax of the eval-mode logits, in float32."""
    return jax.nn.softmax(eval_logits(state, images, resize).astype(jnp.float32), axis=-1)


def predict(state: TrainState, images: np.ndarray, resize: int, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, num_classes) of uint8 images (N, H, W, C), in eval mode.

    Batches of ``batch_size`` images, or for fewer images the next power of two at or above N,
    the last batch padded: a process compiles at most one program per power of two below
    ``batch_size`` and one of ``batch_size``, however many calls of whatever N it makes. States
    built from equal configs (a checkpoint loaded again, say) share those programs; a state
    with a model or optimizer object of one's own compiles its own.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"predict's batch_size must be an int >= 1, got {batch_size!r}")
    images = np.asarray(images)  # a list of arrays too
    _check_images(state, images)
    if len(images) == 0:
        return np.zeros((0, _num_classes(state)), np.float32)
    batch_size = min(int(batch_size), 1 << (len(images) - 1).bit_length())
    probs_fn = _program(_probabilities, _platform(), (("resize", resize),), state)  # repeated calls reuse it
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(probs_fn(state, batch))[: batch_size - pad])
    return np.concatenate(out)


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
    """The sum of two metric-sum dicts (loss, correct, count, confusion), key by key."""
    return jax.tree_util.tree_map(jnp.add, a, b)


def _zeros(num_classes: int | None = None) -> Metrics:
    """Empty metric sums; with ``num_classes``, a confusion matrix's too."""
    sums = {"loss": jnp.float32(0), "correct": jnp.int32(0), "count": jnp.int32(0)}
    if num_classes is not None:
        sums["confusion"] = jnp.zeros((num_classes, num_classes), jnp.int32)
    return sums


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def steps_per_dispatch(config: Config, backend: str) -> int:
    """Training steps per jitted call: ``config.steps_per_dispatch``, or the measured best for the backend.

    On GPU and TPU a device-side loop over many steps removes the host from the
    critical path. XLA:CPU runs a step inside any while loop (lax.scan or
    fori_loop) many times slower than the same step dispatched on its own (about
    40x at 28x28 with the package's options; BENCHMARKS.md, "Steps per dispatch
    on CPU"), and a dispatch costs nothing next to a CPU step, so there it is one
    step per call.
    """
    if config.steps_per_dispatch is not None:
        return config.steps_per_dispatch
    return 1 if backend == "cpu" else 32


def train_chunk(state, images, labels, batch_idx, num_steps, resize: int, batch_sharding=None, masked: bool = False):
    """``num_steps`` train steps over the rows of ``batch_idx`` (K, B), gathered from the on-device split.

    ``masked``: rows may hold -1, for no example (the padding of the epoch's
    last, smaller batch; see :func:`epoch_plan`); each step then runs on its
    valid examples alone (:func:`train_step`'s mask). Off when every batch is
    full, so that the program has no mask to apply.

    ``num_steps`` traced: one compiled program serves full and partial chunks
    (the unused rows of the last chunk are never run), but XLA cannot know the
    loop's trip count, and XLA:GPU then reads the loop's condition back to the
    host after every step. A Python int (fit passes K when K divides the
    epoch's steps, so that every chunk is full) makes the trip count a
    constant of the program. The steps and their order are the same either way.
    """

    def body(i, carry):
        state, sums = carry
        state, m = train_rows(state, images, labels, batch_idx[i], resize, batch_sharding, masked)
        return state, add_metrics(sums, m)

    return jax.lax.fori_loop(0, num_steps, body, (state, _zeros()))


def train_rows(state, images, labels, idx, resize: int, batch_sharding=None, masked: bool = False):
    """:func:`train_step` on rows ``idx`` (B,) of the on-device split; with ``masked``, -1 is no example."""
    mask = None
    if masked:
        mask = _constrain(idx >= 0, batch_sharding)
        idx = jnp.maximum(idx, 0)  # the padding gathers example 0, which the mask then ignores
    x, y = _constrain(images[idx], batch_sharding), _constrain(labels[idx], batch_sharding)
    return train_step(state, x, y, resize, mask)


def jit_train_chunk(
    K: int, steps: int, resize: int, batch_sharding=None, devices=None, masked: bool = False
) -> tuple[Callable, bool]:
    """fit's jitted :func:`train_chunk` for K steps per call, and whether its trip count is a constant.

    ``steps``: the epoch's steps. When K divides them every chunk is full: K is passed
    as a Python int, and the jitted function takes no step count. ``masked``: whether
    the epoch has a smaller last batch. (For the benchmark: fit compiles the same function,
    static arguments and options, both from :func:`_chunk_statics`, through its cache,
    :func:`_program`; so the benchmark times the program fit runs, compiled afresh.)
    """
    statics, static = _chunk_statics(K, steps, resize, batch_sharding, masked)
    return jit(functools.partial(train_chunk, **dict(statics)), devices, donate_argnums=0), static


def _chunk_statics(K: int, steps: int, resize: int, batch_sharding, masked: bool) -> tuple[tuple, bool]:
    """:func:`train_chunk`'s static arguments for :func:`jit_train_chunk`, and whether K is one of them."""
    static = steps % K == 0
    statics = (("resize", resize), ("batch_sharding", batch_sharding), ("masked", masked))
    return statics + ((("num_steps", K),) if static else ()), static


def evaluate_batches(state, images, labels, mask, resize: int, batch_sharding=None, confusion: bool = False) -> Metrics:
    """Metric sums over a whole padded split (N_pad divisible by the eval batch), in one call."""

    def body(sums, batch):
        x, y, m = batch
        x, y, m = (_constrain(a, batch_sharding) for a in (x, y, m))
        return add_metrics(sums, eval_step(state, x, y, resize, m, confusion)), None

    sums, _ = jax.lax.scan(body, _zeros(_num_classes(state) if confusion else None), (images, labels, mask))
    return sums


def epoch_key(seed: int, epoch) -> jax.Array:
    """The shuffle key of one epoch: a pure function of the seed and the epoch number (resumable)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


def epoch_plan(epoch, *, seed: int, n: int, batch_size: int, chunk: int):
    """This epoch's permutation as the rows of its steps, (num_chunks, chunk, B), -1 for no example.

    ceil(n / B) steps, in order: the full batches, then the last, smaller one
    (padded with -1) when B does not divide n. The rows after the epoch's last
    step (in its last chunk) are all -1; fit never runs them.
    """
    perm = jax.random.permutation(epoch_key(seed, epoch), n).astype(jnp.int32)  # int32 even under x64
    steps = math.ceil(n / batch_size)
    num_chunks = math.ceil(steps / chunk)
    rows = jnp.pad(perm, (0, num_chunks * chunk * batch_size - n), constant_values=-1)
    return rows.reshape(num_chunks, chunk, batch_size)


class NonFiniteLoss(FloatingPointError):
    """A loss became NaN or infinite; training stopped before saving anything of it.

    ``split`` "training": the loss of steps ``first_step..last_step``. "test" or
    "validation": the evaluation after an epoch, whose training loss was still
    finite (the last step made the weights or BatchNorm statistics non-finite).
    """

    def __init__(self, first_step: int, last_step: int, epoch: int, loss: float, split: str = "training"):
        if split == "training":
            where = f"step {last_step}" if first_step == last_step else f"steps {first_step}..{last_step}"
            msg = f"the training loss became {loss} at {where} (epoch {epoch}); training stopped"
        else:
            msg = (f"the {split} loss became {loss} after epoch {epoch} (step {last_step}): the weights or "
                   "BatchNorm statistics are no longer finite; training stopped")
        super().__init__(msg)
        self.first_step, self.last_step, self.epoch, self.split = first_step, last_step, epoch, split


@dataclass
class Hooks:
    """What the loop reports; the CLI prints, tests collect. All optional."""

    on_start: Callable[[dict], None] = lambda info: None
    on_progress: Callable[[int, int, dict | None], None] = lambda done, total, last: None
    on_epoch: Callable[[dict], None] = lambda record: None
    # Train loss/acc since the last record: every config.log_every steps (at dispatch
    # granularity), and the epoch's rest at its end.
    on_log: Callable[[dict], None] = lambda record: None
    # After each epoch's record, with a copy of the state that ends it (the hook may keep it) and
    # the history so far: save here.
    on_checkpoint: Callable[[TrainState, list[dict]], None] | None = None


class _StepMonitor:
    """Host side of the per-chunk sums the loop fetches anyway: the NaN guard and the step log.

    Every chunk's sums are read one chunk late (the device runs the next one
    meanwhile), so neither the guard nor the log adds a host sync. A NaN is
    therefore caught within a chunk (one step on CPU), after the step that made it.
    """

    def __init__(self, step: int, log_every: int | None, on_log):
        self.step, self.log_every, self.on_log = step, log_every, on_log
        self.last = None  # the latest chunk's host metrics, for the progress bar
        self._restart_sums()

    def add(self, sums: Metrics, steps: int, epoch: int) -> None:
        m = _to_host(sums)
        first, self.step = self.step + 1, self.step + steps
        if not math.isfinite(m["loss"]):
            raise NonFiniteLoss(first, self.step, epoch, m["loss"])
        self.last = m
        if not self.log_every:
            return
        for key, value in (("loss", m["loss"] * m["count"]), ("correct", m["acc"] * m["count"]), ("count", m["count"])):
            self._since[key] += value
        if self.step // self.log_every > (self.step - steps) // self.log_every:
            self._log(epoch)

    def end_epoch(self, epoch: int) -> None:
        """The epoch's steps since its last record, in one more: every step is in one record
        (d2l's train_ch6 plots the epoch's last batch too)."""
        if self.log_every and self._since["count"]:
            self._log(epoch)

    def new_epoch(self) -> None:
        # Each log record stays within one epoch, so a resumed run logs what the uninterrupted one did.
        self._restart_sums()

    def _log(self, epoch: int) -> None:
        n = self._since["count"]
        self.on_log({"epoch": epoch, "step": self.step, "train_loss": self._since["loss"] / n,
                     "train_acc": self._since["correct"] / n, "examples": n})
        self._restart_sums()

    def _restart_sums(self) -> None:
        self._since = {"loss": 0.0, "correct": 0.0, "count": 0}  # of the next log record


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained state, one record per epoch (those of ``history=`` first),
    and ``final``, the run's figures (the last epoch's metrics, examples/sec, timings, device)."""

    state: TrainState
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)


def _finish_dispatched(*trees) -> None:
    """Wait for the steps behind ``trees`` (fit's metric sums and state) before an error leaves fit.

    Steps already dispatched run on XLA's threads whatever Python does next. A process that
    exited on the error ran the C++ exit handlers under them and died of a segmentation fault
    (train.py after a NaN loss: exit 139 instead of 1, in 1 of 3 runs at 28x28 on CPU; in the
    core dump a thread was in CpuPjRtRawLoadedExecutable::Execute while the main thread ran
    the exit handlers). The sums depend on every chunk dispatched, the state on the last.
    """
    for tree in trees:
        with contextlib.suppress(Exception):  # an input that the failed call had donated (deleted)
            jax.block_until_ready(tree)


def _to_host(m: Metrics) -> dict:
    m = jax.device_get(m)
    count = int(m["count"])
    out = {"loss": float(m["loss"]) / max(count, 1), "acc": int(m["correct"]) / max(count, 1), "count": count}
    if "confusion" in m:
        out["confusion"] = np.asarray(m["confusion"], np.int64)
    return out


def cpu_name() -> str:
    """The CPU's model name (Linux, macOS), else what the platform module knows."""
    if sys.platform == "darwin":  # platform.processor() says only "arm" there
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            if name:
                return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_devices(devices) -> str:
    d = devices[0]
    kind = f" ({d.device_kind})" if d.platform != "cpu" else ""
    more = f" x{len(devices)}" if len(devices) > 1 else ""
    return f"{d.platform}:{d.id}{kind}{more}"


def to_global(x, sharding: NamedSharding) -> jax.Array:
    """A fresh global array with ``sharding``, built from a host value that every process holds.

    ``jax.device_put`` cannot place onto devices of other processes, and onto a
    multi-device mesh it may reuse the caller's buffer for one shard (then
    donation in the steps would delete the caller's array); building each
    addressable shard from a host copy does neither, on one host or many.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def pad_batches(split: Split, batch: int):
    """``split`` as whole batches for evaluation: (images, labels, mask), each (B, batch, ...).

    The last batch is padded with zero images; ``mask`` is False on the padding,
    so the metric sums count every example once and nothing else.
    """
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:  # NumPy ints too
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    n = len(split)
    n_pad = math.ceil(n / batch) * batch
    pad = n_pad - n
    images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
    labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
    mask = np.arange(n_pad) < n
    shape = (n_pad // batch, batch)
    return images.reshape(*shape, *split.images.shape[1:]), labels.reshape(shape), mask.reshape(shape)


def _train_batch_size(config: Config, n: int, n_dev: int) -> int:
    """The batch fit's programs run: ``config.batch_size``, but no larger than the training set
    (rounded up to a multiple of the device count). A --batch-size beyond the set trains one
    step per epoch on all of it either way (as PyTorch's DataLoader makes one batch of what
    there is); padding it to the full size would only cost memory and time."""
    return min(config.batch_size, math.ceil(n / n_dev) * n_dev)


def _eval_batch_size(config: Config, n: int, n_dev: int) -> int:
    eval_bs = min(config.eval_batch_size, math.ceil(n / n_dev) * n_dev)
    return math.ceil(eval_bs / n_dev) * n_dev


def _eval_program(config: Config, state, x, y, m, batch_sharding, device_loop: bool, confusion: bool = False,
                  devices=None):
    """The compiled evaluation: over all of the padded batches ``x, y, m`` (B, N, ...) in one call
    with ``device_loop`` (GPU, TPU), else over one batch ``x[i], y[i], m[i]`` per call.

    Either way each batch is sharded over the devices like training's, so that
    each device evaluates its share of it. ``confusion``: the metric sums
    include the confusion matrix (see :func:`eval_step`)."""
    statics = (("resize", config.resize), ("batch_sharding", batch_sharding), ("confusion", confusion))
    if device_loop:
        return _program(evaluate_batches, _platform(devices), statics, state).lower(state, x, y, m).compile()
    return _program(_eval_batch, _platform(devices), statics, state).lower(state, x[0], y[0], m[0]).compile()


def _eval_batch(state, x, y, m, resize: int, batch_sharding=None, confusion: bool = False) -> Metrics:
    """:func:`eval_step` on one padded batch, sharded over the devices like training's."""
    x, y, m = (_constrain(a, batch_sharding) for a in (x, y, m))
    return eval_step(state, x, y, resize, m, confusion)


def _make_evaluator(config: Config, state, split: Split, put, batch_sharding, devices, confusion: bool = False):
    """state -> host metrics (loss, acc, count, and with ``confusion`` the confusion matrix)
    over ``split``, compiled now for ``devices``; the split goes to the device(s)."""
    x, y, m = map(put, pad_batches(split, _eval_batch_size(config, len(split), len(devices))))
    # No device loop on XLA:CPU (see steps_per_dispatch): one call per batch.
    device_loop = _platform(devices) != "cpu"
    fn = _eval_program(config, state, x, y, m, batch_sharding, device_loop, confusion, devices)
    if device_loop:
        return lambda s: _to_host(fn(s, x, y, m))
    return lambda s: _to_host(functools.reduce(add_metrics, (fn(s, x[i], y[i], m[i]) for i in range(x.shape[0]))))


def _mesh(devices, batch_size: int | None = None):
    """(replicated sharding, batch sharding or None, number of devices) over a 1-D mesh of ``devices``.

    ``batch_size``, for training: it must split evenly over the devices
    (evaluation pads its own batches to a multiple of the device count).
    """
    n_dev = len(devices)
    try:
        # JAX's own choice of order: on TPUs a ring through the chips' physical links, which is
        # what the gradient and BatchNorm all-reduces travel (plain jax.devices() order may not be).
        # Auto axes, as Mesh(): the programs' shardings are set where they are used.
        mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    except Exception:  # (device sets make_mesh cannot lay out: plain order, which is always correct)
        mesh = Mesh(np.asarray(devices), ("data",))
    if batch_size is not None and batch_size % n_dev:
        raise ValueError(f"the batch size {batch_size} (--batch-size) is not divisible by the {n_dev} devices")
    return NamedSharding(mesh, P()), (NamedSharding(mesh, P("data")) if n_dev > 1 else None), n_dev


def _check_split(name: str, split: Split, state: TrainState) -> None:
    """A ValueError for a split the programs cannot use: no examples, or a label that is no class
    of the model (its cross-entropy would be NaN, and read as a diverged run)."""
    if len(split) == 0:
        raise ValueError(f"the {name} split has no examples")
    n = _num_classes(state)
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= n:
        raise ValueError(f"the {name} split has label {low if low < 0 else high}; the model's classes are 0..{n - 1}")


def evaluate_split(config: Config, state: TrainState, split: Split, devices=None, confusion: bool = False) -> dict:
    """Loss and accuracy of ``state`` on ``split``, computed exactly as :func:`fit` measures the test set.

    With ``confusion``, also ``"confusion"``: the (num_classes, num_classes)
    counts of [true class, predicted class], from the same pass over the
    network (its trace is the number of correct predictions).

    Of ``config`` it takes ``resize`` and ``eval_batch_size``: the model, its dtype and the
    recipe's evaluation (EMA weights, flip averaging) are the state's, and the split is used
    as given (as in :func:`fit`).

    Repeated calls on states of one lineage (the steps of one training run) reuse the program
    compiled by the first (:func:`_program`).
    """
    _check_split("evaluated", split, state)
    devices = devices or jax.devices()
    replicated, batch_sharding, _ = _mesh(devices)
    put = lambda a: to_global(a, replicated)
    state = jax.tree_util.tree_map(put, jax.device_get(state))
    return _make_evaluator(config, state, split, put, batch_sharding, devices, confusion)(state)


class _Programs(NamedTuple):
    """fit's compiled programs (see :func:`_compile`)."""

    plan: Callable  # epoch -> the rows of each chunk's steps (epoch_plan)
    chunk: Callable  # (state, x, y, rows, steps) -> (state, metric sums): up to K steps
    last_chunk: Callable  # the same for the epoch's last chunk (on CPU, the masked program when there are two)
    eval_test: Callable  # state -> metrics on the test split
    eval_val: Callable | None  # state -> metrics on the validation split
    scalar: Callable  # int -> a replicated int32 on the devices (the programs' scalar argument)
    compile_s: dict  # seconds each program took to trace, lower and compile: where fit's compile time goes


def _compile(config: Config, state, train_x, train_y, test: Split, val: Split | None, devices, mesh,
             bs: int, steps: int, K: int) -> _Programs:
    """Every program fit runs, lowered and compiled for these shapes and devices before the first step.

    ``mesh``: :func:`_mesh`'s (replicated, batch sharding, device count); ``bs``: the training batch;
    ``steps``: steps per epoch; ``K``: steps per dispatch.
    """
    replicated, batch_sharding, _ = mesh
    put = lambda a: to_global(a, replicated)
    n = train_x.shape[0]
    masked = n % bs != 0  # the epoch ends on a smaller batch: padded, and its program masks
    seconds = {}

    def timed(name: str, make):
        t0 = time.perf_counter()
        program = make()
        seconds[name] = time.perf_counter() - t0
        return program

    # Every input and output sharding is explicit: indices, like the data, are replicated.
    scalar = lambda v: put(np.int32(v))
    target = _platform(devices)
    plan_statics = (("seed", config.seed), ("n", n), ("batch_size", bs), ("chunk", K))
    plan_fn = timed("shuffle", lambda: (
        _program(epoch_plan, target, plan_statics, out_shardings=replicated).lower(scalar(0)).compile()
    ))
    idx_spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=replicated)

    if K > 1:
        # One program for every step, the epoch's smaller last batch included (masked).
        statics, static = _chunk_statics(K, steps, config.resize, batch_sharding, masked)
        chunk = _program(train_chunk, target, statics, state, donate_argnums=0)
        args = (state, train_x, train_y, idx_spec((K, bs))) + (() if static else (scalar(0),))
        compiled = timed("train", lambda: chunk.lower(*args).compile())
        chunk_fn = last_fn = (lambda s, x, y, rows, steps: compiled(s, x, y, rows)) if static else compiled
    else:
        # One step per call (XLA:CPU: no device loop). The mask costs a few percent of a 96x96
        # step (BENCHMARKS.md, "The epoch's last batch"): over an epoch's 234 full steps (about
        # 1.5-3.3 s each at batch 256 on 2 cores: four of the 379-830 ms batch-64 steps of "CPU:
        # bench.py, batch 64") that is tens of seconds, far more than the 2 s of a second compile.
        # So the full batches run unmasked, and the last, smaller one in a masked program.
        def compile_rows(masked_rows: bool):
            statics = (("resize", config.resize), ("batch_sharding", batch_sharding), ("masked", masked_rows))
            program = _program(train_rows, target, statics, state, donate_argnums=0)
            one = program.lower(state, train_x, train_y, idx_spec((bs,))).compile()
            return lambda s, x, y, rows, steps: one(s, x, y, rows[0])

        chunk_fn = last_fn = timed("train", lambda: compile_rows(steps == 1 and masked))
        if masked and steps > 1:
            last_fn = timed("last_batch", lambda: compile_rows(True))
    eval_test = timed("eval_test", lambda: _make_evaluator(config, state, test, put, batch_sharding, devices))
    eval_val = (timed("eval_val", lambda: _make_evaluator(config, state, val, put, batch_sharding, devices))
                if val is not None else None)
    return _Programs(plan_fn, chunk_fn, last_fn, eval_test, eval_val, scalar, seconds)


def _check_state_fits_config(state: TrainState, config: Config) -> None:
    """ValueError where ``state`` was built for another recipe, learning rate (schedule), dtype or
    conv lowering than ``config`` says: fit trains with the state's optimizer and model, so the
    config's values would be silently ignored."""
    hint = ("use a config with the state's values, or start afresh from its weights with "
            "initial_state(config, variables={'params': ..., 'batch_stats': ...}) (a new optimizer state, step 0)")
    if state.recipe != config.recipe:  # else the recipe's augmentation, smoothing and EMA are silently off
        raise ValueError(
            f"the state was made for recipe {state.recipe.name!r} {state.recipe} but config.recipe is "
            f"{config.recipe.name!r} {config.recipe}: pass recipe=config.recipe to create_train_state"
        )
    # A state of create_train_state's, with a model and optimizer of the caller's own (built_from
    # None), is the caller's to match; one of initial_state's or load_for_inference's is checked.
    ours = dict(built_from(config))
    diffs = [f"{k} {v!r} (config: {ours.get(k)!r})" for k, v in state.built_from or () if ours.get(k) != v]
    if diffs:
        raise ValueError(f"the state was built for {', '.join(diffs)}; fit would train with the state's: {hint}")


def _schedule_steps(opt_state) -> int | None:
    """The step count of the optimizer's learning-rate schedule (Optax keeps it in its state); None without one."""
    counts = [leaf.count for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(leaf, optax.ScaleByScheduleState)]
    return int(counts[0]) if counts else None


def _check_schedule_position(config: Config, state: TrainState, start_epoch: int, steps_per_epoch: int) -> None:
    """ValueError unless the state's schedule is where ``start_epoch`` epochs leave it.

    fit(config, ..., result.state) without result.history ran the schedule on from its end: a
    learning rate of 0, epochs that changed nothing, and no error. Only for the recipe's own
    optimizer (``make_optimizer``'s); one of the caller's own is the caller's to match.
    """
    if not config.recipe.scheduled or state.built_from is None:
        return
    done = _schedule_steps(state.opt_state)
    if done is not None and done != start_epoch * steps_per_epoch:
        raise ValueError(
            f"the state's optimizer has taken {done} steps of its {config.recipe.schedule!r} schedule, but fit was told "
            f"{start_epoch} epochs of {steps_per_epoch} steps were done; to go on training, pass the records of the "
            "epochs the state trained as history= (result.history, or the checkpoint's); to train anew from these "
            "weights, use training.initial_state(config, variables)"
        )


def fit(
    config: Config,
    train: Split,
    test: Split,
    state: TrainState,
    hooks: Hooks | None = None,
    devices=None,
    val: Split | None = None,
    history: list[dict] | None = None,
) -> FitResult:
    """Train ``state`` for ``config.epochs`` epochs on ``train``, evaluating on ``test`` after each.

    Returns the final state, one record per epoch and the final metrics
    (the last epoch's train loss/acc and test loss/acc, examples/sec, timings).

    ``val``: a split held out of the training set; its accuracy goes into each
    epoch's record as ``val_acc`` (what selects the best checkpoint; the test
    set never selects anything). ``history``: the records of the epochs
    ``state`` has already trained (from a checkpoint, or an earlier fit's
    ``result.history``); training continues with the next epoch, exactly as an
    uninterrupted run would, because every random stream below derives from
    (config.seed, epoch) alone. Without it, training starts at epoch 1, whatever
    the state's step count (as ``--init-from-torch`` does); with a learning-rate
    schedule, the schedule's own step count must then be 0 (ValueError otherwise).

    The splits are used as given: ``config``'s data-selection fields
    (dataset, train_limit, test_limit, val_split) are the caller's to apply
    (``Split.take``, ``Split.hold_out``, as ``resnet_jax.cli._load_data`` does).
    ``state`` must come from :func:`initial_state` (or ``create_train_state(..., recipe=config.recipe)``):
    fit trains with the state's model and optimizer, so a state that :func:`initial_state` (or
    ``checkpoint.load_for_inference``) built for another learning rate, schedule, dtype or conv
    lowering than ``config`` is refused (ValueError).
    With a learning-rate schedule, the train split must give ``config.steps_per_epoch``
    steps, the count the optimizer's schedule was built for (ValueError otherwise).

    Raises :class:`NonFiniteLoss` when the training loss, or the test or
    validation loss after an epoch, becomes NaN or infinite; the epoch in which
    it happens reaches neither ``on_epoch`` nor ``on_checkpoint``.

    The programs are compiled before the first step (``compile_s`` in the result, split by program
    in ``compile_s_by_program``; on CPU each takes seconds). A call on the same state's lineage (``result.state`` with ``history``, to go on
    training) reuses the ones this process compiled (:func:`_program`), and so does a state
    :func:`initial_state` builds anew from an equal config (another seed compiles only its
    shuffle). A state with a model or optimizer of one's own compiles its own, which JAX's
    persistent compilation cache, when turned on as train.py does
    (``jax.config.update("jax_compilation_cache_dir", DIR)``), loads instead.
    """
    _check_state_fits_config(state, config)
    for name, split in (("train", train), ("test", test), ("val", val)):
        if split is not None:
            _check_split(name, split, state)
    hooks = hooks or Hooks()
    history = list(history or [])
    start_epoch = history[-1]["epoch"] if history else 0
    wall_before = history[-1].get("wall_s", 0.0) if history else 0.0  # the clock of the epochs already trained
    t_start = time.perf_counter()
    devices = devices or jax.devices()
    mesh = _mesh(devices, config.batch_size)
    replicated, _, n_dev = mesh
    n = len(train)
    bs = _train_batch_size(config, n, n_dev)
    steps_per_epoch = math.ceil(n / bs)  # the last batch smaller when bs does not divide n
    if config.recipe.scheduled and steps_per_epoch != config.steps_per_epoch:
        # The optimizer's schedule was planned in config.steps_per_epoch (make_optimizer's, train.py's):
        # with another count it would warm up or decay at the wrong steps, silently.
        raise ValueError(
            f"the {config.recipe.schedule!r} learning-rate schedule counts config.steps_per_epoch = "
            f"{config.steps_per_epoch} steps per epoch ({config.train_examples} training examples), but the "
            f"train split gives {steps_per_epoch} ({n} examples); give the config train_limit (and val_split) "
            "to match the split, and build the optimizer with config.steps_per_epoch"
        )
    _check_schedule_position(config, state, start_epoch, steps_per_epoch)

    # The splits live on the device(s) for the whole run, as uint8.
    put = lambda a: to_global(a, replicated)
    train_x, train_y = put(train.images), put(train.labels)
    # A copy (the steps donate their input state, and the caller's arrays must survive).
    state = jax.tree_util.tree_map(put, jax.device_get(state))

    K = max(1, min(steps_per_dispatch(config, _platform(devices)), steps_per_epoch))

    # Compile everything ahead of time so the timings below are training only.
    t0 = time.perf_counter()
    programs = _compile(config, state, train_x, train_y, test, val, devices, mesh, bs, steps_per_epoch, K)
    plan_fn, chunk_fn, last_fn = programs.plan, programs.chunk, programs.last_chunk
    eval_test, eval_val, scalar = programs.eval_test, programs.eval_val, programs.scalar
    compile_s = time.perf_counter() - t0
    # Several processes: the first step's collectives find every process there, however much
    # longer one of them compiled (a cold compile cache); see processes.wait_for_all.
    processes.wait_for_all("fit's first step", process_ids={d.process_index for d in devices})

    info = {
        "device": describe_devices(devices),
        "num_devices": n_dev,
        "backend": _platform(devices),
        "train_examples": n,
        "test_examples": len(test),
        "val_examples": len(val) if val is not None else 0,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": bs,  # config.batch_size, or the whole training set when that is smaller
        "compile_s": compile_s,
        "compile_s_by_program": programs.compile_s,
        "steps_per_dispatch": K,
        "static_trip_count": K > 1 and steps_per_epoch % K == 0,
    }
    hooks.on_start(info)

    monitor = _StepMonitor(int(jax.device_get(state.step)), config.log_every, hooks.on_log)
    last = None
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        monitor.new_epoch()
        rows = plan_fn(scalar(epoch))
        sums, pending, done = _zeros(), None, 0
        num_chunks = -(-steps_per_epoch // K)
        try:
            for c in range(num_chunks):
                steps = min(K, steps_per_epoch - c * K)
                fn = last_fn if c == num_chunks - 1 else chunk_fn
                state, m = fn(state, train_x, train_y, rows[c], scalar(steps))
                sums = add_metrics(sums, m)
                done += steps
                # Read the previous chunk's sums while this one runs: the device never waits for the host.
                if pending is not None:
                    monitor.add(*pending, epoch + 1)  # NonFiniteLoss; a hook's error (on_log)
                hooks.on_progress(done, steps_per_epoch, monitor.last)  # Ctrl-C (the CLI's check)
                pending = (m, steps)
        except BaseException:
            _finish_dispatched(sums, state)
            raise
        train_metrics = _to_host(sums)  # waits for the epoch's last step
        if pending is not None:
            monitor.add(*pending, epoch + 1)
        monitor.end_epoch(epoch + 1)
        epoch_time = time.perf_counter() - t0
        hooks.on_progress(done, steps_per_epoch, train_metrics)
        test_metrics = eval_test(state)
        last = {
            "epoch": epoch + 1,
            "step": monitor.step,
            "train_loss": train_metrics["loss"],
            "train_acc": train_metrics["acc"],
            "test_loss": test_metrics["loss"],
            "test_acc": test_metrics["acc"],
            "epoch_train_s": epoch_time,
            "examples_per_sec": n / epoch_time,
        }
        if eval_val is not None:
            val_metrics = eval_val(state)
            last.update(val_loss=val_metrics["loss"], val_acc=val_metrics["acc"])
        # A last step can leave the weights or running statistics non-finite with its own
        # loss still finite: such a state must not be reported or saved as an epoch.
        for split, key in (("test", "test_loss"), ("validation", "val_loss")):
            if key in last and not math.isfinite(last[key]):
                raise NonFiniteLoss(monitor.step, monitor.step, epoch + 1, last[key], split=split)
        # Since training began: compile, training, evaluation and earlier checkpoints included
        # (the clock of "test accuracy X after Y seconds"), and with several processes the wait
        # for the slowest to compile (processes.wait_for_all). A resumed run goes on from its
        # checkpoint's clock: each process's compile counts, an interrupted epoch's lost time not.
        last["wall_s"] = wall_before + time.perf_counter() - t_start
        history.append(last)
        hooks.on_epoch(last)
        if hooks.on_checkpoint is not None:
            # A copy: the next epoch's steps donate (delete) `state`, and a hook may keep what it gets.
            hooks.on_checkpoint(jax.tree_util.tree_map(jnp.copy, state), list(history))

    # The run's figures, from every epoch's record: a resumed run's earlier epochs count too.
    trained = [r for r in history if r.get("epoch_train_s")]
    train_time = sum(r["epoch_train_s"] for r in trained)
    if last is None and history:  # resumed after the last epoch: nothing left to train
        last = history[-1]
    if last is None:  # zero epochs: report the model as it is
        test_metrics = eval_test(state)
        last = {"epoch": 0, "step": int(jax.device_get(state.step)), "train_loss": None, "train_acc": None,
                "test_loss": test_metrics["loss"], "test_acc": test_metrics["acc"]}
    final = {
        "epochs": config.epochs,
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "test_loss": last["test_loss"],
        "test_acc": last["test_acc"],
        "examples_per_sec": (n * len(trained) / train_time) if train_time > 0 else None,
        "train_time_s": train_time,
        "batch_size": bs,  # config.batch_size, or the whole training set when that is smaller
        "steps_per_epoch": steps_per_epoch,
        "resumed_from_epoch": start_epoch,  # 0 for a run trained in one go; == epochs: nothing left to train
        "compile_s": compile_s,
        "compile_s_by_program": programs.compile_s,
        "steps_per_dispatch": info["steps_per_dispatch"],
        "static_trip_count": info["static_trip_count"],
        "wall_time_s": wall_before + time.perf_counter() - t_start,
        "device": info["device"],
        "backend": info["backend"],
    }
    if "val_acc" in last:
        final.update(val_loss=last["val_loss"], val_acc=last["val_acc"])
    return FitResult(state=state, history=history, final=final)
