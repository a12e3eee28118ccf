"""CPU: the same training step inside lax.scan vs unrolled (the reason CPU runs one step per dispatch).

    python benchmarks/cpu_loop.py

Four training steps of batch 256 at 28x28 on random uint8 images, three ways:
``lax.scan`` over indices into the images, ``lax.scan`` over pre-gathered
batches, and the four steps unrolled in one jitted function. One timed call
each after a compiling call; ms per step.
"""

import sys
import time
from pathlib import Path

# Run from a checkout, installed or not (the GPU machine has no install): the package
# beside this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_jax import hugepages  # imports no JAX

if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # 2 MiB host pages, as train.py and bench.py run (see the module doc)

import jax
import numpy as np
import jax.numpy as jnp

from resnet_jax import training
from resnet_jax.console import OneLineParser
from resnet_jax.config import Config

B, R, K = 256, 28, 4  # batch, image side, steps per call


def timeit(name, f, *args):
    f = training.jit(f)  # as fit compiles: with the package's XLA:CPU options
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    print(name, f"{(time.perf_counter() - t) / K * 1000:.0f} ms/step", flush=True)


def main():
    OneLineParser(prog="benchmarks/cpu_loop.py", description=__doc__.splitlines()[0]).parse_args()
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.integers(0, 256, (K * B, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, K * B).astype(np.int32))
    cfg = Config(resize=R, batch_size=B)
    st0 = training.create_train_state(training.make_model(cfg), training.make_optimizer(cfg), jax.random.key(0))
    rows = jnp.arange(K * B).reshape(K, B)

    def scan_fixed(st, imgs, labels, rows):
        def body(st, idx):
            return training.train_step(st, imgs[idx], labels[idx], R)
        return jax.lax.scan(body, st, rows)

    def scan_pre(st, x, y):  # pre-gathered batches
        def body(st, b):
            return training.train_step(st, b[0], b[1], R)
        return jax.lax.scan(body, st, (x, y))

    def unrolled(st, imgs, labels, rows):
        for i in range(K):
            st, m = training.train_step(st, imgs[rows[i]], labels[rows[i]], R)
        return st, m

    timeit("scan fixed", scan_fixed, st0, imgs, labels, rows)
    timeit("scan pregathered", scan_pre, st0, imgs.reshape(K, B, 28, 28, 1), labels.reshape(K, B))
    timeit("unrolled", unrolled, st0, imgs, labels, rows)


if __name__ == "__main__":
    main()
