"""Where the training time goes: one epoch of ``training.fit`` under JAX's profiler, kernels tabulated.

    python benchmarks/profile_step.py --resize 96 --dtype bfloat16 --out prof      # on a GPU
    python benchmarks/profile_step.py --data ~/tensorflow_datasets/resnet_jax_cache/fashion_mnist-3.0.1.npz ...

On the first H200 the recipe's step ran at 64,620 images/s (12% of the chip's bf16 peak), short of
the 100,000 target, and nobody had looked inside it. This script runs ``fit`` for two epochs (the
programs users run, data on the device) and traces the second one, its evaluation included: the
first epoch's start does one-off work. It writes:

* ``profile.md``: the device's busy time against the traced window (idle time means the device
  waited for the host), then the kernels by total time, grouped by kind (convolution, matmul,
  XLA fusion, copy, ...) and one by one;
* ``trace.json.gz``: the raw Perfetto trace (``jax.profiler.trace(create_perfetto_trace=True)``),
  to read again with :func:`summarize` or to open at https://ui.perfetto.dev.

Images are synthetic unless ``--data`` names the array cache; the time does not depend on the
pixels. On CPU the table lists XLA:CPU's own events instead of kernels: a check of this script
rather than a measurement.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

# Run from a checkout, installed or not (the GPU machine has no install): the package
# beside this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_jax import training  # noqa: E402
from resnet_jax.console import OneLineParser, check_sizes  # noqa: E402
from resnet_jax.config import DTYPES, Config, ConfigError  # noqa: E402
from resnet_jax.data import FASHION_MNIST  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import load_npz, synthetic_splits  # noqa: E402

KINDS = (  # (kind, pattern in the lower-cased kernel name), first match wins
    ("convolution", re.compile(r"conv|cudnn|xmma|implicit_?gemm|winograd|fprop|dgrad|wgrad")),
    ("matmul", re.compile(r"gemm|cublas|dot|matmul")),
    ("reduction", re.compile(r"reduce|reduction")),
    ("XLA fusion", re.compile(r"fusion")),
    ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset")),
)


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if pattern.search(low)), "other")


def _short(name: str) -> str:
    """A kernel's name without its instance number (fusion.123, loop_add_fusion_2): like ones add up."""
    return re.sub(r"([._]\d+)+$", "", name)


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(trace_path: Path, top: int = 25) -> str:
    """profile.md's text from a Perfetto trace that jax.profiler wrote."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "")
               for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {pid for pid, name in names.items() if "/device:" in name}
    if device_pids:
        where = ", ".join(sorted(names[p] for p in device_pids))
        kernels = [e for e in spans if e["pid"] in device_pids]
    else:  # XLA:CPU: its worker threads' events (not Python's)
        where = "host threads of XLA:CPU (no device in the trace)"
        kernels = [e for e in spans if "python" not in threads.get((e["pid"], e["tid"]), "python").lower()]
    if not kernels:
        return f"No kernel events in {trace_path.name} ({len(events)} events in all).\n"
    start = min(e["ts"] for e in kernels)
    stop = max(e["ts"] + e["dur"] for e in kernels)
    busy = _busy_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    total = sum(e["dur"] for e in kernels)
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        by_kind[_kind(e["name"])] += e["dur"]
        by_name[_short(e["name"])] += e["dur"]
        count[_short(e["name"])] += 1
    lines = [
        f"Events from: {where}.",
        f"Window: {(stop - start) / 1e3:,.1f} ms from the first kernel to the last; busy (at least one kernel "
        f"running) {busy / 1e3:,.1f} ms, **{busy / (stop - start):.1%}**; kernel time summed over streams "
        f"{total / 1e3:,.1f} ms in {len(kernels):,} kernels.",
        "",
        "| kind | ms | share of kernel time |",
        "|---|---|---|",
        *(f"| {kind} | {us / 1e3:,.1f} | {us / total:.1%} |" for kind, us in by_kind.most_common()),
        "",
        f"| kernel (instance numbers dropped), top {top} | calls | ms | share |",
        "|---|---|---|---|",
        *(f"| `{name[:120]}` | {count[name]:,} | {us / 1e3:,.2f} | {us / total:.1%} |"
          for name, us in by_name.most_common(top)),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="benchmarks/profile_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="where profile.md and trace.json.gz go")
    p.add_argument("--batch", type=int, default=256, help="training batch size")
    p.add_argument("--resize", type=int, default=96, help="image side")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="computation dtype")
    p.add_argument("--train-examples", type=int, default=60_000, help="synthetic training set size")
    p.add_argument("--eval-examples", type=int, default=10_000, help="synthetic test set size")
    p.add_argument("--data", metavar="NPZ", default=None, help="resnet_jax's array cache instead of synthetic images")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_sizes(p, args.batch, [args.resize])
    if args.train_examples < args.batch or args.eval_examples < 1:
        p.error("--train-examples must hold at least one --batch, --eval-examples at least one image")
    try:
        config = Config(epochs=2, batch_size=args.batch, resize=args.resize, dtype=args.dtype)
    except ConfigError as err:
        p.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        train, test = load_npz(args.data)
    else:
        train, test = synthetic_splits(args.train_examples, args.eval_examples)
    model = training.make_model(config, FASHION_MNIST.num_classes, FASHION_MNIST.channels)
    state = training.create_train_state(model, training.make_optimizer(config), jax.random.key(0))

    log_dir = Path(tempfile.mkdtemp(prefix="profile_step_"))
    records = []

    def on_epoch(record):  # after each epoch's evaluation: trace from the end of the first to the end of the second
        records.append(record)
        if record["epoch"] == 1:
            jax.profiler.start_trace(str(log_dir), create_perfetto_trace=True)
        else:
            jax.profiler.stop_trace()

    t0 = time.perf_counter()
    result = training.fit(config, train, test, state, training.Hooks(on_epoch=on_epoch))
    [trace] = sorted(log_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    shutil.copyfile(trace, out / "trace.json.gz")
    shutil.rmtree(log_dir, ignore_errors=True)
    traced = records[1]
    head = (
        f"# One epoch of training.fit under the profiler\n\n"
        f"Device: {result.final['device']} ({jax.default_backend()}), JAX {jax.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
        f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
        f"Traced: epoch 2 of 2 ({len(train):,} images at batch {config.batch_size}, {config.resize}x{config.resize}, "
        f"{config.dtype}; then evaluation on {len(test):,}): training {traced['epoch_train_s']:.3f} s under the "
        f"profiler, {len(train) / traced['epoch_train_s']:,.0f} images/s (epoch 1 without it: "
        f"{len(train) / records[0]['epoch_train_s']:,.0f}); whole run {time.perf_counter() - t0:.1f} s.\n\n"
    )
    (out / "profile.md").write_text(head + summarize(out / "trace.json.gz"))
    print((out / "profile.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
