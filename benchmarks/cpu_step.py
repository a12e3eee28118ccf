"""CPU: one training step of the chapter's ResNet-18, JAX (each conv lowering) against PyTorch.

    python benchmarks/cpu_step.py --batch 64 --resize 28 96

Median of 5 timed steps after one warm-up step, random uint8 images. PyTorch
runs the chapter's code (tests/torch_reference.py) with
torch.set_num_threads(os.cpu_count()).
"""

import os
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

from resnet_jax import training
from resnet_jax.console import OneLineParser, check_sizes
from resnet_jax.config import Config
from resnet_jax.ops import IMPLS

TESTS = Path(__file__).resolve().parents[1] / "tests"


def jax_step_ms(batch, resize, impl, repeats=5):
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    cfg = Config(resize=resize, conv_impl=impl, batch_size=batch)
    st = training.create_train_state(training.make_model(cfg), training.make_optimizer(cfg), jax.random.key(0))
    step = training.jit(training.train_step, static_argnums=3, donate_argnums=0)
    st, m = step(st, imgs, labels, resize)
    jax.block_until_ready(m)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        st, m = step(st, imgs, labels, resize)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts)), 1000 * (max(ts) - min(ts))


def torch_step_ms(batch, resize, repeats=5):
    import torch
    from torch import nn

    torch.set_num_threads(os.cpu_count())

    # The chapter's code, from the one transcription the parity tests use. Plain
    # make_net: PyTorch's default init, as this benchmark has always run it
    # (the step's cost does not depend on the initialisation).
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from torch_reference import make_net

    net = make_net()
    opt, loss = torch.optim.SGD(net.parameters(), lr=0.05), nn.CrossEntropyLoss()
    X, y = torch.rand(batch, 1, resize, resize), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        loss(net(X), y).backward()
        opt.step()

    step()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts)), 1000 * (max(ts) - min(ts))


def main():
    p = OneLineParser(prog="benchmarks/cpu_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="training batch size")
    p.add_argument("--resize", type=int, nargs="+", default=[28, 96], help="image sides")
    p.add_argument("--impls", nargs="+", default=["auto", "xla"], choices=IMPLS, help="resnet_jax conv lowerings")
    a = p.parse_args()
    check_sizes(p, a.batch, a.resize)
    print("| resize | implementation | ms/step (median of 5) | spread ms | images/s |")
    print("|---|---|---|---|---|")
    for r in a.resize:
        rows = [(f"JAX conv_impl={i}", *jax_step_ms(a.batch, r, i)) for i in a.impls]
        try:
            rows.append(("PyTorch (chapter's code)", *torch_step_ms(a.batch, r)))
        except ImportError:
            pass
        for name, ms, spread in rows:
            print(f"| {r} | {name} | {ms:.0f} | {spread:.0f} | {a.batch / ms * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
