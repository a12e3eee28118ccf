"""TPU memory without a TPU: the on-device splits and fit's programs, compiled ahead of time.

    pip install "jax[tpu]" flax optax      # libtpu: no TPU needed, any x86-64 Linux machine
    python benchmarks/tpu_aot.py [--topology v5e=1x1 v4=1x1x1 v6e=1x1] [--programs]

``jax.experimental.topologies`` gives compile-only devices of a TPU generation, and libtpu
compiles for them as for the real chips: each program's ``memory_analysis()`` and the device's
default layout of each argument are those a TPU of that kind would use (nothing runs, so
nothing here is a time). For each topology it prints:

- The data splits as fit keeps them on the device (uint8, (N, 28, 28, 1)) and flattened
  (N, 784): the bytes the device holds for each, read from a compiled gather of one batch. TPUs
  tile the two minor dimensions of an array's layout, so a small trailing dimension could cost
  many times the array's size; this measures what it does cost.
- ``--programs``: fit's training program on a TPU (train_chunk, 32 steps per dispatch, the
  recipe's 235 steps, so a traced trip count and the masked last batch; batch 256, 96x96) and its
  evaluation of the test split, in float32 and bfloat16: argument, temporary and peak bytes.
  Several minutes of compiling each on a small CPU.

libtpu warns that it cannot find TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES: there is no TPU,
and compiling needs neither. Another process holding libtpu makes this one fail ("multi-process
lockfile"); set ALLOW_MULTIPLE_LIBTPU_LOAD=1 if that is intended.
"""

import importlib.metadata
import sys
import time
from pathlib import Path

# Run from a checkout, installed or not: the package beside this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from resnet_jax.console import OneLineParser

SPLITS = {"train": 60000, "test": 10000}
FIELDS = ("argument_size", "output_size", "alias_size", "temp_size", "generated_code_size", "peak_memory")


def tpu_device(topology: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology, platform="tpu").devices[0]


def split_bytes(device) -> None:
    """The device bytes of each split, as fit stores it and flattened, from a compiled gather."""
    sharding = SingleDeviceSharding(device)
    idx = jax.ShapeDtypeStruct((256,), jnp.int32, sharding=sharding)
    for name, n in SPLITS.items():
        for shape in ((n, 28, 28, 1), (n, 28 * 28)):
            x = jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding)
            compiled = jax.jit(lambda x, i: x[i]).lower(x, idx).compile()
            held = compiled.memory_analysis().argument_size_in_bytes - 256 * 4  # less the indices
            raw = int(np.prod(shape))
            layout = compiled.input_formats[0][0].layout  # the device's default for the argument
            print(f"  {name} uint8{list(shape)}: {held:,} bytes on the device, {held / raw:.3f}x its {raw:,}; "
                  f"layout major_to_minor {layout.major_to_minor}, tiles {layout.tiling}", flush=True)


def program_bytes(device, dtype: str) -> None:
    """memory_analysis() of fit's TPU training program and test evaluation at the recipe's shapes."""
    from resnet_jax import training
    from resnet_jax.config import Config

    replicated, batch_sharding, _ = training._mesh([device], 256)
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
    config = Config(dtype=dtype)  # the chapter's recipe: batch 256, 96x96
    state = jax.tree_util.tree_map(lambda a: spec(a.shape, a.dtype), jax.eval_shape(lambda: training.initial_state(config)))
    steps = -(-SPLITS["train"] // config.batch_size)  # 235: the last batch is smaller, so masked
    statics, _ = training._chunk_statics(32, steps, config.resize, batch_sharding, masked=True)
    train = training._program(training.train_chunk, "tpu", statics, state, donate_argnums=0)
    train_args = (spec((SPLITS["train"], 28, 28, 1), jnp.uint8), spec((SPLITS["train"],), jnp.int32),
                  spec((32, config.batch_size), jnp.int32), spec((), jnp.int32))
    eval_batches = SPLITS["test"] // config.eval_batch_size
    eval_args = (spec((eval_batches, config.eval_batch_size, 28, 28, 1), jnp.uint8),
                 spec((eval_batches, config.eval_batch_size), jnp.int32),
                 spec((eval_batches, config.eval_batch_size), jnp.bool_))
    for name, compile_program in (
        ("train_chunk", lambda: train.lower(state, *train_args).compile()),
        # fit's own evaluator, built as fit builds it (the device loop, as on any accelerator)
        ("evaluate_batches", lambda: training._eval_program(config, state, *eval_args, batch_sharding,
                                                            device_loop=True, devices=[device])),
    ):
        start = time.perf_counter()
        memory = compile_program().memory_analysis()
        sizes = ", ".join(f"{f.removesuffix('_size')} {getattr(memory, f + '_in_bytes') / 2**20:,.1f} MiB" for f in FIELDS)
        print(f"  {name}, {dtype}: {sizes} (compiled in {time.perf_counter() - start:.0f} s)", flush=True)


def main():
    parser = OneLineParser(prog="benchmarks/tpu_aot.py", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", nargs="+", default=["v5e=1x1"], help="TPU generations (jax.experimental.topologies names)")
    parser.add_argument("--programs", action="store_true", help="also compile fit's programs (minutes each)")
    args = parser.parse_args()
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "libtpu")}
    print(", ".join(f"{name} {version}" for name, version in versions.items()), flush=True)
    for topology in args.topology:
        device = tpu_device(topology)
        print(f"{topology}: {device.device_kind}", flush=True)
        split_bytes(device)
        if args.programs:
            for dtype in ("float32", "bfloat16"):
                program_bytes(device, dtype)


if __name__ == "__main__":
    main()
