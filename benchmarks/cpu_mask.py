"""CPU: the training step with and without the last batch's mask, in one process, interleaved.

    python benchmarks/cpu_mask.py --resize 96 --rounds 60

fit pads the epoch's last, smaller batch and masks it (``training.train_rows(masked=True)``:
BatchNorm's statistics and the loss over the valid examples alone). On a GPU one masked
program then runs every step; this measures what the mask costs a step on CPU, where fit
keeps an unmasked program for the full batches if it costs anything. Both programs run
on the same batches (all valid), alternating which goes first each round, so a drift of
the machine's speed hits both alike. Median and quartiles of the rounds after two
warm-up rounds. With 2 MiB host pages, as train.py and bench.py run.
"""

import functools
import sys
import time
from pathlib import Path

# Run from a checkout, installed or not (the GPU machine has no install): the package
# beside this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_jax import hugepages  # imports no JAX

if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # 2 MiB host pages, as train.py runs (see the module doc)

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import training
from resnet_jax.console import OneLineParser, check_sizes
from resnet_jax.config import Config


def main():
    p = OneLineParser(prog="benchmarks/cpu_mask.py", description=__doc__.splitlines()[0])
    p.add_argument("--resize", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be a positive integer, got {args.rounds}")
    check_sizes(p, args.batch, [args.resize])
    r, bs, n = args.resize, args.batch, 1024
    config = Config(resize=r, batch_size=bs)
    model = training.make_model(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    rows = [jnp.asarray(rng.permutation(n)[:bs].astype(np.int32)) for _ in range(8)]
    programs = {}
    for masked in (False, True):
        state = training.create_train_state(model, training.make_optimizer(config), jax.random.key(0))
        fn = training.jit(functools.partial(training.train_rows, resize=r, masked=masked), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = fn.lower(state, x, y, jax.ShapeDtypeStruct((bs,), jnp.int32)).compile()
        print(f"masked={masked}: compiled in {time.perf_counter() - t0:.2f} s", flush=True)
        programs[masked] = [compiled, state]
    times = {False: [], True: []}
    for i in range(args.rounds + 2):
        for masked in (False, True) if i % 2 == 0 else (True, False):
            compiled, state = programs[masked]
            t = time.perf_counter()
            state, m = compiled(state, x, y, rows[i % len(rows)])
            jax.block_until_ready(m)
            programs[masked][1] = state
            if i >= 2:
                times[masked].append(time.perf_counter() - t)
    for masked in (False, True):
        t = np.asarray(times[masked]) * 1e3
        print(f"{r}x{r}, batch {bs}, {'masked' if masked else 'unmasked'}: median {np.median(t):.1f} ms "
              f"(quartiles {np.percentile(t, 25):.1f}-{np.percentile(t, 75):.1f}, {len(t)} rounds)")
    ratio = np.median(times[True]) / np.median(times[False])
    print(f"the mask costs {100 * (ratio - 1):+.1f}% of a step")


if __name__ == "__main__":
    main()
