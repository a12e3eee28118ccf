import time

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import ops


def t(f, *a):
    f = jax.jit(f)
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(7):
        s = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - s)
    return np.median(ts) * 1000


for shape in [(64, 14, 14, 64), (64, 48, 48, 64), (256, 14, 14, 64)]:
    y = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    g = jax.random.normal(jax.random.key(1), ops.max_pool(y, impl="xla").shape)
    f = lambda impl: jax.grad(lambda y: jnp.sum(ops.max_pool(y, impl=impl) * g))
    print(f"{shape}: reduce_window {t(f('xla'), y):.1f} ms, slices {t(f('slices'), y):.1f} ms (forward+backward)")
