"""CPU: b1's 3x3/2 max-pool, forward + backward, XLA's reduce_window against ours (strided slices).

    python benchmarks/cpu_maxpool.py

Median of 7 after a compiling call, for three input shapes (resnet_jax.ops.max_pool).
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
import jax.numpy as jnp
import numpy as np

from resnet_jax import ops
from resnet_jax.console import OneLineParser


def median_ms(f, *args):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(7):
        s = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - s)
    return np.median(ts) * 1000


def main():
    OneLineParser(prog="benchmarks/cpu_maxpool.py", description=__doc__.splitlines()[0]).parse_args()
    for shape in [(64, 14, 14, 64), (64, 48, 48, 64), (256, 14, 14, 64)]:
        y = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
        g = jax.random.normal(jax.random.key(1), ops.max_pool(y, 3, 2, 1, impl="xla").shape)
        grad = lambda impl: jax.grad(lambda y: jnp.sum(ops.max_pool(y, 3, 2, 1, impl=impl) * g))
        print(f"{shape}: reduce_window {median_ms(grad('xla'), y):.1f} ms, "
              f"slices {median_ms(grad('slices'), y):.1f} ms (forward+backward)", flush=True)


if __name__ == "__main__":
    main()
