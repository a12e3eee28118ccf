"""The run's configuration: one frozen dataclass, validated once, at the edge.

Defaults are the chapter's recipe (d2l ``train_ch6`` with lr 0.05): 10 epochs,
batch 256, images resized to 96x96, plain SGD, float32. Another recipe brings its
own epochs, batch size, lr and resize: ``Config.for_recipe("best")`` is what
``train.py --recipe best`` trains (``Config(recipe=BEST)`` would change the
ingredients only, and keep the chapter's 10 epochs of batch 256 at lr 0.05).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from resnet_jax.data import DATASETS
from resnet_jax.ops import IMPLS
from resnet_jax.recipes import D2L, RUN_DEFAULTS, Recipe, resolve, problem as recipe_problem

DTYPES = ("float32", "bfloat16")
NUM_STRIDE2 = 5  # b1 conv, b1 max-pool, first residual of b3, b4, b5
# Each stride-2 step maps a side s to ceil(s / 2). For every one of the five to
# act on at least a 2x2 map, the side before the last one, ceil(s / 16), must be
# >= 2, i.e. s >= 17. Smaller inputs collapse to 1x1 before b5 and the later
# stages only ever see the centre tap of their kernels.
MIN_RESIZE = 2 ** (NUM_STRIDE2 - 1) + 1
# Fashion-MNIST's images are 28x28 and the chapter's 96x96; past 512 an upscale adds
# nothing but memory (at 5000, about 1 TB for one batch of 256 on the device).
MAX_RESIZE = 512
FLOAT32_MAX = 3.4028234663852886e38  # an lr above it is inf in the float32 update


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names train.py's flag, which is the
    Config field's name with dashes (``--batch-size``: ``batch_size``)."""


@dataclass(frozen=True)
class Config:
    dataset: str = "fashion_mnist"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    resize: int = 96
    seed: int = 0
    train_limit: int | None = None  # only the first N training examples
    test_limit: int | None = None  # only the first N test examples
    data_dir: str | None = None  # a TFDS data_dir; None means TFDS's default
    manual_dir: str | None = None  # a folder with the dataset's official files
    offline: bool = False  # never attempt a download
    output: str | None = None  # where checkpoints and metrics are written
    resume: bool = False  # continue from the latest checkpoint in output
    keep: int = 3  # latest checkpoints kept in output
    val_split: int | None = None  # hold out the last N training examples to select the best checkpoint
    log_every: int | None = None  # also log train loss/acc every N steps (rounded up to a dispatch)
    dtype: str = "float32"  # computation dtype; parameters stay float32
    steps_per_dispatch: int | None = None  # training steps per jitted call; None: best for the backend
    eval_batch_size: int = 1000
    conv_impl: str = "auto"  # see resnet_jax.ops
    init_from_torch: str | None = None  # start from this PyTorch state_dict (.pt) of the chapter's net
    export_torch: str | None = None  # write the trained model here as a PyTorch state_dict (.pt)
    recipe: Recipe = D2L  # the training ingredients beyond plain SGD (resnet_jax.recipes); d2l: none

    def __post_init__(self):
        if isinstance(self.recipe, dict):  # as to_dict() wrote it, e.g. read back from results.json
            object.__setattr__(self, "recipe", Recipe(**self.recipe))
        # NumPy's scalars (a sweep over np.logspace, np.arange) and dtype objects (jnp.bfloat16)
        # become the plain values the config holds, so that it stays JSON and compares equal.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.bool_):
                object.__setattr__(self, f.name, bool(value))
            elif isinstance(value, np.integer):
                object.__setattr__(self, f.name, float(value) if f.name == "lr" else int(value))
            elif isinstance(value, np.floating):
                object.__setattr__(self, f.name, float(value))
        if not isinstance(self.dtype, str):
            with contextlib.suppress(TypeError):
                object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        validate(self)

    @classmethod
    def for_recipe(cls, name: str, overrides: dict | None = None, **fields) -> "Config":
        """The Config of ``train.py --recipe NAME``: the recipe with its run settings.

        ``overrides``: ingredients to change (``{"ema_decay": 0}``), as the recipe's flags do;
        ``fields``: any other field. epochs, batch_size, lr and resize not given are the
        recipe's; a batch size given without an lr scales the lr where the recipe says so
        (``recipes.resolve``), as on the command line.
        """
        if name not in RUN_DEFAULTS:
            raise ConfigError(f"--recipe must be one of {', '.join(RUN_DEFAULTS)}, got {name!r}")
        ingredients = [f.name for f in dataclasses.fields(Recipe) if f.name != "name"]
        if unknown := sorted(set(overrides or {}) - set(ingredients)):
            if unknown[0] in {f.name for f in dataclasses.fields(cls)}:  # lr, epochs...: Recipe() raised a TypeError
                raise ConfigError(f"{unknown[0]} is a run setting, not an ingredient of the recipe: pass it as a "
                                  f"keyword, Config.for_recipe({name!r}, {unknown[0]}=...)")
            raise ConfigError(f"{unknown[0]!r} is not an ingredient of a recipe; they are: {', '.join(ingredients)}")
        run = {k: fields.pop(k) for k in RUN_DEFAULTS[name] if k in fields}
        recipe, settings = resolve(name, overrides, **run)
        return cls(recipe=recipe, **settings, **fields)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def train_examples(self) -> int:
        """How many examples train.py trains on: the first ``train_limit`` of the dataset's
        training split, less the ``val_split`` held out of them."""
        n = self.train_limit if self.train_limit is not None else DATASETS[self.dataset].num_train
        return n - (self.val_split or 0)

    @property
    def steps_per_epoch(self) -> int:
        """train.py's steps per epoch (the last batch may be smaller): what the schedules count in."""
        return math.ceil(self.train_examples / self.batch_size)


# Counts above this are typos (and overflow the int32/C long they become in XLA and NumPy).
MAX_COUNT = 2**31 - 1


def _positive_int(value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ConfigError(f"{flag} must be a positive integer (at most 2**31 - 1), got {value!r}")


def validate(c: Config) -> None:
    """Raise ConfigError for the first value that cannot work."""
    if c.dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {c.dataset!r}")
    spec = DATASETS[c.dataset]
    for flag, value in (("--data-dir", c.data_dir), ("--manual-dir", c.manual_dir), ("--output", c.output),
                        ("--init-from-torch", c.init_from_torch), ("--export-torch", c.export_torch)):
        if value is not None and not str(value).strip():  # "--output $RUN" with RUN unset
            raise ConfigError(f"{flag} is empty; give a path, or leave the flag out")
    if isinstance(c.epochs, bool) or not isinstance(c.epochs, int) or not 0 <= c.epochs <= MAX_COUNT:
        raise ConfigError(f"--epochs must be a non-negative integer, got {c.epochs!r}")
    _positive_int(c.batch_size, "--batch-size")
    if c.steps_per_dispatch is not None:
        _positive_int(c.steps_per_dispatch, "--steps-per-dispatch")
    _positive_int(c.eval_batch_size, "--eval-batch-size")
    if not isinstance(c.lr, (int, float)) or isinstance(c.lr, bool) or not math.isfinite(c.lr) or not 0 < c.lr <= FLOAT32_MAX:
        raise ConfigError(f"--lr must be a finite number > 0, got {c.lr!r}")
    if isinstance(c.resize, bool) or not isinstance(c.resize, int) or not MIN_RESIZE <= c.resize <= MAX_RESIZE:
        raise ConfigError(
            f"--resize must be an integer in [{MIN_RESIZE}, {MAX_RESIZE}] (ResNet-18 halves the image "
            f"{NUM_STRIDE2} times; {spec.tfds_name}'s images are {spec.image_size}x{spec.image_size}), got {c.resize!r}"
        )
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2**32:
        raise ConfigError(f"--seed must be an integer in [0, 2**32), got {c.seed!r}")
    for flag, value, size in (
        ("--train-limit", c.train_limit, spec.num_train),
        ("--test-limit", c.test_limit, spec.num_test),
    ):
        if value is None:
            continue
        _positive_int(value, flag)
        if value > size:
            raise ConfigError(f"{flag} {value} is larger than the {spec.tfds_name} split ({size} examples)")
    _positive_int(c.keep, "--keep")
    if c.log_every is not None:
        _positive_int(c.log_every, "--log-every")
    if c.resume and not c.output:
        raise ConfigError("--resume needs --output DIR (the run directory to continue)")
    if c.epochs == 0 and c.output:  # its folder could be neither continued (no checkpoint) nor reused (results)
        raise ConfigError("--epochs 0 trains nothing and saves no checkpoint: leave out --output "
                          "(the untrained model's test metrics are printed)")
    if c.val_split is not None:
        _positive_int(c.val_split, "--val-split")
        available = c.train_limit if c.train_limit is not None else spec.num_train
        if c.val_split >= available:
            raise ConfigError(
                f"--val-split {c.val_split} leaves no training examples (the training split has {available})"
            )
    if c.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
    if c.conv_impl not in IMPLS:
        raise ConfigError(f"--conv-impl must be one of {', '.join(IMPLS)}, got {c.conv_impl!r}")
    if not isinstance(c.recipe, Recipe):
        raise ConfigError(f"recipe must be a resnet_jax.recipes.Recipe, got {c.recipe!r}")
    if (message := recipe_problem(c.recipe)) is not None:
        raise ConfigError(message)
    if c.epochs and c.recipe.warmup_epochs > c.epochs:
        raise ConfigError(
            f"--warmup-epochs {c.recipe.warmup_epochs:g} is longer than the run (--epochs {c.epochs}): "
            "the learning rate would never reach its peak"
        )
