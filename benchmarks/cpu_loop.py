"""CPU: the same training step inside lax.scan vs unrolled (the reason CPU runs one step per dispatch).

    python benchmarks/cpu_loop.py
"""
import time
import numpy as np, jax, jax.numpy as jnp
from resnet_jax import training
from resnet_jax.config import Config
B, R, K = 256, 28, 4
rng=np.random.default_rng(0)
imgs=jnp.asarray(rng.integers(0,256,(K*B,28,28,1),dtype=np.uint8)); labels=jnp.asarray(rng.integers(0,10,K*B).astype(np.int32))
cfg=Config(resize=R, batch_size=B)
st0=training.create_train_state(training.make_model(cfg), training.make_optimizer(cfg), jax.random.key(0))
rows = jnp.arange(K*B).reshape(K, B)
def scan_fixed(st, imgs, labels, rows):
    def body(st, idx):
        st, m = training.train_step(st, imgs[idx], labels[idx], R); return st, m
    return jax.lax.scan(body, st, rows)
def scan_pre(st, x, y):  # pre-gathered batches
    def body(st, b):
        st, m = training.train_step(st, b[0], b[1], R); return st, m
    return jax.lax.scan(body, st, (x, y))
def timeit(name, f, *a):
    f=jax.jit(f); r=f(*a); jax.block_until_ready(r)
    t=time.perf_counter(); r=f(*a); jax.block_until_ready(r); print(name, f"{(time.perf_counter()-t)/K*1000:.0f} ms/step", flush=True)
timeit("scan fixed", scan_fixed, st0, imgs, labels, rows)
timeit("scan pregathered", scan_pre, st0, imgs.reshape(K,B,28,28,1), labels.reshape(K,B))
def unrolled(st, imgs, labels, rows):
    for i in range(K): st, m = training.train_step(st, imgs[rows[i]], labels[rows[i]], R)
    return st, m
timeit("unrolled", unrolled, st0, imgs, labels, rows)
