"""``python train.py``: flags -> Config -> data -> fit -> report.

Exit codes: 0 done; 2 a bad flag (nothing was started); 1 the run could not be
done (no data, an unwritable --output...); 130
interrupted. A user's mistake gets one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from resnet_jax.config import DTYPES, MIN_RESIZE, Config, ConfigError
from resnet_jax.data import DATASETS
from resnet_jax.ops import IMPLS
from resnet_jax.recipes import BEST, RECIPES, RUN_DEFAULTS, SCHEDULES, resolve

# Flags that override one ingredient of --recipe; None (not given) keeps the recipe's value.
INGREDIENT_FLAGS = (
    "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "label_smoothing",
    "ema_decay", "tta_flip", "crop_pad", "flip", "erase_prob",
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """Something the user can fix; printed as one line, exit 1."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except a None one: there the help says what decides."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _recipe_default(key: str) -> str:
    return "default: the recipe's (" + ", ".join(f"{n} {RUN_DEFAULTS[n][key]}" for n in RECIPES) + ")"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the chapter's ResNet-18 on Fashion-MNIST (defaults: the d2l recipe, lr 0.05).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--recipe", default="d2l", choices=sorted(RECIPES),
                   help="d2l: the chapter's train_ch6; best: the recipe below (resnet_jax/recipes.py)")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the training set; {_recipe_default('epochs')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per SGD step; {_recipe_default('batch_size')}")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak SGD learning rate; {_recipe_default('lr')}, best's scaled linearly with --batch-size")
    p.add_argument("--resize", type=int, default=None,
                   help=f"image side after bilinear resize (>= {MIN_RESIZE}); {_recipe_default('resize')}")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation and the epoch shuffles")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=sorted(DATASETS), help="TFDS dataset")
    g.add_argument("--data-dir", default=None, help="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--manual-dir", default=None, help="folder with the dataset's four official .gz files, for offline use")
    g.add_argument("--offline", action="store_true", help="never try to download; fail with instructions instead")
    g.add_argument("--train-limit", type=int, default=None, metavar="N", help="use only the first N training examples")
    g.add_argument("--test-limit", type=int, default=None, metavar="N", help="use only the first N test examples")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR", help="write metrics.jsonl and results.json here")
    g.add_argument("--json", action="store_true", help="print one final JSON line on stdout (reports go to stderr)")
    g = p.add_argument_group("performance (same math)")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="computation dtype; parameters stay float32")
    g.add_argument("--steps-per-dispatch", type=int, default=d.steps_per_dispatch, help="training steps per jitted call (default: 32 on GPU/TPU, 1 on CPU, where XLA's loops are slow)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per evaluation batch")
    g.add_argument("--conv-impl", default=d.conv_impl, choices=IMPLS, help="convolution lowering (see resnet_jax/ops.py)")
    g = p.add_argument_group("recipe ingredients (default: the --recipe's value; d2l has them all off)")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (best {BEST.momentum})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help=f"Nesterov momentum (best {_on(BEST.nesterov)})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"L2 weight decay on conv/dense kernels, not BatchNorm or biases (best {BEST.weight_decay})")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help=f"learning-rate schedule (best {BEST.schedule})")
    g.add_argument("--warmup-epochs", type=float, default=None, help=f"linear warmup from 0, in epochs (best {BEST.warmup_epochs})")
    g.add_argument("--label-smoothing", type=float, default=None, help=f"label smoothing of the loss (best {BEST.label_smoothing})")
    g.add_argument("--ema-decay", type=float, default=None, help=f"EMA of weights and BatchNorm statistics, used for evaluation; 0 off (best {BEST.ema_decay})")
    g.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None, help=f"average test logits over a left-right flip (best {_on(BEST.tta_flip)})")
    g.add_argument("--crop-pad", type=int, default=None, help=f"random translation by up to N pixels (zero-padded crop) of the 28x28 image (best {BEST.crop_pad})")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help=f"random left-right flips (best {_on(BEST.flip)})")
    g.add_argument("--erase-prob", type=float, default=None, help=f"probability of random erasing (best {BEST.erase_prob})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    recipe, run = resolve(
        args.recipe, {k: getattr(args, k) for k in INGREDIENT_FLAGS},
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, resize=args.resize,
    )
    return Config(
        recipe=recipe,
        dataset=args.dataset,
        epochs=run["epochs"],
        batch_size=run["batch_size"],
        lr=run["lr"],
        resize=run["resize"],
        seed=args.seed,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        offline=args.offline,
        output=args.output,
        dtype=args.dtype,
        steps_per_dispatch=args.steps_per_dispatch,
        eval_batch_size=args.eval_batch_size,
        conv_impl=args.conv_impl,
    )


def _check_writable_dir(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path} is not a writable directory: {err.strerror or err}") from err


def check_paths(config: Config) -> None:
    """Everything about files that can be checked before any work."""
    if config.output:
        _check_writable_dir(Path(config.output), "--output")
    if config.manual_dir and not Path(config.manual_dir).expanduser().is_dir():
        raise UserError(f"--manual-dir {config.manual_dir} is not a directory")


def _write_json_atomically(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def run(config: Config, json_line: bool = False) -> int:
    """The whole job for a validated config. Returns the exit code."""
    out = sys.stderr if json_line else sys.stdout
    say = lambda msg: print(msg, file=out, flush=True)
    check_paths(config)

    # Heavy imports only once the flags are known to be good: --help and bad
    # flags answer at once.
    import jax
    from tqdm import tqdm

    from resnet_jax import data as data_mod
    from resnet_jax import training

    spec = DATASETS[config.dataset]
    t0 = time.perf_counter()
    try:
        train, test = data_mod.load(
            spec, config.data_dir, config.manual_dir, config.offline, log=lambda m: say(f"data: {m}")
        )
    except data_mod.DataError as err:
        raise UserError(str(err)) from err
    train, test = train.take(config.train_limit), test.take(config.test_limit)
    say(f"data: {spec.tfds_name} {len(train)} train / {len(test)} test examples, loaded in {time.perf_counter() - t0:.1f} s")

    model = training.make_model(config, spec.num_classes, spec.channels)
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    tx = training.make_optimizer(config, steps_per_epoch=math.ceil(len(train) / config.batch_size))
    state = training.create_train_state(model, tx, init_key, recipe=config.recipe)

    metrics_file = None
    if config.output:
        out_dir = Path(config.output)
        metrics_file = open(out_dir / "metrics.jsonl", "w")

    bar = None

    def on_start(info):
        say(
            f"training on {info['device']} (JAX {jax.__version__}, {info['backend']} backend): "
            f"{config.epochs} epochs x {info['steps_per_epoch']} steps of {config.batch_size}, "
            f"{config.resize}x{config.resize}, lr {config.lr:g}, {config.dtype}, recipe {config.recipe.name}; "
            f"compiled in {info['compile_s']:.1f} s"
        )

    def on_progress(done, total, last):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
        bar.update(done - bar.n)
        if last is not None:
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.3f}", refresh=False)

    def on_epoch(rec):
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None
        say(
            f"epoch {rec['epoch']}/{config.epochs}: loss {rec['train_loss']:.3f}, train acc {rec['train_acc']:.3f}, "
            f"test acc {rec['test_acc']:.3f} ({rec['epoch_train_s']:.1f} s, {rec['examples_per_sec']:.1f} examples/sec)"
        )
        if metrics_file:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    try:
        result = training.fit(config, train, test, state, training.Hooks(on_start, on_progress, on_epoch))
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()

    f = result.final
    say(f"loss {_fmt(f['train_loss'])}, train acc {_fmt(f['train_acc'])}, test acc {_fmt(f['test_acc'])}")
    say(f"{_fmt(f['examples_per_sec'], '.1f')} examples/sec on {f['device']}")

    report = {**f, "config": config.to_dict(), "jax_version": jax.__version__}
    if config.output:
        _write_json_atomically(Path(config.output) / "results.json", report)
        say(f"metrics written to {config.output}/metrics.jsonl and results.json")
    if json_line:
        print(json.dumps(report), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's message on malformed flags
    try:
        config = config_from_args(args)
    except ConfigError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(config, json_line=args.json)
    except UserError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
