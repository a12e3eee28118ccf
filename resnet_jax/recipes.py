"""Training recipes as data: what is done to the unchanged ResNet-18 beyond the chapter's plain SGD.

A :class:`Recipe` lists the ingredients (optimizer, schedule, loss, weight
averaging, augmentation, test-time flips). ``D2L`` is the chapter's
``train_ch6`` and switches every ingredient off; ``BEST`` is what the strongest
small-image recipes (ResNet on CIFAR, airbench) do. The run's length, batch
size, learning rate and image size stay :class:`~resnet_jax.config.Config`
fields; :data:`RUN_DEFAULTS` says what each recipe sets them to when no flag
does.

The functions here are pure and know nothing of the training loop:
:func:`sgd` (the Optax optimizer; ``training.make_optimizer(config)`` calls it), :func:`loss` (cross-entropy with optional label
smoothing), :func:`ema_update` (exponential moving average of weights and
BatchNorm statistics) and :func:`test_logits` (logits, optionally averaged over a
left-right flip).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "cosine", "onecycle")
FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)  # config.FLOAT32_MAX (config imports this module)


@dataclass(frozen=True)
class Recipe:
    """The ingredients of a training recipe. The defaults are the chapter's: everything off."""

    name: str = "d2l"
    # Optimizer: SGD, with heavy-ball or Nesterov momentum.
    momentum: float = 0.0
    nesterov: bool = False
    # Coupled L2 weight decay (added to the gradient, as torch.optim.SGD's weight_decay),
    # on conv and dense kernels only: see weight_decay_mask.
    weight_decay: float = 0.0
    # Learning rate: 'constant', 'cosine' (linear warmup, then cosine to 0) or
    # 'onecycle' (Smith's one-cycle with cosine phases; the warmup is its rising phase).
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    # Scale the learning rate linearly with the batch size when --batch-size
    # differs from the recipe's and no --lr is given (Goyal et al., 2017).
    scale_lr: bool = False
    label_smoothing: float = 0.0
    # EMA of the weights and BatchNorm statistics, used for evaluation; 0 is off.
    ema_decay: float = 0.0
    # Average the logits of each test image and its mirror image.
    tta_flip: bool = False
    # Augmentation, on the device (resnet_jax.augment), in the stored image's pixels (28x28 for Fashion-MNIST).
    crop_pad: int = 0
    flip: bool = False
    erase_prob: float = 0.0

    def __post_init__(self):
        # NumPy's scalars (a sweep over np.arange(4) for crop_pad, np.float32 decays) become the
        # plain values, as Config's own fields do: else problem() refused them as no integer or
        # number, and an np.bool_ made the config no JSON (results.json, --json).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.bool_):
                object.__setattr__(self, f.name, bool(value))
            elif isinstance(value, np.integer):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, np.floating):
                object.__setattr__(self, f.name, float(value))

    @property
    def augments(self) -> bool:
        return bool(self.crop_pad or self.flip or self.erase_prob)

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes from step to step (a schedule, or a warmup): it is
        then planned over the run's steps, epochs times steps per epoch."""
        return self.schedule != "constant" or bool(self.warmup_epochs)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


D2L = Recipe()
BEST = Recipe(
    name="best",
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,  # the ResNet-on-CIFAR value for coupled decay with SGD
    schedule="cosine",
    warmup_epochs=1.0,  # lr 0.4 from step 0 with a fresh BatchNorm net diverges easily
    scale_lr=True,
    label_smoothing=0.1,
    ema_decay=0.99,  # a horizon of ~100 steps: about the last epoch at batch 512
    tta_flip=True,
    crop_pad=2,  # shifts of up to 2 of 28 pixels: the garments are centred by the dataset
    flip=True,
    erase_prob=0.25,  # below the paper's 0.5: a run of a few epochs cannot afford as much regularisation
)
RECIPES = {"d2l": D2L, "best": BEST}

# What each recipe sets the Config's run-level fields to when no flag does.
# d2l: the chapter (10 epochs, batch 256, lr 0.05, 96x96). best: a larger batch
# for the GPU's throughput, lr 0.1 per 128 examples as ResNet-on-CIFAR recipes
# use, the chapter's 96x96 and 32 epochs. Measured on one H200 (seed 0, bf16,
# BENCHMARKS.md): 64x64 for 16 epochs ended at 0.9397 in 45.6 s; 96x96 at 0.9440
# and 32 epochs at 0.9450, each alone; both together at 0.9506 in 62.3 s.
RUN_DEFAULTS = {
    "d2l": {"epochs": 10, "batch_size": 256, "lr": 0.05, "resize": 96},
    "best": {"epochs": 32, "batch_size": 512, "lr": 0.4, "resize": 96},
}


def resolve(name: str, overrides: dict | None = None, **run) -> tuple[Recipe, dict]:
    """The named recipe with ``overrides`` (ingredients; None values ignored) and its run settings.

    ``run`` may give epochs, batch_size, lr and resize (None: the recipe's).
    Without an explicit lr, a recipe with ``scale_lr`` scales its lr by
    batch_size / its own batch size; d2l keeps 0.05 for any batch, as before.
    """
    recipe = RECIPES[name].replace(**{k: v for k, v in (overrides or {}).items() if v is not None})
    base = RUN_DEFAULTS[name]
    settings = {k: (run.get(k) if run.get(k) is not None else v) for k, v in base.items()}
    if run.get("lr") is None and recipe.scale_lr:
        settings["lr"] = base["lr"] * settings["batch_size"] / base["batch_size"]
    return recipe, settings


def problem(r: Recipe) -> str | None:
    """The first ingredient that cannot work, as a one-line message naming its flag; None if all can."""

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not number(r.momentum) or not 0 <= r.momentum < 1:
        return f"--momentum must be in [0, 1), got {r.momentum!r}"
    if r.nesterov and r.momentum == 0:
        return "--nesterov needs a --momentum > 0 (--recipe best turns it on: add --no-nesterov for plain SGD)"
    # Finite in float32 too, as --lr (config.FLOAT32_MAX): a larger one is inf in the update, and the
    # run stopped at its first steps with a NaN loss and the advice of a smaller --lr.
    if not number(r.weight_decay) or not 0 <= r.weight_decay <= FLOAT32_MAX:
        return f"--weight-decay must be a finite number >= 0, got {r.weight_decay!r}"
    if r.schedule not in SCHEDULES:
        return f"--schedule must be one of {', '.join(SCHEDULES)}, got {r.schedule!r}"
    if not number(r.warmup_epochs) or r.warmup_epochs < 0:
        return f"--warmup-epochs must be a finite number >= 0, got {r.warmup_epochs!r}"
    if not number(r.label_smoothing) or not 0 <= r.label_smoothing < 1:
        return f"--label-smoothing must be in [0, 1), got {r.label_smoothing!r}"
    if not number(r.ema_decay) or not 0 <= r.ema_decay < 1:
        return f"--ema-decay must be in [0, 1) (0 turns EMA off), got {r.ema_decay!r}"
    if isinstance(r.crop_pad, bool) or not isinstance(r.crop_pad, int) or not 0 <= r.crop_pad <= 14:
        return f"--crop-pad must be an integer in [0, 14], got {r.crop_pad!r}"
    if not number(r.erase_prob) or not 0 <= r.erase_prob <= 1:
        return f"--erase-prob must be in [0, 1], got {r.erase_prob!r}"
    return None


def schedule(r: Recipe, lr: float, steps_per_epoch: int, epochs: int) -> optax.Schedule | float:
    """The learning rate at each step (an Optax schedule), or the constant ``lr`` itself."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(round(r.warmup_epochs * steps_per_epoch), total - 1)
    if r.schedule == "constant":
        return lr if warmup == 0 else optax.warmup_constant_schedule(0.0, lr, warmup)
    if r.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
    # One-cycle (Smith & Topin): cosine up from lr/25 over the warmup, then down to lr/25e4.
    return optax.cosine_onecycle_schedule(total, lr, pct_start=max(warmup, 1) / total)


def weight_decay_mask(params) -> dict:
    """True for the leaves weight decay applies to: conv and dense kernels.

    Not BatchNorm's scale and bias: decaying them only changes the scale the
    next layer sees, which BatchNorm undoes, so it shrinks nothing that matters
    and fights the normalisation. Not the biases: they set an offset, not a
    capacity, and have no scale to regularise (the standard "no bias decay",
    Goyal et al. 2017; He et al. 2019). Here every leaf named 'bias' or 'scale'
    is one of those; every 'kernel' is a conv or the final dense layer.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def sgd(r: Recipe, lr: float, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
    """SGD as the recipe says. For d2l this is exactly ``optax.sgd(lr)``: the chapter's step, unchanged.

    Weight decay is coupled (L2 added to the gradient before momentum, as in
    torch.optim.SGD), not decoupled: with SGD the two differ only in whether
    the decay follows the learning-rate schedule, and the coupled form is the
    one the usual values (5e-4 for ResNets on CIFAR-sized images) were tuned for.
    """
    sgd = optax.sgd(
        schedule(r, lr, steps_per_epoch, epochs), momentum=r.momentum or None, nesterov=r.nesterov
    )
    if not r.weight_decay:
        return sgd
    return optax.chain(optax.add_decayed_weights(r.weight_decay, mask=weight_decay_mask), sgd)


def loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against labels smoothed by ``label_smoothing`` (nn.CrossEntropyLoss's).

    With 0 this is exactly the chapter's loss (the same Optax call as before).
    """
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def ema_decay_at(decay: float, step) -> jax.Array:
    """The decay used after ``step`` updates: min(decay, (1 + step) / (10 + step)).

    The ramp (TensorFlow's ExponentialMovingAverage with num_updates) keeps the
    average from being dominated by the random initial weights early on: a
    plain 0.99 would still hold 37% of them after 100 steps.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, new, decay: float, step):
    """One EMA step on a pytree: ema <- d * ema + (1 - d) * new, with d = ema_decay_at(decay, step).

    Applied to the BatchNorm running statistics as well as to the weights
    (timm's ModelEmaV2 does the same with its buffers). The choice, against
    recomputing the statistics for the averaged weights with an extra pass over
    training data: it keeps evaluation a pure function of the train state, with
    no data pass and no change to the loop. The averaged statistics belong to a
    blend of recent weights, not exactly to the averaged weights; the mismatch
    is of the order of how far the weights move within the EMA's horizon (~100
    steps), which is small at the end of a schedule that anneals to zero.
    """
    return optax.incremental_update(new, ema, 1.0 - ema_decay_at(decay, step))


def test_logits(apply_fn, variables: dict, x: jax.Array, tta_flip: bool = False) -> jax.Array:
    """Eval-mode logits; with ``tta_flip`` the mean of the logits of ``x`` and of its mirror image.

    The images and their mirror images go through the network as one batch of twice the size:
    eval-mode BatchNorm normalises with its running statistics, so no image sees another, and
    the program holds the network once instead of twice. On 2 CPU cores (64x64, 1,000 test
    images) the evaluation program then compiled in 0.87 s instead of 1.5 s, and the test loss
    came out the same to the last printed digit.
    """
    if not tta_flip:
        return apply_fn(variables, x, train=False)
    n = x.shape[0]
    logits = apply_fn(variables, jnp.concatenate([x, x[:, :, ::-1, :]]), train=False)
    return 0.5 * (logits[:n] + logits[n:])
