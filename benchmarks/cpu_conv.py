"""CPU: each convolution of the chapter's ResNet-18, forward + backward, per lowering and kernel library.

    python benchmarks/cpu_conv.py --batch 64 --resize 96 28

For every distinct conv the network runs at the given input size: one jitted
gradient of sum(conv(x, w)^2) with respect to x and w, timed as the median of 7
after a warm-up, for

* ``xla``: lax.conv_general_dilated under the package's CPU compiler options
  (XLA's own Eigen convolution; resnet_jax.ops.compiler_options),
* ``xla+ynn``: the same under XLA's defaults (YNNPACK convolutions, jaxlib 0.10),
* ``patches``: slices + one matmul (resnet_jax.ops),
* PyTorch's conv2d (oneDNN), NCHW and channels_last, when torch is installed.

The ``auto`` column is what resnet_jax.ops picks. These numbers are the
evidence for ops.CPU_PATCHES_MAX_OUT and ops.compiler_options (BENCHMARKS.md,
"CPU conv lowering").

    python benchmarks/cpu_conv.py --batch 64 --resize 96 --split

times the three parts of each conv apart instead, XLA (the package's options)
against PyTorch channels_last: the forward, the input gradient and the weight
gradient, each its own program (median of 15). The totals count what a training
step runs: the stem's input gradient is never computed (the images need none).
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

from resnet_jax import ops
from resnet_jax.console import OneLineParser, check_sizes


def network_convs(resize: int):
    """(input side, in channels, out channels, kernel, stride, padding, how many) for each distinct conv."""
    o = ops.output_size
    s1 = o(resize, 7, 2, 3)
    s2 = o(s1, 3, 2, 1)  # after b1's max-pool
    out = [(resize, 1, 64, 7, 2, 3, 1), (s2, 64, 64, 3, 1, 1, 4)]
    side, c = s2, 64
    for _ in range(3):  # b3, b4, b5: a strided residual (3x3 + 1x1 shortcut), then three 3x3 convs
        out += [(side, c, 2 * c, 3, 2, 1, 1), (side, c, 2 * c, 1, 2, 0, 1)]
        side, c = o(side, 3, 2, 1), 2 * c
        out.append((side, c, c, 3, 1, 1, 3))
    return out


def median_ms(f, repeats=7):
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def jax_ms(x, w, stride, pad, impl, options):
    loss = lambda x, w: jnp.sum(ops.conv2d(x, w, strides=stride, padding=pad, impl=impl) ** 2)
    g = jax.jit(jax.grad(loss, (0, 1)), compiler_options=options)
    return median_ms(lambda: jax.block_until_ready(g(x, w)))


def jax_split_ms(x, w, stride, pad, options):
    conv = lambda x, w: ops.conv2d(x, w, strides=stride, padding=pad, impl="xla")
    g = jnp.ones(jax.eval_shape(conv, x, w).shape, x.dtype)
    fwd = jax.jit(conv, compiler_options=options)
    dx = jax.jit(lambda g, w: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], compiler_options=options)
    dw = jax.jit(lambda g, x: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], compiler_options=options)
    return (median_ms(lambda: jax.block_until_ready(fwd(x, w)), 15),
            median_ms(lambda: jax.block_until_ready(dx(g, w)), 15),
            median_ms(lambda: jax.block_until_ready(dw(g, x)), 15))


def torch_split_ms(n, side, cin, cout, k, stride, pad):
    import torch

    x = torch.rand(n, cin, side, side).to(memory_format=torch.channels_last)
    w = torch.rand(cout, cin, k, k).to(memory_format=torch.channels_last)
    g = torch.ones_like(torch.nn.functional.conv2d(x, w, stride=stride, padding=pad))
    back = lambda mask: torch.ops.aten.convolution_backward(
        g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)
    return (median_ms(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=pad), 15),
            median_ms(lambda: back([True, False, False]), 15),
            median_ms(lambda: back([False, True, False]), 15))


def split(batch: int, resizes):
    """Forward, input gradient and weight gradient apart: XLA against PyTorch channels_last."""
    import torch  # noqa: F401  (missing torch fails here, before the JAX half has run)

    opts = ops.compiler_options("cpu")
    print("| input | conv | count | xla fwd | xla dx | xla dw | torch CL fwd | torch CL dx | torch CL dw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in resizes:
        tj = tt = 0.0
        for i, (side, cin, cout, k, stride, pad, count) in enumerate(network_convs(r)):
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.random((batch, side, side, cin), np.float32))
            w = jnp.asarray(rng.random((k, k, cin, cout), np.float32))
            j, t = jax_split_ms(x, w, stride, pad, opts), torch_split_ms(batch, side, cin, cout, k, stride, pad)
            used = (1, 0, 1) if i == 0 else (1, 1, 1)  # the stem: no input gradient in training
            tj += count * sum(u * v for u, v in zip(used, j))
            tt += count * sum(u * v for u, v in zip(used, t))
            print(f"| {side}x{side}x{cin} | {k}x{k}/{stride} -> {cout} | {count} | "
                  + " | ".join(f"{v:.1f}" for v in (*j, *t)) + " |", flush=True)
        print(f"| **{r}x{r}: what a training step runs, weighted by count** | | | **{tj:.0f}** | | | **{tt:.0f}** | | |")


def torch_ms(n, side, cin, cout, k, stride, pad, channels_last):
    import torch

    x, w = torch.rand(n, cin, side, side), torch.rand(cout, cin, k, k)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    x.requires_grad_(), w.requires_grad_()

    def step():
        (torch.nn.functional.conv2d(x, w, stride=stride, padding=pad) ** 2).sum().backward()

    return median_ms(step)


def main():
    p = OneLineParser(prog="benchmarks/cpu_conv.py", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="images per convolution")
    p.add_argument("--resize", type=int, nargs="+", default=[96, 28], help="the network's input sides")
    p.add_argument("--split", action="store_true", help="forward, input and weight gradients apart, against PyTorch channels_last")
    a = p.parse_args()
    check_sizes(p, a.batch, a.resize)
    if a.split:
        import torch

        torch.set_num_threads(os.cpu_count())
        print(f"Device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; JAX {jax.__version__}, "
              f"PyTorch {torch.__version__}; batch {a.batch}; ms\n")
        return split(a.batch, a.resize)
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
    except ImportError:
        torch = None
    opts = ops.compiler_options("cpu")
    cols = ["xla", "xla+ynn", "patches"] + (["torch", "torch channels_last"] if torch else [])
    print(f"Device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; JAX {jax.__version__}"
          + (f", PyTorch {torch.__version__}" if torch else "") + f"; batch {a.batch}; ms for forward + backward\n")
    print("| input | conv | count | " + " | ".join(cols) + " | auto picks |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for r in a.resize:
        totals, auto_total = dict.fromkeys(cols, 0.0), 0.0
        for side, cin, cout, k, stride, pad, count in network_convs(r):
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.random((a.batch, side, side, cin), np.float32))
            w = jnp.asarray(rng.random((k, k, cin, cout), np.float32))
            row = {
                "xla": jax_ms(x, w, stride, pad, "xla", opts),
                "xla+ynn": jax_ms(x, w, stride, pad, "xla", None),
                "patches": jax_ms(x, w, stride, pad, "patches", opts),
            }
            if torch:
                row["torch"] = torch_ms(a.batch, side, cin, cout, k, stride, pad, False)
                row["torch channels_last"] = torch_ms(a.batch, side, cin, cout, k, stride, pad, True)
            for c in cols:
                totals[c] += count * row[c]
            pick = "patches" if ops.cpu_prefers_patches((side, side), k, stride, pad) else "xla"
            auto_total += count * row[pick]
            print(f"| {side}x{side}x{cin} | {k}x{k}/{stride} -> {cout} | {count} | "
                  + " | ".join(f"{row[c]:.1f}" for c in cols) + f" | {pick} |", flush=True)
        print(f"| **{r}x{r} network, weighted by count** | | | " + " | ".join(f"**{totals[c]:.0f}**" for c in cols) + f" | **{auto_total:.0f}** |")


if __name__ == "__main__":
    main()
