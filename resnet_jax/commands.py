"""``train.py evaluate`` and ``train.py predict``: a trained run's checkpoint at work.

Both rebuild the model from the checkpoint's own metadata (dataset, classes,
channels, dtype, resize, conv lowering), never from flags that could disagree
with it, and run it through training.py's eval path: ``evaluate`` through
:func:`resnet_jax.training.evaluate_split`, the very computation the training
loop reports after each epoch, so its numbers are the loop's for the same
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from resnet_jax import files, interrupts, rundir
from resnet_jax.console import EXIT_OK, OneLineParser, emit, out_of_memory, report_errors
from resnet_jax.errors import UserError, check_output_file, check_writable_dir


def _positive_int(text: str) -> int:
    """argparse's type for a count: refused with the flag's name before any work (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output directory")
    p.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="the latest checkpoint (default), or the best by validation accuracy (runs trained with --val-split)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout" + (
        " (also when the confusion-matrix PNG then cannot be written: its confusion_png is null, and "
        "--confusion-png's failure still exits 1)" if p.prog.endswith("evaluate") else ""))
    p.add_argument("--eval-batch-size", type=_positive_int, default=None, metavar="N",
                   help="images the model takes at once (default: the run's); a smaller N needs less memory")


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train.py evaluate",
        description="Test loss and accuracy of a checkpoint, accuracy per class, and a confusion-matrix PNG. "
        "The model and test set are the checkpoint's own (dataset, --test-limit); the data flags only say where the data is.",
    )
    _common(p)
    p.add_argument("--data-dir", default=None, help="TFDS data_dir (default: the run's)")
    p.add_argument("--manual-dir", default=None, help="folder with the dataset's official files (default: the run's)")
    p.add_argument("--offline", action="store_true", help="never try to download (a run trained --offline never does anyway)")
    p.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="only the first N test examples (default: as in training, so the numbers are the loop's)")
    p.add_argument("--confusion-png", default=None, metavar="PATH",
                   help="where the confusion matrix goes (default: RUN_DIR/confusion_<which>.png, replaced as the "
                        "run's own); a file already at PATH is replaced only if it is a confusion matrix evaluate wrote")
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train.py predict",
        description="The top-k classes, with probabilities, of image files (PNG, JPEG... any size, grey or colour, "
        "converted as the training data was) or .npy batches, by a trained checkpoint.",
    )
    _common(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="image files, or .npy arrays at the dataset's native size")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown per input (default: 3)")
    return p


def _load(run_dir: str, which: str):
    with interrupts.deferred():  # the heavy imports (resnet_jax/interrupts.py), the commands' too
        from resnet_jax import data, images, metrics, plots, training  # noqa: F401
        from resnet_jax.checkpoint import CheckpointError, load_for_inference

    try:
        return load_for_inference(run_dir, which)
    except CheckpointError as err:
        raise UserError(str(err)) from err


def _describe(ckpt) -> str:
    c = ckpt.config
    return f"checkpoint {ckpt.path}: epoch {ckpt.epoch}, {c.dataset}, {c.resize}x{c.resize}, {c.dtype}"


def _eval_batch_size(args: argparse.Namespace, config) -> int:
    return config.eval_batch_size if args.eval_batch_size is None else args.eval_batch_size


def evaluate_command(args: argparse.Namespace) -> int:
    ckpt = _load(args.run_dir, args.which)
    from resnet_jax import data as data_mod  # imported by _load, under its deferral: no cost here
    from resnet_jax import metrics, plots, training

    config = ckpt.config.replace(eval_batch_size=_eval_batch_size(args, ckpt.config))
    spec = data_mod.DATASETS[config.dataset]
    limit = args.test_limit if args.test_limit is not None else config.test_limit
    if limit is not None and not 0 < limit <= spec.num_test:
        raise UsageError(f"--test-limit must be in 1..{spec.num_test}, got {limit}")
    for flag, value in (("--data-dir", args.data_dir), ("--manual-dir", args.manual_dir),
                        ("--confusion-png", args.confusion_png)):
        if value is not None and not value.strip():  # as train.py: not a silent fall back to the default
            raise UsageError(f"{flag} is empty; give a path, or leave the flag out")
    for flag, value in (("--data-dir", args.data_dir), ("--manual-dir", args.manual_dir)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise UserError(f"{flag} {value} is not a directory")
    if args.data_dir:  # as train.py
        rundir.check_not_among_checkpoints(Path(args.data_dir), "--data-dir", "folder")
    if args.manual_dir and not Path(args.manual_dir).is_dir():  # as train.py (it was ignored when the data was there)
        raise UserError(f"--manual-dir {args.manual_dir} is not a directory")
    out = sys.stderr if args.json else sys.stdout
    # Where the PNG goes is checked before the work: a path that fails afterwards would
    # throw the evaluation away. The default sits in the run directory, which may be
    # read-only (a shared or archived run): then there is no PNG, and a note says so.
    if args.confusion_png:
        png = Path(args.confusion_png)
        if png.name == "curves.png" and (png.parent / "metrics.jsonl").is_file():  # train.py's plot of a run
            raise UserError(f"--confusion-png {png} is the training curves of the run in {png.parent}; "
                            "give another file name")
        rundir.check_not_among_checkpoints(png, "--confusion-png", "file")
        check_output_file(png, "--confusion-png", (".png",))
        if png.exists() and not plots.made_here(png, plots.CONFUSION):
            # As --export-torch: a file of the user's at that name (a photo passed to predict, another
            # run's curves) was replaced without a word. A confusion matrix evaluate wrote is replaced.
            raise UserError(f"--confusion-png {png} exists and is not a confusion matrix that evaluate wrote; "
                            "it is left as it is: give another file name, or remove it first")
    else:
        png = Path(args.run_dir) / f"confusion_{args.which}.png"
        try:
            check_writable_dir(png.parent, "RUN_DIR")
        except UserError:
            emit(f"note: {png.parent} is read-only, so no confusion-matrix PNG (give --confusion-png PATH for one)",
                 file=sys.stderr, essential=False)
            png = None
    emit(_describe(ckpt), file=out, essential=False)
    # The run's own --data-dir and --manual-dir, where they are folders here: a run folder from
    # another machine names that machine's, and the data are not prepared into a path a file chose.
    data_dir, manual_dir = args.data_dir, args.manual_dir
    if data_dir is None and config.data_dir:
        if Path(config.data_dir).expanduser().is_dir():
            data_dir = config.data_dir
        else:
            emit(f"note: the run's --data-dir {config.data_dir} is not a folder here, so the data come from "
                 f"{data_mod.default_data_dir()} (--data-dir chooses)", file=sys.stderr, essential=False)
    if manual_dir is None and config.manual_dir and Path(config.manual_dir).expanduser().is_dir():
        manual_dir = config.manual_dir
    try:
        _, test = data_mod.load(
            spec, data_dir, manual_dir, args.offline or config.offline,
            log=lambda m: emit(f"data: {m}", file=out, essential=False), arg_names=data_mod.FLAG_NAMES,
        )
    except data_mod.DataError as err:
        raise UserError(str(err)) from err
    test = test.take(limit)

    # One pass over the test set gives the metrics and the confusion matrix alike.
    result = training.evaluate_split(config, ckpt.state, test, confusion=True)
    interrupts.check()  # a Ctrl-C swallowed while loading (resnet_jax/interrupts.py)
    cm = result["confusion"]
    per_class = metrics.per_class_accuracy(cm)
    png_error = None
    if png is not None:
        try:
            plots.plot_confusion_matrix(
                cm, spec.class_names, png, title=f"{config.dataset} test, epoch {ckpt.epoch} ({args.which})"
            )
        except OSError as err:  # a disk that filled since the check: the results are still shown, then this
            png_error = f"could not write {png}: {err.strerror or err}"
            if png.exists():  # (written whole or not at all)
                png_error += f" (the {png.name} there is an earlier evaluation's, left as it was)"
            png = None

    report = {
        "checkpoint": str(ckpt.path), "epoch": ckpt.epoch, "dataset": config.dataset, "examples": result["count"],
        "test_loss": result["loss"], "test_acc": result["acc"],
        "per_class_acc": {name: (None if acc != acc else float(acc)) for name, acc in zip(spec.class_names, per_class)},
        "confusion_matrix": cm.tolist(), "confusion_png": None if png is None else str(png),
    }
    if args.json:
        emit(json.dumps(files.json_safe(report), allow_nan=False))
    else:
        emit(f"test: loss {result['loss']:.4f}, acc {result['acc']:.4f} on {result['count']} examples")
        emit("accuracy per class:")
        width = max(map(len, spec.class_names))
        for name, acc in report["per_class_acc"].items():
            emit(f"  {name:<{width}}  " + ("n/a (no examples)" if acc is None else f"{acc:.4f}"))
        if png is not None:
            emit(f"confusion matrix: {png}")
    if png_error:
        if args.confusion_png:  # asked for: the command failed (exit 1), after what it could do
            raise UserError(png_error)
        emit(f"note: {png_error}; no confusion-matrix PNG of this evaluation", file=sys.stderr, essential=False)
    return EXIT_OK


def predict_command(args: argparse.Namespace) -> int:
    import numpy as np

    ckpt = _load(args.run_dir, args.which)
    from resnet_jax import data as data_mod  # imported by _load, under its deferral: no cost here
    from resnet_jax import images, training

    config = ckpt.config
    eval_batch_size = _eval_batch_size(args, config)
    spec = data_mod.DATASETS[config.dataset]
    if not 1 <= args.top_k <= spec.num_classes:
        raise UsageError(f"--top-k must be in 1..{spec.num_classes}, got {args.top_k}")
    names, batches = [], []
    try:
        # Files in the order given; a .npy contributes one input per image in it.
        for path in args.files:
            if Path(path).suffix.lower() == ".npy":
                batch = images.load_npy(path, spec)
                names += [f"{path}[{i}]" for i in range(len(batch))]
            else:
                batch = images.load_images([path], spec)
                names.append(path)
            batches.append(batch)
    except images.ImageError as err:
        raise UserError(str(err)) from err
    x = np.concatenate(batches)
    if not len(x):
        raise UserError("no images to predict (the .npy batches are empty)")
    emit(_describe(ckpt), file=sys.stderr, essential=False)  # not in stdout: it stays the predictions alone
    interrupts.check()  # a Ctrl-C swallowed while loading (resnet_jax/interrupts.py)
    probs = training.predict(ckpt.state, x, config.resize, eval_batch_size)

    results = []
    for name, p in zip(names, probs):
        top = np.argsort(-p, kind="stable")[: args.top_k]
        results.append({"input": name, "top_k": [
            {"class": spec.class_names[i], "index": int(i), "prob": float(p[i])} for i in top
        ]})
    if args.json:
        document = {"checkpoint": str(ckpt.path), "epoch": ckpt.epoch, "predictions": results}
        emit(json.dumps(files.json_safe(document), allow_nan=False))
    else:
        for r in results:
            emit(f"{r['input']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top_k"]))
    return EXIT_OK


class UsageError(Exception):
    """A flag value that cannot work (exit 2)."""


COMMANDS = {"evaluate": (build_evaluate_parser, evaluate_command), "predict": (build_predict_parser, predict_command)}


def main(command: str, argv: list[str]) -> int:
    build, run = COMMANDS[command]
    parser = build()
    args = parser.parse_args(argv)  # exits 2 on malformed flags
    # Orbax speaks through absl's logger (e.g. about read-only managers); a user sees one line or nothing.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return report_errors(parser.prog, lambda: _out_of_memory_is_one_line(run, args), usage_errors=(UsageError,))


def _out_of_memory_is_one_line(run, args: argparse.Namespace) -> int:
    try:
        return run(args)
    except RuntimeError as err:  # XLA's errors; only running out of memory is the user's to fix
        needed = out_of_memory(err)
        if needed is None:
            raise
        import jax

        raise UserError(f"out of memory on {jax.devices()[0].platform}: {needed}; "
                        "try a smaller --eval-batch-size") from err
