"""``python train.py``: flags -> Config -> data -> fit -> report.

``python train.py evaluate ...`` and ``python train.py predict ...`` use a
trained run's checkpoint instead (resnet_jax/commands.py).

Exit codes: 0 done; 2 a bad flag (nothing was started); 1 the run could not be
done (no data, an unwritable --output, a bad PyTorch checkpoint...); 130
interrupted (Ctrl-C); 143 terminated (SIGTERM); 141 stdout's reader went away
(``| head``), as for a program that SIGPIPE ends. A user's mistake gets one line
on stderr, never a traceback (resnet_jax/console.py).

Read in this order: :func:`main` (flags -> Config), :func:`run` (paths checked,
resnet_jax/rundir.py), :func:`_run` (processes, devices, checkpoints opened),
:func:`_train` (data, state, ``training.fit``, the report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from resnet_jax import files, interrupts, processes, rundir, xla_cache
from resnet_jax.config import DTYPES, MAX_RESIZE, MIN_RESIZE, Config, ConfigError
from resnet_jax.console import (EXIT_OK, EXIT_USAGE, OneLineParser, OutputLost, counted, emit, native_stdout_to_stderr,
                                out_of_memory, report_errors)
from resnet_jax.data import DATASETS
from resnet_jax.errors import RunWideError, UserError, check_writable_dir, first_line
from resnet_jax.interrupts import Interrupted
from resnet_jax.ops import IMPLS
from resnet_jax.recipes import BEST, RECIPES, RUN_DEFAULTS, SCHEDULES


# Flags that override one ingredient of --recipe; None (not given) keeps the recipe's value.
INGREDIENT_FLAGS = (
    "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "label_smoothing",
    "ema_decay", "tta_flip", "crop_pad", "flip", "erase_prob",
)


COMMANDS = ("evaluate", "predict")  # train.py's other commands; anything else trains


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
    p = OneLineParser(
        prog="train.py",
        description="Train the chapter's ResNet-18 on Fashion-MNIST (defaults: the d2l recipe, lr 0.05).",
        epilog="Other commands: 'train.py evaluate RUN_DIR' (test metrics, per-class accuracy, confusion matrix) "
        "and 'train.py predict RUN_DIR FILES...' (top-k classes of images); see their --help.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--recipe", default="d2l", choices=sorted(RECIPES),
                   help="d2l: the chapter's train_ch6; best: the recipe below (resnet_jax/recipes.py)")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the training set; {_recipe_default('epochs')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per SGD step; {_recipe_default('batch_size')}")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak SGD learning rate; {_recipe_default('lr')}, best's scaled linearly with --batch-size")
    p.add_argument("--resize", type=int, default=None,
                   help=f"image side after bilinear resize ({MIN_RESIZE} to {MAX_RESIZE}); {_recipe_default('resize')}")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation, the epoch shuffles and the augmentation")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=sorted(DATASETS), help="TFDS dataset")
    g.add_argument("--data-dir", default=None, help="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--manual-dir", default=None, help="folder with the dataset's official files as downloaded (README: Other datasets), for offline use")
    g.add_argument("--offline", action="store_true", help="never try to download; fail with instructions instead")
    g.add_argument("--train-limit", type=int, default=None, metavar="N", help="use only the first N training examples (in TFDS's order, the same on every machine)")
    g.add_argument("--test-limit", type=int, default=None, metavar="N", help="use only the first N test examples (in TFDS's order, the same on every machine)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR", help="run directory: a checkpoint after every epoch, metrics.jsonl, results.json, curves.png")
    g.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --output (--epochs may change with a constant learning rate; --keep, --log-every, --offline, --eval-batch-size, --output and the data and --export-torch paths may change; the rest must match, --init-from-torch too: the path the run started from, which is not read again)")
    g.add_argument("--keep", type=int, default=None, metavar="K", help=f"latest checkpoints kept in --output (default: {d.keep})")
    g.add_argument("--val-split", type=int, default=d.val_split, metavar="N", help="hold out the last N training examples; keep the checkpoint of best accuracy on them in --output/best (default: off, the chapter's recipe)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="N", help="also log train loss/acc every N steps, and at each epoch's end, to --output's metrics.jsonl (rounded up to whole dispatches)")
    g.add_argument("--json", action="store_true", help="print one final JSON line on stdout (reports go to stderr)")
    g = p.add_argument_group("PyTorch weights", "state_dicts of the chapter's nn.Sequential net (needs torch)")
    g.add_argument("--init-from-torch", default=None, metavar="FILE.pt", help="start from this state_dict; the step count continues from its num_batches_tracked")
    g.add_argument("--export-torch", default=None, metavar="FILE.pt", help="write the final model (with EMA on, the moving average: the model evaluated) as a state_dict that load_state_dict(strict=True) accepts")
    g = p.add_argument_group(
        "several hosts (jax.distributed)",
        "start the same command on every host; all devices of all hosts form one mesh; process 0 prints and writes",
    )
    g.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with the cluster's own settings (SLURM, TPU pods, ...)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0 (with --num-processes and --process-id)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in all")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1")
    g.add_argument("--init-timeout", type=int, default=None, metavar="S",
                   help=f"seconds the processes wait for each other at the start (default {processes.INIT_TIMEOUT_S}, JAX's)")
    g = p.add_argument_group(
        "performance", "the same model and recipe; all but --compile-cache change the numbers a little "
        "(rounding: sums in another order, and bf16's)")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="computation dtype; parameters stay float32")
    g.add_argument("--steps-per-dispatch", type=int, default=d.steps_per_dispatch, help="training steps per jitted call (default: 32 on GPU/TPU, 1 on CPU, where XLA's loops are slow)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per evaluation batch")
    g.add_argument("--conv-impl", default=d.conv_impl, choices=IMPLS, help="convolution lowering (see resnet_jax/ops.py)")
    g.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="keep XLA's compiled programs here for later runs of the same shapes (default: "
                        "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/resnet_jax/xla or ~/.cache/resnet_jax/xla); "
                        "'off': compile afresh")
    g = p.add_argument_group("recipe ingredients (default: the --recipe's value; d2l has them all off)")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (best {BEST.momentum})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help=f"Nesterov momentum (best {_on(BEST.nesterov)})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"L2 weight decay on conv/dense kernels, not BatchNorm or biases (best {BEST.weight_decay})")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help=f"learning-rate schedule (best {BEST.schedule})")
    g.add_argument("--warmup-epochs", type=float, default=None, help=f"warmup, in epochs: linear from 0 (constant, cosine); with onecycle, its cosine rise from lr/25 (best {BEST.warmup_epochs})")
    g.add_argument("--label-smoothing", type=float, default=None, help=f"label smoothing of the loss (best {BEST.label_smoothing})")
    g.add_argument("--ema-decay", type=float, default=None, help=f"EMA of weights and BatchNorm statistics, used for evaluation; 0 off (best {BEST.ema_decay})")
    g.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None, help=f"average test logits over a left-right flip (best {_on(BEST.tta_flip)})")
    g.add_argument("--crop-pad", type=int, default=None, help=f"random translation by up to N pixels (zero-padded crop) of the stored image, 28x28 for Fashion-MNIST (best {BEST.crop_pad})")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help=f"random left-right flips (best {_on(BEST.flip)})")
    g.add_argument("--erase-prob", type=float, default=None, help=f"probability of random erasing (best {BEST.erase_prob})")
    return p


def _path(value: str | None) -> str | None:
    """A path flag made absolute, ``~`` expanded (the shell does not expand ``--flag=~/x``), once, for every use.

    Absolute because Orbax refuses relative checkpoint paths, and because the run records
    its data folders: ``train.py evaluate`` may be run from another folder. (An empty value
    stays empty, for Config to refuse.)
    """
    if value is None or not value.strip():
        return value
    return os.path.abspath(os.path.expanduser(value))


# Flags that only say what to do in --output: given without it, they would do nothing.
OUTPUT_FLAGS = {"keep": "it counts the checkpoints kept there", "log_every": "its records go to DIR/metrics.jsonl"}


def config_from_args(args: argparse.Namespace) -> Config:
    if not args.output:
        for name, why in OUTPUT_FLAGS.items():
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} needs --output DIR ({why})")
    config = Config.for_recipe(
        args.recipe,
        {k: getattr(args, k) for k in INGREDIENT_FLAGS},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        resize=args.resize,
        dataset=args.dataset,
        seed=args.seed,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        data_dir=_path(args.data_dir),
        manual_dir=_path(args.manual_dir),
        offline=args.offline,
        output=_path(args.output),
        resume=args.resume,
        keep=Config.keep if args.keep is None else args.keep,
        val_split=args.val_split,
        log_every=args.log_every,
        dtype=args.dtype,
        steps_per_dispatch=args.steps_per_dispatch,
        eval_batch_size=args.eval_batch_size,
        conv_impl=args.conv_impl,
        init_from_torch=_path(args.init_from_torch),
        export_torch=_path(args.export_torch),
    )
    # recipes.schedule rounds the warmup to whole steps: less than half a step was no warmup at all,
    # without a word (--warmup-epochs 0.05 at 8 steps per epoch). Refused here, as a flag, not in
    # Config: a run trained so before stays loadable (evaluate, predict) and resumable.
    w, steps = config.recipe.warmup_epochs, config.steps_per_epoch
    if config.epochs and w and not config.resume and round(w * steps) == 0:
        raise ConfigError(f"--warmup-epochs {w:g} is {w * steps:.2g} of a step at {steps} steps per epoch, which rounds "
                          f"to no warmup: give 0 for none, or at least {1 / steps:.3g} (one step)")
    return config


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


class MetricsNotWritten(Exception):
    """metrics.jsonl could not be written during training (the run stops; its checkpoints stand)."""


class _Reporter:
    """What a training run shows and logs: the console lines, a progress bar, metrics.jsonl.

    on_start, on_progress and on_log are fit's hooks (training.Hooks); on_epoch is called by
    _train's on_checkpoint hook, with the save. Every record also goes into ``log``
    (the checkpoints keep it, so that a resumed run's metrics.jsonl is whole).
    """

    def __init__(self, config: Config, say, main_process: bool, log: list):
        self.config, self.say, self.main_process, self.log = config, say, main_process, log
        self.bar = None
        self.metrics_file = None
        if config.output and main_process:
            path = Path(config.output) / files.METRICS
            # A resumed run's metrics are the checkpoint's records, then its own: anything
            # logged after the checkpoint (an epoch that did not finish) is rewritten. (In place:
            # where it cannot be, the next --resume writes it again from the checkpoint.)
            # Opened once: a named pipe (metrics.jsonl made with mkfifo, read by a live plotter)
            # sees its reader's end of file when the writer closes, and a second open would wait
            # for a reader that has gone.
            try:
                self.metrics_file = open(path, "w")
                self.metrics_file.writelines(json.dumps(r) + "\n" for r in log)
                self.metrics_file.flush()
            except OSError as err:
                self.close_metrics()
                raise UserError(f"cannot write {path}: {err.strerror or err}") from err
            self.metrics_whole = self._whole()

    def _whole(self) -> int | None:
        """The bytes of whole records in metrics.jsonl; None where the file has no position
        (a link to /dev/stderr, say: nothing to cut back there)."""
        try:
            return self.metrics_file.tell()
        except OSError:  # io.UnsupportedOperation
            return None

    def record(self, rec: dict) -> None:
        self.log.append(rec)
        if self.metrics_file:
            try:
                self.metrics_file.write(json.dumps(rec) + "\n")
                self.metrics_file.flush()
                if self.metrics_whole is not None:
                    self.metrics_whole = self._whole()
            except OSError as err:  # a disk filled by another program, a lost mount...
                self.close_metrics()
                # What fitted of the record (up to a buffer's boundary) would be a torn last line that
                # json.loads refuses: the file goes back to its last whole record.
                path = Path(self.config.output) / files.METRICS
                if self.metrics_whole is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(path, self.metrics_whole)
                raise MetricsNotWritten(f"cannot write {path}: {err.strerror or err}") from err

    def on_start(self, info: dict) -> None:
        import jax

        interrupts.check()

        c = self.config
        self.say(
            f"training on {info['device']} (JAX {jax.__version__}, {info['backend']} backend): "
            f"{counted(c.epochs, 'epoch')} x {counted(info['steps_per_epoch'], 'step')} of {info['batch_size']}, "
            f"{c.resize}x{c.resize}, lr {c.lr:g}, {c.dtype}, recipe {c.recipe.name}; "
            f"compiled in {info['compile_s']:.1f} s"
        )
        if info["backend"] == "cpu" and info["steps_per_dispatch"] > 1:
            self.say(
                f"note: --steps-per-dispatch {info['steps_per_dispatch']} on CPU, where XLA runs a step inside a loop "
                "many times slower than on its own (1 is the default there; BENCHMARKS.md, \"Steps per dispatch on CPU\")"
            )

    def on_progress(self, done: int, total: int, last: dict | None) -> None:
        interrupts.check()  # a Ctrl-C that something swallowed (resnet_jax/interrupts.py)
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True,
                            disable=None if self.main_process else True)
        self.bar.update(done - self.bar.n)
        if last is not None:
            self.bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.3f}", refresh=False)

    def on_epoch(self, rec: dict) -> None:
        self.close_bar()
        val = f", val acc {rec['val_acc']:.3f}" if "val_acc" in rec else ""
        self.say(
            f"epoch {rec['epoch']}/{self.config.epochs}: loss {rec['train_loss']:.3f}, train acc {rec['train_acc']:.3f}, "
            f"test acc {rec['test_acc']:.3f}{val} ({rec['epoch_train_s']:.1f} s, {rec['examples_per_sec']:.1f} examples/sec)"
        )
        self.record({"kind": "epoch", **rec})

    def on_log(self, rec: dict) -> None:
        self.record({"kind": "steps", **rec})

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close_metrics(self) -> None:
        if self.metrics_file:
            with contextlib.suppress(OSError):  # already reported, or a run's error is on its way
                self.metrics_file.close()
            self.metrics_file = None

    def close(self) -> None:
        self.close_bar()
        self.close_metrics()


def _read_torch_init(config: Config, spec):
    """--init-from-torch's (variables, batch counters), read and checked before the data: fail early."""
    if not config.init_from_torch or config.resume:  # a resumed run's checkpoint holds the weights
        return None
    from resnet_jax import convert

    try:
        return convert.load_torch_checkpoint(config.init_from_torch, spec.num_classes, spec.channels)
    except convert.ConversionError as err:
        raise UserError(f"--init-from-torch {err}") from err  # err starts with the path


def _load_data(config: Config, spec, say):
    """(train, test, val or None) as the flags select them."""
    from resnet_jax import data as data_mod

    t0 = time.perf_counter()
    try:
        train, test = data_mod.load(
            spec, config.data_dir, config.manual_dir, config.offline, log=lambda m: say(f"data: {m}"),
            arg_names=data_mod.FLAG_NAMES,
        )
    except data_mod.DataError as err:
        raise UserError(str(err)) from err
    train, test = train.take(config.train_limit), test.take(config.test_limit)
    val = None
    if config.val_split:
        train, val = train.hold_out(config.val_split)
    held = f" ({len(val)} more held out for validation)" if val is not None else ""
    say(f"data: {spec.tfds_name} {len(train)} train / {len(test)} test examples{held}, loaded in {time.perf_counter() - t0:.1f} s")
    return train, test, val


def _fresh_state(config: Config, init, say):
    """The train state before the first step: PyTorch's init (in distribution), or --init-from-torch's weights."""
    from resnet_jax import training

    # The schedule counts in Config.steps_per_epoch, as load_for_inference rebuilds it.
    state = training.initial_state(config, init[0] if init else None)
    if init:
        # PyTorch's BatchNorm counters are the number of training steps the weights have had
        # (resnet_jax/convert.py); continuing that count keeps --export-torch's counters true.
        # One step count for all layers (every BatchNorm runs once per step): where the file's
        # counters disagree (layers trained apart), the run goes on from the largest.
        counts = init[1] if isinstance(init[1], int) else max(init[1].values())
        state = state.replace(step=counts)
        disagree = "" if isinstance(init[1], int) else ", the largest of its BatchNorm counters, which differ"
        say(f"init: weights from {config.init_from_torch} (step {counts}{disagree})")
    return state


def _export_torch(config: Config, state, say) -> None:
    """--export-torch: the final model, the one whose accuracy the run reported, as the chapter's PyTorch state_dict.

    With EMA on that is the moving average of the weights and its BatchNorm statistics (what
    evaluation runs), not the last step's weights. Flip averaging is part of evaluation, not of
    the weights: a PyTorch user averages ``net(x)`` and ``net(x.flip(-1))`` to get it.
    """
    import jax

    from resnet_jax import convert, training

    rundir.check_export_unchanged(config)  # a file another program wrote there since the start stays
    variables = jax.device_get(training.evaluated_variables(state))
    what = "the weights' moving average (EMA), the model evaluated" if state.ema_params is not None else "the final weights"
    # A Ctrl-C or SIGTERM inside torch.save broke its zip writer: a traceback, or a signal lost.
    # Held until the file is whole and named; then it ends the run (130 or 143) as anywhere else.
    with interrupts.deferred():
        try:
            # Every BatchNorm ran once per step: state.step is PyTorch's num_batches_tracked.
            convert.save_torch_checkpoint(config.export_torch, variables, int(jax.device_get(state.step)),
                                          replace=rundir.export_may_replace(config))
        except FileExistsError as err:  # written by another program since check_export_unchanged looked
            raise rundir.export_taken(config) from err
        except Exception as err:  # OSError, or torch's RuntimeError around one (a full disk)
            cause = err if isinstance(err, OSError) else err.__context__ if isinstance(err.__context__, OSError) else err
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause)
            # After the whole training: say that it is not lost, and how to export it once the cause is fixed.
            kept = f"; {rundir.export_kept(config)}" if config.output else ""
            raise UserError(f"--export-torch {config.export_torch}: not written: {why}{kept}") from err
        if config.output:
            rundir.record_export(config)
        say(f"exported {what} as a PyTorch state_dict to {config.export_torch}")


def run(config: Config, json_line: bool = False, distributed: dict | None = None,
        compile_cache: tuple[Path | None, str] | None = None) -> int:
    """The whole job for a validated config: check, load, build or restore, train, write. Returns the exit code.

    ``compile_cache``: :func:`xla_cache.setting`'s answer; None leaves JAX's cache as it is.
    """
    out = sys.stderr if json_line else sys.stdout
    quiet = False

    def say(msg: str) -> None:
        # A console that goes away (`train.py | head`, a full disk) must not stop the training:
        # its lines stop, the run and its files go on.
        nonlocal quiet
        if quiet:
            return
        try:
            emit(msg, file=out)
        except OutputLost as err:
            quiet = True
            kept = f"; its records go on to {config.output}/metrics.jsonl" if config.output else ""
            with contextlib.suppress(OSError):
                print(f"train.py: note: cannot write to {err.stream} ({err}): "
                      f"the run goes on without its lines{kept}", file=sys.stderr, flush=True)

    if compile_cache is not None and compile_cache[1] and compile_cache[0] is not None:
        check_writable_dir(compile_cache[0], compile_cache[1])  # a named folder: refused before any work
    made = rundir.first_missing(config.output)  # what rundir.check_paths creates, removed again if the run fails empty
    rundir.check_paths(config)  # last: it makes the --output folder
    try:
        return _run(config, json_line, distributed, compile_cache, out, say)
    except rundir.OutputBusy:  # the folders are the running run's, empty or not
        raise
    except BaseException:
        rundir.remove_empty_folders(made)
        raise


def _run(config: Config, json_line: bool, distributed, compile_cache, out, say) -> int:
    """run() once the paths are checked."""

    # Orbax, Flax and the rest of training only once the flags are known to be good:
    # --help and a bad flag answer in about a second (JAX itself comes with resnet_jax.config).
    # A Ctrl-C inside these imports waits for their end (resnet_jax/interrupts.py); imported
    # here for that, ahead of the functions below, whose own imports then cost nothing.
    with interrupts.deferred():
        import jax

        from resnet_jax import checkpoint as ckpt_mod
        from resnet_jax import training  # noqa: F401  (for _train, under the deferral)

    with native_stdout_to_stderr(json_line), contextlib.ExitStack() as stack:
        # Every process trains (and joins Orbax's checkpoint saves); only process 0 speaks and writes files.
        main_process = processes.start(distributed)
        if not main_process:
            say = lambda msg: None
        if compile_cache is not None:  # before anything compiles
            stack.enter_context(xla_cache.repairing(xla_cache.use(compile_cache, say), say))
        # From here on every process talks to the others: one that is gone is one line (training's
        # own handler, in _train, also says which checkpoint is intact).
        stack.enter_context(processes.lost_process_is_one_line())
        processes.check_same_settings(config, distributed)
        processes.check_shared_output(config)  # before the first save would wait for a part that never comes
        if config.output:
            rundir.hold_output(config, stack, main_process)  # before looking at what is there: two runs in one folder would mix their files

        n_dev = jax.device_count()
        if config.batch_size % n_dev:
            raise RunWideError(f"--batch-size {config.batch_size} does not split evenly over the {n_dev} devices; "
                               f"use a multiple of {n_dev}")

        # Everything that can be checked without the data first: a wrong file or --resume fails at once.
        spec = DATASETS[config.dataset]
        if config.resume and not rundir.holds_a_run(Path(config.output)):
            # Nothing to continue yet (a first start, or a run stopped before its first checkpoint):
            # a script that always passes --resume starts the run, as it would have without the flag:
            # --init-from-torch, skipped by rundir.check_paths on --resume, is checked and read after all.
            say(f"--resume: {config.output} holds no checkpoint yet: starting the run at epoch 1")
            config = config.replace(resume=False)
            rundir.check_torch_paths(config)
        init = _read_torch_init(config, spec)
        meta = ckpt_mod.metadata(config, spec)
        ckpts = rundir.open_checkpoints(config, meta)
        try:
            document = _train(config, spec, init, meta, ckpts, say, json_line, main_process)
        finally:
            if ckpts is not None:  # on every way out: its threads must not outlive the run
                ckpts.close()
    if json_line and main_process:
        emit(json.dumps(files.json_safe(document), allow_nan=False))
    return EXIT_OK


def _train(config: Config, spec, init, meta: dict, ckpts, say, json_line: bool, main_process: bool) -> dict | None:
    """run()'s second half: load the data, build or restore the state, train, write the run's files.

    Returns the run's report, which --json prints (for a finished run: its results.json, read only for --json).
    """
    import jax

    from resnet_jax import checkpoint as ckpt_mod
    from resnet_jax import training

    failed = None
    try:
        train, test, val = _load_data(config, spec, say)
        interrupts.check()
        state = _fresh_state(config, init, say)
    except UserError as err:
        if jax.process_count() == 1:
            raise
        failed = err  # said below, once the others know: else they would wait for this process
    # A host that prepares (or downloads) its data may come minutes late. The all-gather just
    # below waited for one 35 s late in our runs, but fit's first step did not (processes.py);
    # this wait bounds it at READY_TIMEOUT_S, with one line at the end of it.
    processes.wait_for_all("the training data")
    if processes.any_process(failed is not None):
        if failed is not None:
            raise RunWideError(str(failed)) from failed
        raise RunWideError("another process of this run could not load its data or build its state "
                           "(that process's line says why)")

    history, log = [], []  # fit's epoch records; every metrics.jsonl record
    resumed_at = None  # the epoch --resume continues after
    if config.resume:
        try:
            restored = ckpts.restore(state)
        except ckpt_mod.CheckpointError as err:
            raise UserError(f"--resume: {err}") from err
        state, history, log = restored.state, restored.history, restored.log
        try:
            if ckpts.repair_best(restored):
                say(f"best: saved epoch {restored.epoch}, the best so far, which the interrupted run had not")
        except ckpt_mod.CheckpointError as err:
            raise UserError(f"--resume: {err}") from err
        # A finished run: its results.json is already the right one. (A run stopped after its
        # last checkpoint has none, or the one of an earlier, shorter run that --resume
        # extended: it goes on below, trains nothing, and writes them.)
        if restored.epoch == config.epochs and rundir.results_epoch(config.output) == restored.epoch:
            say(f"{config.output} has trained all {counted(config.epochs, 'epoch')} (checkpoint {restored.path}): nothing to do; "
                "its results are in results.json. Give a larger --epochs to train on (constant learning rate only)")
            with _the_others_are_done():
                if config.export_torch and main_process:  # the way to export a run that finished without the flag
                    _export_torch(config, state, say)
                if not (json_line and main_process):
                    return None
                try:
                    return rundir.read_results(config.output)
                except (OSError, ValueError) as err:
                    raise UserError(f"--json: cannot read {config.output}/results.json: {err}") from err
        resumed_at = restored.epoch
        say(f"resuming from {restored.path} (epoch {restored.epoch} of {config.epochs})")
    # Room for the next checkpoint (and a best one) now, rather than after an epoch's work;
    # each save checks again (checkpoint.Checkpoints.save).
    if ckpts is not None and (problem := ckpts.room_problem(state, copies=2 if config.val_split else 1)):
        raise UserError(f"--output {config.output}: {problem}; free some space, or choose another --output")
    # And permission to write there (a read-only checkpoints/ was found by the first save): process 0
    # looks (the folder may be its own, on a file system the others do not share) and all hear it.
    if ckpts is not None:
        problem = ckpts.write_problem(config.epochs) if main_process else None
        if processes.any_process(problem is not None):
            raise UserError(f"--output {config.output}: {problem or 'process 0 cannot write its checkpoints (it says why)'}; "
                            "make it writable, or choose another --output")

    reporter = _Reporter(config, say, main_process, log)
    unsaved = None  # (state, history) while a save is under way, for a Ctrl-C that lands in it

    # fit calls on_checkpoint after each epoch; it reports the epoch (its line, metrics.jsonl)
    # and saves it, with a Ctrl-C or SIGTERM held until both are done (interrupts.deferred):
    # an epoch whose line was printed is then always kept. (fit's own on_epoch hook, called
    # before it, is left unset here: the report belongs with the save.)
    # (Without that, a signal between the line and the save lost the epoch, 1 in 12 tries.)
    def on_checkpoint(state, history):
        nonlocal unsaved
        with interrupts.deferred():
            reporter.on_epoch(history[-1])
            if ckpts is None:
                return
            unsaved = (state, list(history))
            for note in ckpts.save(state, history[-1]["epoch"], history, log, meta):
                say(f"note: {note}")
            unsaved = None

    hooks = training.Hooks(reporter.on_start, reporter.on_progress, on_log=reporter.on_log, on_checkpoint=on_checkpoint)
    try:
        result = training.fit(config, train, test, state, hooks, val=val, history=history)
    except KeyboardInterrupt:
        # The writer threads of a save that Ctrl-C cut short log their failure with a
        # traceback on the way out; this run is ending and its message says what is kept.
        ckpt_mod.quiet_abandoned_writes()
        reporter.close_bar()
        if unsaved is not None:  # interrupted while saving: the state is whole, save it again
            # ... without a second Ctrl-C breaking that save too (train.py then ignores
            # Ctrl-C while JAX's exit handlers run).
            # The cut-short save's writer threads may still be finishing in its temporary
            # folder, which the new save must first remove ("Directory not empty": 3 in 8
            # tries, Ctrl-C 0.08-0.12 s after an epoch's line): a few tries, half a second apart.
            with interrupts.ignored():
                epoch = unsaved[1][-1]["epoch"]
                for attempt in range(4):
                    try:
                        # The latest checkpoint may have been written whole before the signal
                        # (then only best/ may lack the epoch): it is not written twice.
                        ckpts.save(unsaved[0], epoch, unsaved[1], log, meta, best_only=ckpts.latest_epoch() == epoch)
                        break
                    except ckpt_mod.CheckpointError:  # in the end, the previous checkpoint stands
                        time.sleep(0.5)
        raise Interrupted(ckpts.latest_epoch() if ckpts else None, config.output) from None
    except training.NonFiniteLoss as err:
        kept = ckpts.latest_epoch() if ckpts else None
        where = (
            f"the last good checkpoint (epoch {kept}) in {config.output} is unchanged"
            if kept is not None else "no checkpoint was written"
        )
        # A resumed run keeps its --lr (differences() refuses another): with a checkpoint kept the
        # advice is a new folder; without one, the same folder takes a new run.
        retry = " in a new --output (a resumed run keeps its --lr)" if kept is not None else ""
        raise RunWideError(f"{err}: {where}; train again with a smaller --lr{retry}") from err  # the loss is every process's
    except ckpt_mod.CheckpointError as err:  # ProcessLost too: a process lost in a save
        # (Orbax's collectives find that at once, "by peer"; one of its barriers on JAX's
        # coordination service waits for the heartbeat timeout instead.)
        ckpt_mod.quiet_abandoned_writes()
        raise UserError(str(err)) from err
    except MetricsNotWritten as err:
        kept = ckpts.latest_epoch() if ckpts else None
        where = f"the checkpoint of epoch {kept} is intact: continue with --resume" if kept is not None else "no checkpoint was written"
        raise UserError(f"{err}; {where}") from err
    except RuntimeError as err:  # XLA's errors are RuntimeErrors; only running out of memory is the user's to fix
        kept = ckpts.latest_epoch() if ckpts else None
        if processes.lost_process(err):
            # A collective found another process gone (killed, preempted, its host down).
            after = ckpts.after_a_lost_process() if ckpts else "no checkpoint was written"
            raise UserError(f"another process of this run stopped ({first_line(err, 160)}); {after}") from err
        needed = out_of_memory(err)
        if needed is None:
            raise
        if kept is None:
            advice = "try a smaller --batch-size, --eval-batch-size or --resize"
        else:  # --resume takes a new --eval-batch-size; the others would train another run
            advice = (f"the checkpoint of epoch {kept} in {config.output} is intact: --resume continues it with a "
                      "smaller --eval-batch-size; a smaller --batch-size or --resize is a new run, in a new --output")
        raise UserError(f"out of memory on {jax.devices()[0].platform}: {needed}; {advice}") from err
    finally:
        reporter.close()

    f = result.final
    say(f"loss {_fmt(f['train_loss'])}, train acc {_fmt(f['train_acc'])}, test acc {_fmt(f['test_acc'])}")
    say(f"{_fmt(f['examples_per_sec'], '.1f')} examples/sec on {f['device']}")

    # Every epoch's record (fit's clock in wall_s): a script reads time to accuracy from the
    # --json line alone, without --output (whose checkpoint saves would add to that clock).
    # And what reproducing it needs beyond the config: the libraries, Python, the CPU (XLA:CPU's
    # speed differs threefold between machines) and the command line.
    report = {**f, "config": config.to_dict(), "jax_version": jax.__version__, "history": result.history,
              "versions": ckpt_mod.versions(), "python": platform.python_version(),
              "cpu": training.cpu_name(), "argv": sys.argv[1:]}
    exports = rundir.earlier_exports(config)  # a resumed run's exports stay its own (to write again)
    if exports:
        report["exports"] = exports
        # results.json lists them as the run's own (to write again), not as its final weights, which
        # a reader took them for: each holds the weights of the run's end when it was exported.
        # The one this run writes is not stale: named as the export will replace it (the link itself, not
        # its target: a symbolic link, or a hard one, to an earlier export leaves that one as it was).
        # One the user has since deleted holds nothing: not named (results.json keeps it, as the run's to write again).
        stale = [e for e in exports if os.path.lexists(e)
                 and not (config.export_torch and _entry(e) == _entry(config.export_torch))]
        if stale and resumed_at is not None and result.history and result.history[-1]["epoch"] > resumed_at:
            one = len(stale) == 1
            say(f"note: the PyTorch export{'' if one else 's'} {', '.join(stale)} of this run hold{'s' if one else ''} "
                f"the weights of epoch {resumed_at} or earlier, not these: --resume --export-torch FILE writes these")
    with _the_others_are_done():
        if config.output and main_process:
            rundir.write_run_files(config, report, log, say)
        if config.export_torch and main_process:  # after the results: a failed export loses nothing of the run
            _export_torch(config, result.state, say)
            report["exports"] = list(dict.fromkeys([*exports, config.export_torch]))  # as _export_torch recorded it
    return report


def _entry(path) -> Path:
    """``path`` as the folder entry a write replaces (os.replace renames over a link, not its target)."""
    return Path(path).absolute().parent.resolve() / Path(path).name


@contextlib.contextmanager
def _the_others_are_done():
    """Around what process 0 does alone after the run's last collective: its error is a RunWideError,
    since the other processes are on their way out (to JAX's shutdown barrier, resnet_jax/processes.py)."""
    try:
        yield
    except RunWideError:
        raise
    except UserError as err:
        raise RunWideError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    """train.py's entry: ``evaluate``/``predict`` go to resnet_jax/commands.py; otherwise the flags
    become a :class:`Config` (a bad one: exit 2) and :func:`run` trains. Returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        from resnet_jax import commands

        return commands.main(argv[0], argv[1:])
    if argv and not argv[0].startswith("-"):  # training takes no positional argument: a mistyped command?
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (the commands are {', '.join(COMMANDS)})"
        parser.error(f"unknown command '{argv[0]}'{hint}")
    args = parser.parse_args(argv)  # exits 2 with argparse's message on malformed flags
    try:
        config = config_from_args(args)
        distributed = processes.settings_from_args(args)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.compile_cache == "":
        parser.error("--compile-cache needs a folder, or 'off'")
    cache = xla_cache.setting(args.compile_cache)
    return report_errors(parser.prog, lambda: run(config, json_line=args.json, distributed=distributed, compile_cache=cache))
