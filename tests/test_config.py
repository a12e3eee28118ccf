"""The run's configuration as data (the flags that build it are tests/test_cli.py's)."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.config import Config, ConfigError


def test_config_takes_numpy_scalars_and_dtype_objects():
    # A sweep built with NumPy (np.logspace, np.arange) or a dtype passed as jnp.bfloat16.
    c = Config(lr=np.float32(0.5), batch_size=np.int64(32), epochs=np.int32(3), dtype=jnp.bfloat16, offline=np.bool_(True))
    assert (c.lr, c.batch_size, c.epochs, c.dtype, c.offline) == (0.5, 32, 3, "bfloat16", True)
    assert [type(v) for v in (c.lr, c.batch_size, c.epochs, c.offline)] == [float, int, int, bool]
    assert c == Config(lr=0.5, batch_size=32, epochs=3, dtype="bfloat16", offline=True)
    with pytest.raises(ConfigError, match="--dtype must be one of float32, bfloat16, got 'float16'"):
        Config(dtype=np.float16)
    with pytest.raises(ConfigError, match="--batch-size must be a positive integer"):
        Config(batch_size=np.int64(0))


def test_recipe_ingredients_take_numpy_scalars():
    # A sweep over an ingredient (np.arange for --crop-pad, np.float32 decays) as over a run setting:
    # refused before as "must be an integer"/"must be in [0, 1)", and an np.bool_ was no JSON.
    c = Config.for_recipe("best", {"crop_pad": np.arange(4)[3], "ema_decay": np.float32(0.5),
                                   "flip": np.bool_(False), "erase_prob": np.float64(0.5)})
    r = c.recipe
    assert (r.crop_pad, r.ema_decay, r.flip, r.erase_prob) == (3, 0.5, False, 0.5)
    assert [type(v) for v in (r.crop_pad, r.ema_decay, r.flip, r.erase_prob)] == [int, float, bool, float]
    assert c == Config.for_recipe("best", {"crop_pad": 3, "ema_decay": 0.5, "flip": False, "erase_prob": 0.5})
    json.dumps(c.to_dict())  # results.json's config
    with pytest.raises(ConfigError, match=re.escape("--crop-pad must be an integer in [0, 14], got 15")):
        Config.for_recipe("best", {"crop_pad": np.int64(15)})


def test_the_training_examples_and_steps_per_epoch_are_train_pys():
    # 60,000 = 234 x 256 + 96: 235 steps, the last one smaller (what the schedules count in).
    assert (Config().train_examples, Config().steps_per_epoch) == (60_000, 235)
    c = Config(train_limit=1000, val_split=100, batch_size=64)
    assert (c.train_examples, c.steps_per_epoch) == (900, 15)
    assert Config(dataset="cifar10", batch_size=50_000).steps_per_epoch == 1


def test_a_recipes_config_has_the_recipes_run_settings_as_train_py_gives_them():
    # Config(recipe=BEST) keeps the chapter's 10 epochs of batch 256 at lr 0.05; for_recipe is --recipe best.
    from resnet_jax import cli
    from resnet_jax.recipes import BEST

    best = Config.for_recipe("best")
    assert best == Config(recipe=BEST, epochs=32, batch_size=512, lr=0.4, resize=96)
    assert best == cli.config_from_args(cli.build_parser().parse_args(["--recipe", "best"])).replace(output=None)
    smaller = Config.for_recipe("best", {"ema_decay": 0.0}, batch_size=256, seed=3)
    assert (smaller.lr, smaller.recipe.ema_decay, smaller.seed, smaller.epochs) == (0.2, 0.0, 3, 32)
    assert Config.for_recipe("d2l") == Config() and Config.for_recipe("d2l", batch_size=64).lr == 0.05
    with pytest.raises(ConfigError, match="--recipe must be one of d2l, best, got 'fast'"):
        Config.for_recipe("fast")


def test_zero_epochs_with_an_output_folder_is_refused():
    # The folder it left could be neither resumed (no checkpoint) nor used again (its results.json).
    with pytest.raises(ConfigError, match="--epochs 0 trains nothing and saves no checkpoint: leave out --output"):
        Config(epochs=0, output="/tmp/somewhere")
    assert Config(epochs=0).epochs == 0  # without a folder: the untrained model evaluated


@pytest.mark.parametrize("dataset, size", [("fashion_mnist", 28), ("cifar10", 32)])
def test_the_resize_message_names_the_datasets_image_size(dataset, size):
    with pytest.raises(ConfigError, match=rf"--resize must be an integer in \[17, 512\] .*; {dataset}'s images are "
                                          rf"{size}x{size}\), got 600"):
        Config(dataset=dataset, resize=600)


@pytest.mark.parametrize("overrides, message", [
    ({"lr": 0.05}, "lr is a run setting, not an ingredient of the recipe: pass it as a keyword, "
                   "Config.for_recipe('best', lr=...)"),
    ({"ema": 0.9}, "'ema' is not an ingredient of a recipe; they are: momentum, nesterov, "),
])
def test_for_recipe_names_what_is_not_an_ingredient(overrides, message):
    # It was "TypeError: Recipe.__init__() got an unexpected keyword argument 'lr'".
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.for_recipe("best", overrides)
