"""The side-by-side benchmark: resnet_jax against the chapter's PyTorch loop and a tuned PyTorch.

    python benchmarks/bench.py --batch 256 --resize 96 28 --dtype bfloat16 float32 --full-recipe --out bench-gpu
    python benchmarks/bench.py --batch 64 --resize 96 28 --dtype float32 --out bench-cpu    # CPU, no full recipe

``--data ~/tensorflow_datasets/resnet_jax_cache/fashion_mnist-3.0.1.npz`` uses
the real images (train.py writes that cache on its first run).

For every (resize, dtype) it measures, on one device:

* **JAX** through ``resnet_jax.training`` itself: the programs ``fit`` runs
  (``train_chunk`` with K steps per dispatch on GPU/TPU, one ``train_step`` per
  call on CPU, ``evaluate_batches`` / ``eval_step``), on uint8 splits that live on the
  device, with the resize inside the step.
* **PyTorch, the chapter's loop** as its readers run it: a ``DataLoader``
  (4 workers, as d2l's ``get_dataloader_workers``) whose dataset resizes each
  PIL image on the CPU (``Resize`` + ``ToTensor``), and d2l ``train_ch6``'s
  inner loop (``net.train()``, ``zero_grad``, loss, ``backward``, ``step``, and
  its per-step metric accumulation, which syncs with the device every step).
  It runs in a Python process of its own that never starts JAX, as its
  readers' does: the workers fork from that (:class:`ChapterProcess`).
* **PyTorch, tuned** on the same model: uint8 data on the device, scaling and
  resize on the device, ``channels_last``, bf16 autocast for ``--dtype
  bfloat16``, metrics kept on the device, ``torch.compile`` (``--torch-compile``).

Images are synthetic uint8 noise unless ``--data`` names the array cache that
``resnet_jax.data`` writes; throughput does not depend on pixel values. The
script never imports TensorFlow or TFDS (GPU machines need not have them).

FLOPs: :func:`counted_gflop` counts the multiply-adds of every conv and the
dense layer (x2), every kernel tap included, those on padding too, forward for
evaluation, forward plus both backward products (minus the stem's unneeded input
gradient) for training: 1.897 and 0.637 GFLOP per image at 96x96. It is exact
for every size (the feature maps shrink with ceil-rounding, so (resize/96)^2 is
only approximately right). XLA's own count (``cost_analysis()`` of the step
before optimisation, which also counts BatchNorm and elementwise work; it skips
the taps on padding of the convolutions that lower as XLA convolutions, but not of
those that lower as patches, on CPU the smallest maps: 1.588 at 96x96 and 0.134 at
28x28 on CPU, 1.585 and 0.107 as lowered for a GPU) is printed beside it as a cross-check.

Host memory: like train.py, the script restarts itself once with glibc asked for
2 MiB pages (``resnet_jax/hugepages.py``), so JAX and PyTorch both run with them;
``RESNET_JAX_HUGE_PAGES=0`` keeps 4 KiB pages. The report says which.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import inspect
import math
import multiprocessing
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Run from a checkout, installed or not (the GPU machine has no install): the package
# beside this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_jax import hugepages  # imports no JAX

if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before JAX and torch load: see the module doc

# torch runs in the same process as JAX: without this JAX would reserve 75% of
# the GPU's memory at start-up and leave torch the rest. Set it yourself to
# override; peak_bytes_in_use is measured either way.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from resnet_jax import data, training  # noqa: E402
from resnet_jax.console import EXIT_FAILED, EXIT_USAGE, OneLineParser  # noqa: E402
from resnet_jax.errors import UserError, check_writable_dir  # noqa: E402
from resnet_jax.files import write_json  # noqa: E402
from resnet_jax.config import DTYPES, Config, ConfigError  # noqa: E402
from resnet_jax.data import FASHION_MNIST, Split  # noqa: E402
from resnet_jax.ops import IMPLS, output_size  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"

# ---------------------------------------------------------------------------
# FLOPs and peaks
# ---------------------------------------------------------------------------


def counted_gflop(resize: int, input_channels: int = 1, num_classes: int = 10) -> tuple[float, float]:
    """(training, evaluation) GFLOP per image of the chapter's ResNet-18 at ``resize`` x ``resize``.

    A multiply-add is 2 FLOPs; every kernel tap counts, padding included (what
    a dense convolution computes). Evaluation is the forward pass. Training is
    forward + the input gradient + the weight gradient of every layer (each
    costs as much as the forward), except the stem's input gradient, which
    nobody needs. BatchNorm, ReLU, pooling and the update are left out.
    """
    convs = []  # (output side, kernel, in channels, out channels)
    side = output_size(resize, 7, 2, 3)
    convs.append((side, 7, input_channels, 64))
    side = output_size(side, 3, 2, 1)  # max-pool
    channels = 64
    for stage, out_ch in enumerate((64, 128, 256, 512)):
        for r in range(2):
            stride = 2 if (r == 0 and stage > 0) else 1
            new_side = output_size(side, 3, stride, 1)
            convs.append((new_side, 3, channels, out_ch))
            convs.append((new_side, 3, out_ch, out_ch))
            if stride == 2:
                convs.append((new_side, 1, channels, out_ch))  # conv3, the 1x1 shortcut
            side, channels = new_side, out_ch
    macs = [s * s * k * k * cin * cout for s, k, cin, cout in convs]
    forward = 2 * (sum(macs) + 512 * num_classes)
    stem_input_grad = 2 * macs[0]
    return (3 * forward - stem_input_grad) / 1e9, forward / 1e9


# Peak dense tensor-core TFLOP/s (no sparsity) per device and computation dtype.
# float32 is TF32: XLA and cuDNN use TF32 tensor cores for float32 convolutions
# at JAX's default precision (torch's cuDNN convs too, torch.backends.cudnn.allow_tf32).
# Sources: NVIDIA's datasheets give the "with sparsity" figure; dense is half.
#   H100 SXM / PCIe / NVL: https://www.nvidia.com/en-us/data-center/h100/
#     (BF16 1,979 / 1,513 / 1,671; TF32 989 / 756 / 835, with sparsity)
#   H200 SXM / NVL: https://www.nvidia.com/en-us/data-center/h200/
#     (BF16 1,979 / 1,671; TF32 989 / 835, with sparsity; same compute as H100 SXM / NVL)
#   A100 SXM and PCIe: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#     (BF16 312 dense, TF32 156 dense)
PEAK_TFLOPS = {  # (substrings of device_kind, all must match) -> {dtype: TFLOP/s}
    ("H100", "PCIe"): {"bfloat16": 756.5, "float32": 378.0},
    ("H100", "NVL"): {"bfloat16": 835.5, "float32": 417.5},
    ("H100",): {"bfloat16": 989.5, "float32": 494.5},  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", "NVL"): {"bfloat16": 835.5, "float32": 417.5},
    ("H200",): {"bfloat16": 989.5, "float32": 494.5},  # SXM
    ("A100",): {"bfloat16": 312.0, "float32": 156.0},
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's peak dense TFLOP/s for ``dtype``, or None where it is not in the table (CPUs)."""
    for keys, peaks in PEAK_TFLOPS.items():
        if all(k.lower() in device_kind.lower() for k in keys):
            return peaks.get(dtype)
    return None


def _xla_flops(lowered, compiled) -> float | None:
    """XLA's FLOP count of the program before optimisation, else of the compiled one, else None.

    The lowered program first: it holds the model's own convolutions and dots, and XLA counts
    them alike on every backend. The compiled one on a GPU hands its convolutions to cuDNN as
    custom calls, which XLA does not count (the H200's bench of 2026-12-04 recorded 0.021
    GFLOP per training image that way, against 1.897 counted).
    """
    for stage in (lowered, compiled):
        try:
            cost = stage.cost_analysis()
        except Exception:  # noqa: BLE001 - an optional statistic; some backends raise
            continue
        if isinstance(cost, (list, tuple)):  # older jax: one dict per program
            cost = cost[0] if cost else None
        flops = (cost or {}).get("flops")
        if flops and flops > 0:
            return float(flops)
    return None


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def synthetic_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[Split, Split]:
    """Uniform uint8 noise shaped like Fashion-MNIST (throughput does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    shape = (FASHION_MNIST.image_size, FASHION_MNIST.image_size, FASHION_MNIST.channels)

    def split(n):
        return Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))

    return split(n_train), split(n_test)


def load_npz(path: str) -> tuple[Split, Split]:
    """The array cache ``resnet_jax.data`` writes (train_images, train_labels, test_images, test_labels)."""
    what = "a resnet_jax array cache (an .npz of train_images, train_labels, test_images, test_labels)"
    try:
        z = np.load(path)  # allow_pickle=False: a file of pickled objects is refused, not run
    except OSError as err:
        raise UserError(f"--data {path}: {err.strerror or err}") from err
    except ValueError as err:  # NumPy's advice to allow pickles would be wrong here
        raise UserError(f"--data {path} is not an .npy or .npz file; expected {what}") from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"--data {path} holds a single array (.npy); expected {what}")
    try:
        with z:
            train, test = Split(z["train_images"], z["train_labels"]), Split(z["test_images"], z["test_labels"])
        data.check_splits(FASHION_MNIST, train, test)  # the shapes and dtype data.load insists on
    except (OSError, ValueError, KeyError, data.DataError) as err:
        raise UserError(f"--data {path} is not a readable resnet_jax array cache: {err}") from err
    return train, test


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


@dataclass
class Timings:
    """Wall times of the timed repeats (after warm-up)."""

    train_s: list[float]  # one entry per repeat of `steps` training steps
    eval_s: list[float]  # one entry per pass over the evaluation split
    steps: int  # training steps per repeat


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory in bytes; None where Python cannot read it (Windows)."""
    # Linux's own count first: ru_maxrss carries the parent's peak over into a spawned process
    # (fork, then exec), which ChapterProcess's is.
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def make_row(impl, label, resize, dtype, batch, device_name, backend, t: Timings, n_eval, compile_s,
             peak_device_bytes, xla_train=None, xla_eval=None, notes="") -> dict:
    """One result row: throughput, step-time statistics, FLOP/s and MFU from the raw timings."""
    gf_train, gf_eval = counted_gflop(resize)
    row = {
        "impl": impl,
        "label": label,
        "resize": resize,
        "dtype": dtype,
        "batch": batch,
        "device": device_name,
        "backend": backend,
        "step_ms_all": [1000 * s / t.steps for s in t.train_s],
        "eval_s_all": list(t.eval_s),
        "steps_per_repeat": t.steps,
        "eval_images": n_eval,
        "compile_s": compile_s,
        "peak_device_bytes": peak_device_bytes,
        "peak_rss_bytes": _peak_rss_bytes(),
        "counted_gflop_per_train_image": gf_train,
        "counted_gflop_per_eval_image": gf_eval,
        "xla_gflop_per_train_image": xla_train,
        "xla_gflop_per_eval_image": xla_eval,
        "peak_tflops": peak_tflops(device_name, dtype),
        "notes": notes,
    }
    return _with_statistics(row)


def _with_statistics(row: dict) -> dict:
    """``row`` with every figure derived from its raw times (step_ms_all, eval_s_all) filled in."""
    step_ms = row["step_ms_all"]
    row["step_ms_median"] = statistics.median(step_ms)
    row["step_ms_spread"] = max(step_ms) - min(step_ms)
    row["train_images_per_s"] = row["batch"] / (row["step_ms_median"] / 1000)
    row["eval_images_per_s"] = row["eval_images"] / statistics.median(row["eval_s_all"])
    row["train_tflops"] = row["train_images_per_s"] * row["counted_gflop_per_train_image"] / 1e3
    row["eval_tflops"] = row["eval_images_per_s"] * row["counted_gflop_per_eval_image"] / 1e3
    row["mfu"] = row["train_tflops"] / row["peak_tflops"] if row["peak_tflops"] else None
    return row


def bench_jax(config: Config, train: Split, test: Split, repeats: int, steps: int | None = None) -> dict:
    """Time resnet_jax's own training and evaluation programs on the first device.

    One device, like the PyTorch rows (fit itself would shard over all of them).

    The programs are the ones ``training.fit`` compiles: ``train_chunk`` (K
    steps in one ``fori_loop``) where fit uses K > 1, else one ``train_step``
    per call; ``evaluate_batches`` (one scan over the split) off CPU, else
    ``eval_step`` per batch. ``steps`` defaults to fit's K for the backend.
    """
    device = jax.devices()[0]
    backend = device.platform
    r, bs = config.resize, config.batch_size
    put = functools.partial(jax.device_put, device=device)
    train_x, train_y = put(train.images), put(train.labels)
    eval_bs = min(config.eval_batch_size, len(test))
    test_x, test_y, test_m = map(put, training.pad_batches(test, eval_bs))
    model = training.make_model(config, FASHION_MNIST.num_classes, FASHION_MNIST.channels)
    state = put(training.create_train_state(model, training.make_optimizer(config), jax.random.key(config.seed)))

    full = len(train) // bs  # the timed steps are full batches
    epoch_steps = -(-len(train) // bs)
    K = max(1, min(steps or training.steps_per_dispatch(config, backend), full))
    # As fit: when the epoch ends on a smaller batch, its one device-loop program masks every
    # step (here all masks are true, and the masking is part of the cost measured); with one
    # step per call (CPU) the full batches run a program without the mask.
    masked = len(train) % bs != 0 and K > 1
    idx = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

    compile_s = 0.0  # of the programs fit runs; the ones compiled only for XLA's FLOP count are not in it

    def compile_(jitted, *args, counted=True):
        """Lower and compile (timed as fit times it: tracing, lowering and XLA's compile)."""
        nonlocal compile_s
        t0 = time.perf_counter()
        lowered = jitted.lower(*args)
        compiled = lowered.compile()
        compile_s += (time.perf_counter() - t0) if counted else 0.0
        return lowered, compiled

    # One step on rows `idx` of the on-device split, as fit compiles it for K == 1.
    # Always compiled: XLA's cost analysis of one step is the FLOP cross-check (of a
    # fori_loop it would count the body once, whatever the trip count).
    step_lowered, one_step = compile_(
        training.jit(functools.partial(training.train_rows, resize=r, masked=masked), donate_argnums=0),
        state, train_x, train_y, idx(bs), counted=K == 1,
    )
    static = False
    if K > 1:  # as fit: a constant trip count when K divides the epoch's steps
        jitted, static = training.jit_train_chunk(K, epoch_steps, r, masked=masked)
        steps_arg = () if static else (jax.ShapeDtypeStruct((), jnp.int32),)
        _, chunk = compile_(jitted, state, train_x, train_y, idx(K, bs), *steps_arg)
        run = lambda s, rows: chunk(s, train_x, train_y, rows, *(() if static else (jnp.int32(K),)))
    else:
        run = lambda s, rows: one_step(s, train_x, train_y, rows[0])
    eval_lowered, one_eval = compile_(
        training.jit(lambda s, x, y, m: training.eval_step(s, x, y, r, m)),
        state, test_x[0], test_y[0], test_m[0], counted=backend == "cpu",
    )
    if backend != "cpu":
        _, evaluate = compile_(training.jit(functools.partial(training.evaluate_batches, resize=r)), state, test_x, test_y, test_m)
    else:  # as fit: no device loop on XLA:CPU, one call per batch
        def evaluate(s, xs, ys, ms):
            return functools.reduce(training.add_metrics, (one_eval(s, xs[i], ys[i], ms[i]) for i in range(xs.shape[0])))

    # Shuffled batch rows, (chunks, K, B), on the device. fit draws them once per
    # epoch (training.epoch_plan); that is not part of a step, so it is not timed.
    num_chunks = full // K
    perm = jax.random.permutation(jax.random.key(1), len(train))[: num_chunks * K * bs]
    rows = put(perm.astype(jnp.int32).reshape(num_chunks, K, bs))

    state, m = run(state, rows[0])  # warm-up
    jax.block_until_ready(m)
    jax.block_until_ready(evaluate(state, test_x, test_y, test_m))
    train_s, eval_s = [], []
    for i in range(repeats):
        t = time.perf_counter()
        state, m = run(state, rows[(i + 1) % num_chunks])
        jax.block_until_ready(m)
        train_s.append(time.perf_counter() - t)
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(evaluate(state, test_x, test_y, test_m))
        eval_s.append(time.perf_counter() - t)
    if not math.isfinite(float(m["loss"])):
        raise RuntimeError(f"JAX training diverged at {r}x{r}: loss {float(m['loss'])}")

    stats = device.memory_stats() or {}
    flops_train, flops_eval = _xla_flops(step_lowered, one_step), _xla_flops(eval_lowered, one_eval)
    kind = device.device_kind if backend != "cpu" else training.cpu_name()
    return make_row(
        "jax", f"JAX resnet_jax (conv_impl={config.conv_impl})", r, config.dtype, bs, kind, backend,
        Timings(train_s, eval_s, K), len(test), compile_s, stats.get("peak_bytes_in_use"),
        xla_train=flops_train / bs / 1e9 if flops_train else None,
        xla_eval=flops_eval / eval_bs / 1e9 if flops_eval else None,
        notes=f"{K} step(s) per dispatch" + (" (a constant trip count)" if static else "")
              + (" (masked: the epoch ends on a smaller batch)" if masked else "")
              + f"; eval batch {eval_bs}",
    )


# --- PyTorch ---------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_net(seed: int):
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from torch_reference import make_initialised_net

    return make_initialised_net(FASHION_MNIST.channels, FASHION_MNIST.num_classes, seed)


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # d2l.try_gpu()


def set_torch_threads(threads: int | None) -> int:
    """PyTorch's intra-op threads: all CPUs by default, as benchmarks/cpu_step.py runs it.

    On a machine shared with other busy processes, several OpenMP threads wait
    for each other at every barrier and a step can take 10x longer than with one
    thread: record figures on a quiet machine, or pass --torch-threads 1.
    """
    import torch

    torch.set_num_threads(threads or os.cpu_count())
    return torch.get_num_threads()


def _time_torch(train_steps, steps: int, evaluate, repeats: int, device):
    """Seconds of ``repeats`` timed calls of train_steps(steps) (synced) and of evaluate(), after the caller's warm-up."""
    train_s, eval_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        train_steps(steps)
        _torch_sync(device)
        train_s.append(time.perf_counter() - t)
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate()
        eval_s.append(time.perf_counter() - t)
    return train_s, eval_s


def _torch_sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else training.cpu_name()


def _torch_peak(device):
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def chapter_transform(resize: int):
    """d2l's ``transforms.Compose([transforms.Resize(resize), transforms.ToTensor()])`` on a PIL image.

    Without torchvision, the same two steps by hand: torchvision resizes a PIL
    image with PIL's own ``Image.resize`` (bilinear; an int size sets the
    shorter side, so a square image becomes resize x resize), and ``ToTensor``
    turns a mode-"L" image into a (1, H, W) float tensor divided by 255.
    """
    try:
        from torchvision import transforms

        return transforms.Compose([transforms.Resize(resize), transforms.ToTensor()])
    except ImportError:
        pass
    # A partial of a module-level function, not a closure: where the DataLoader's workers are
    # spawned (macOS, Windows, Python 3.14's forkserver), the dataset is pickled to them.
    return functools.partial(_resize_to_tensor, resize=resize)


def _resize_to_tensor(img, resize: int):
    import torch
    from PIL import Image

    if img.size != (resize, resize):
        img = img.resize((resize, resize), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(img, np.uint8, copy=True))
    return x.view(img.size[1], img.size[0], 1).permute(2, 0, 1).float().div(255)


class ChapterDataset:
    """torchvision's FashionMNIST over our uint8 arrays: a PIL "L" image per item, transformed."""

    def __init__(self, split: Split, resize: int):
        self.images, self.labels, self.transform = split.images, split.labels, chapter_transform(resize)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i][..., 0])), int(self.labels[i])


def _cycle(loader):
    while True:  # a new epoch (and worker start-up) when the loader runs out, as in train_ch6
        yield from loader


def bench_torch_chapter(train: Split, test: Split, resize: int, batch: int, repeats: int, steps: int,
                        workers: int = 4, lr: float = 0.05, seed: int = 0) -> dict:
    """The chapter's loop as readers run it: DataLoader + CPU resize, d2l train_ch6's inner loop, float32."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    device = _torch_device()
    torch.manual_seed(seed)
    # d2l.load_data_fashion_mnist: shuffled train loader, ordered test loader, both batch_size.
    train_iter = DataLoader(ChapterDataset(train, resize), batch, shuffle=True, num_workers=workers)
    test_iter = DataLoader(ChapterDataset(test, resize), batch, shuffle=False, num_workers=workers)
    net = _torch_net(seed).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    batches = _cycle(train_iter)
    metric = [0.0, 0.0, 0]  # d2l.Accumulator(3): loss sum, correct, examples

    def train_steps(k):
        net.train()
        for _ in range(k):
            X, y = next(batches)
            optimizer.zero_grad()
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            l = loss(y_hat, y)
            l.backward()
            optimizer.step()
            with torch.no_grad():  # d2l's metric.add(...): float() syncs with the device every step
                metric[0] += float(l * X.shape[0])
                metric[1] += float((y_hat.argmax(axis=1) == y).sum())
                metric[2] += X.shape[0]

    def evaluate():  # d2l.evaluate_accuracy_gpu
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for X, y in test_iter:
                X, y = X.to(device), y.to(device)
                correct += float((net(X).argmax(axis=1) == y).sum())
                total += y.numel()
        return correct / total

    torch.backends.cudnn.benchmark = False  # its readers' default (the tuned loop restores it, but be sure)
    # Warm-up: worker start-up; then past the batches the workers prepared while evaluate()
    # ran (workers x prefetch_factor 2), so that no timed repeat starts with a queue the
    # untimed part filled (the H200's repeats of 2026-12-04 rose from 19.2 to 21.3 ms).
    train_steps(1)
    evaluate()
    train_steps(2 * workers + 2)
    train_s, eval_s = _time_torch(train_steps, steps, evaluate, repeats, device)
    if not math.isfinite(metric[0]):
        raise RuntimeError("the chapter's PyTorch loop diverged")
    return make_row(
        "torch_chapter", "PyTorch, the chapter's loop (DataLoader + CPU resize)", resize, "float32", batch,
        _torch_device_name(device), device.type, Timings(train_s, eval_s, steps), len(test), None,
        _torch_peak(device),
        notes=f"{workers} DataLoader workers, started by {multiprocessing.get_start_method()}; "
              f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; "
              f"resize by {'torchvision' if _has_torchvision() else 'Pillow (torchvision not installed)'}",
    )


def _serve_chapter(conn, torch_threads: int | None, start_method: str, parent: int) -> None:
    """The chapter's process: bench_torch_chapter for each (args, kwargs) received, until the pipe closes."""
    # A spawned process takes "spawn" as its default; the DataLoader would spawn its workers.
    multiprocessing.set_start_method(start_method, force=True)
    set_torch_threads(torch_threads)
    # Ctrl-C is the parent's to handle: it ends this process (close, terminate). The DataLoader's
    # workers inherit the setting and end with this process (PyTorch's watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_with_parent():  # a parent killed alone (SIGKILL, the OOM killer) leaves no orphan measuring on
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    while True:
        try:
            args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            reply = (True, bench_torch_chapter(*args, **kwargs))
        except Exception as err:
            reply = (False, err)
        try:
            conn.send(reply)
        except Exception as err:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}; and it could not be sent: {err}")))


class ChapterProcess:
    """The chapter's loop, measured in a Python process of its own that never starts JAX.

    Its DataLoader forks its workers, at every epoch. Forked from the process that runs JAX's
    thread pools, each fork drew JAX's warning that it "will likely lead to a deadlock" (a lock
    one of those threads holds stays held in the child), and each copied a process that holds
    JAX's programs and arrays. The chapter's readers fork from a process that runs only PyTorch;
    so does this one, spawned (not forked) once per run and reused by every round. (It imports
    this module, and with it JAX and Flax, but starts no JAX backend.) Its workers start as this
    platform's default has them start (fork on Linux before Python 3.14), as the readers' do,
    not as it was started itself. Leaving the ``with`` block on an exception (Ctrl-C) ends the
    process at once, not after its measurement.
    """

    def __init__(self, torch_threads: int | None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._process = ctx.Process(target=_serve_chapter, name="chapter's loop",
                                    args=(theirs, torch_threads, multiprocessing.get_start_method(), os.getpid()))
        self._process.start()
        theirs.close()

    def measure(self, *args, **kwargs) -> dict:
        """bench_torch_chapter(*args, **kwargs), run there; its exceptions are raised here."""
        self._conn.send((args, kwargs))
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the chapter's loop's process ended (exit code {self._process.exitcode})") from None
        if not ok:
            raise value
        return value

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self._conn.close()  # the process's next receive ends it
        self._process.join(timeout=None if exc_type is None else 0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def torch_compile_default(device_type: str) -> bool:
    """torch.compile by default on CUDA only.

    On CPU, Inductor compiles the model with the system C++ compiler: on the
    shared 2-core development machine the first compiled step (forward and
    backward, batch 8, 28x28) took 56 s, and the next two were still 1.4 s and
    0.7 s. Not usable for a benchmark there, so it is off on CPU unless
    ``--torch-compile on``.
    """
    return device_type == "cuda"


TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def bench_torch_tuned(train: Split, test: Split, resize: int, batch: int, dtype: str, repeats: int, steps: int,
                      compile_model: bool | None = None, eval_batch: int = 1000, lr: float = 0.05,
                      seed: int = 0, compile_mode: str = "default") -> dict:
    """PyTorch as a performance engineer would run the same model: everything on the device.

    ``compile_mode``: torch.compile's mode. On the H200 the default mode's step varied from 10.3
    to 13.9 ms, launch-bound; "reduce-overhead" replays the compiled forward and backward as
    CUDA graphs, which removes most launches, and is what a fair comparison should try too.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    device = _torch_device()
    if compile_model is None:
        compile_model = torch_compile_default(device.type)
    # cuDNN's autotuning for this loop only: it is process-wide, and other PyTorch code in this
    # process must have its readers' default (off). The bench of 2026-12-04 left it on for the
    # chapter's loop, which then ran in this process (ChapterProcess since 2026-12-07).
    benchmark_was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        net = _torch_net(seed).to(device, memory_format=torch.channels_last)
        # fused SGD: one kernel for all parameters (CUDA, torch >= 2.3); the same update as plain SGD.
        fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.SGD).parameters
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, **({"fused": True} if fused else {}))
        criterion = nn.CrossEntropyLoss()

        def amp():  # a fresh context each time: what torch.compile traces best
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        train_x = torch.from_numpy(train.images).to(device)  # uint8 (N, 28, 28, 1)
        train_y = torch.from_numpy(train.labels).long().to(device)
        test_x = torch.from_numpy(test.images).to(device)
        test_y = torch.from_numpy(test.labels).long().to(device)

        def preprocess(x_u8):
            # Scale, then a float bilinear resize (antialiased when shrinking, like PIL): within 1/255 of
            # resnet_jax's Pillow-exact integer resize (resnet_jax/transforms.py), which costs no more
            # (BENCHMARKS.md, "Preprocessing").
            x = x_u8.permute(0, 3, 1, 2).float().div(255)
            if x.shape[-1] != resize:
                # Antialiased only when shrinking (PIL's filter widens then); upsampling is plain bilinear either way.
                shrink = resize < x.shape[-1]
                x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=shrink)
            return x.contiguous(memory_format=torch.channels_last)

        def forward_loss(x_u8, y):
            with amp():
                logits = net(preprocess(x_u8))
                return criterion(logits, y), logits

        def forward_eval(x_u8):
            with amp():
                return net(preprocess(x_u8))

        if compile_model:
            forward_loss, forward_eval = (torch.compile(f, mode=compile_mode) for f in (forward_loss, forward_eval))

        n = len(train)
        perm = torch.randperm(n, device=device)
        sums = torch.zeros(2, device=device)  # loss sum, correct: on the device, read once at the end
        position = 0

        def train_steps(k):
            nonlocal perm, position
            net.train()
            for _ in range(k):
                if position + batch > n:
                    perm, position = torch.randperm(n, device=device), 0
                idx = perm[position : position + batch]
                position += batch
                x, y = train_x[idx], train_y[idx]
                optimizer.zero_grad(set_to_none=True)
                l, logits = forward_loss(x, y)
                l.backward()
                optimizer.step()
                with torch.no_grad():
                    sums[0] += l.detach().float() * batch
                    sums[1] += (logits.argmax(1) == y).sum()

        def evaluate():
            net.eval()
            correct = torch.zeros((), device=device)
            with torch.inference_mode():
                for i in range(0, len(test), eval_batch):
                    correct += (forward_eval(test_x[i : i + eval_batch]).argmax(1) == test_y[i : i + eval_batch]).sum()
            return float(correct) / len(test)

        t0 = time.perf_counter()
        # Warm-up; with torch.compile this is where it compiles. Three steps: reduce-overhead runs
        # its first calls without CUDA graphs and records them on a later one, which must not fall
        # into a timed repeat.
        train_steps(3)
        _torch_sync(device)
        evaluate()
        warmup_s = time.perf_counter() - t0
        train_s, eval_s = _time_torch(train_steps, steps, evaluate, repeats, device)
        if not math.isfinite(float(sums[0])):
            raise RuntimeError("the tuned PyTorch loop diverged")
        tricks = ["data on device", "channels_last"]
        tricks += ["bf16 autocast"] if dtype == "bfloat16" else []
        tricks += ([f"torch.compile (mode {compile_mode})"] if compile_model
                   else [f"no torch.compile (default off on {device.type})"])
        tricks += ["fused SGD"] if fused else []
        tricks += ["cudnn.benchmark"] if device.type == "cuda" else []
        name = "PyTorch, tuned" + (f" ({compile_mode})" if compile_model and compile_mode != "default" else "")
        return make_row(
            "torch_tuned", name,
            resize, dtype, batch, _torch_device_name(device), device.type,
            Timings(train_s, eval_s, steps), len(test), warmup_s if compile_model else None, _torch_peak(device),
            notes="; ".join(tricks) + f"; eval batch {eval_batch}; {torch.get_num_threads()} torch threads"
                  + ("; compile_s = its first 3 train steps + first evaluation, run included (torch.compile compiles at the first call)"
                     if compile_model else ""),
        )
    finally:
        torch.backends.cudnn.benchmark = benchmark_was


def bench_full_recipe(config: Config, train: Split, test: Split) -> dict:
    """``training.fit`` end to end: the whole recipe, compile and per-epoch evaluation included."""
    t0 = time.perf_counter()  # from the initial state on, as train.py's run pays for it
    state = training.initial_state(config)  # what train.py starts from
    result = training.fit(config, train, test, state)
    wall = time.perf_counter() - t0
    f = result.final
    return {
        "epochs": config.epochs,
        "batch": config.batch_size,
        "resize": config.resize,
        "dtype": config.dtype,
        "train_examples": len(train),
        "test_examples": len(test),
        "wall_s": wall,  # everything fit does: device transfer, compile, training, evaluation
        "compile_s": f["compile_s"],
        "compile_s_by_program": f["compile_s_by_program"],
        "train_time_s": f["train_time_s"],
        "train_images_per_s": f["examples_per_sec"],
        "test_acc": f["test_acc"],
        "device": f["device"],
        "backend": f["backend"],
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def environment(argv: list[str]) -> dict:
    """Device, library versions, date and the exact command: recorded with every row."""
    import flax
    import jaxlib
    import optax

    import PIL

    versions = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
                "pillow": PIL.__version__, "torch": None, "torchvision": None}
    d = jax.devices()[0]
    with contextlib.suppress(Exception):  # e.g. "cuda 13000": the CUDA that jaxlib's plugin runs on
        versions["jax_platform"] = d.client.platform_version
    if torch_available():
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            versions["torch_cuda"] = torch.version.cuda
            versions["cudnn"] = torch.backends.cudnn.version()
        with contextlib.suppress(ImportError):
            import torchvision

            versions["torchvision"] = torchvision.__version__
    return {
        "jax_device": d.device_kind if d.platform != "cpu" else training.cpu_name(),
        "jax_backend": d.platform,
        "cpu_count": os.cpu_count(),
        "gpu_driver": _nvidia_driver() if d.platform == "gpu" else None,
        "host_pages": "2 MiB (glibc.malloc.hugetlb=1)" if hugepages.active() else "default (4 KiB unless the kernel says always)",
        "versions": versions,
        "code": _code_version(),
        # What changes XLA's or the libraries' choices without a flag of ours.
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(argv),
    }


ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP_", "TF_FORCE_GPU", "LIBTPU_", "CUDA_VISIBLE_DEVICES", "NVIDIA_TF32", "TORCH_", "OMP_",
                "GLIBC_TUNABLES", "RESNET_JAX_")


def _nvidia_driver() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0] if out else None
    return None


def _code_version() -> str:
    """The commit of the code measured, "+ changes" where the tree differs from it; or why unknown
    (the device machines get a copy of the tree without .git: BENCHMARKS.md names the commit)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo, timeout=30)
        if head.returncode != 0:
            return "unknown (no git repository)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=repo, timeout=30).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def speedups(rows: list[dict]) -> list[dict]:
    """JAX's training images/s over each PyTorch row's, per (resize, dtype): the project's targets are ratios.

    The chapter's loop runs float32 only (it is the chapter's code); every JAX
    dtype is compared with it.
    """
    out = []
    for j in (r for r in rows if r["impl"] == "jax"):
        for t in rows:
            if t["resize"] == j["resize"] and (
                t["impl"] == "torch_chapter" or (t["impl"] == "torch_tuned" and t["dtype"] == j["dtype"])
            ):
                out.append({"resize": j["resize"], "jax_dtype": j["dtype"], "versus": t["impl"],
                            "versus_dtype": t["dtype"],
                            "train_speedup": j["train_images_per_s"] / t["train_images_per_s"],
                            "eval_speedup": j["eval_images_per_s"] / t["eval_images_per_s"]})
    return out


def _f(x, spec):
    return "n/a" if x is None else format(x, spec)


def _gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


COLUMNS = (
    "implementation", "resize", "dtype", "batch", "train img/s", "eval img/s", "step ms (median)",
    "spread ms (max-min)", "compile s", "peak device mem", "train TFLOP/s", "MFU", "GFLOP/img counted, all taps (XLA)",
)

# Printed under the table: what its less obvious columns mean (the README's and BENCHMARKS.md's
# figures are read from it).
COLUMN_NOTES = (
    "GFLOP/img counted, all taps: every kernel tap of every convolution, padding included (what a dense "
    "convolution computes; counted_gflop), training as 3x the forward pass less the stem's input gradient. "
    "XLA's count (in brackets, of the program before optimisation) adds BatchNorm, ReLU and the update, and "
    "skips the taps on padding of the convolutions that lower as XLA convolutions (on CPU the smallest maps "
    "lower as patches, whose padding it counts). Train TFLOP/s and MFU use the all-taps count; "
    "MFU divides by the device's dense peak (bf16; TF32 for float32)",
    "compile s: JAX's trace, lower and compile of the training step; the tuned PyTorch's first training steps and "
    "first evaluation, run included (torch.compile compiles at the first call)",
)


def markdown(report: dict) -> str:
    env, v = report["environment"], report["environment"]["versions"]
    lines = [
        *(["**Partial: the run stopped before it finished; these rows are what it had measured.**", ""]
          if report.get("complete") is False else []),
        f"Device: {env['jax_device']} ({env['jax_backend']} backend, {env['cpu_count']} CPUs); "
        f"JAX {v['jax']}, jaxlib {v['jaxlib']}, Flax {v['flax']}, Optax {v['optax']}, PyTorch {v['torch'] or 'not installed'}, "
        f"Python {v['python']}; {env['date']}; host memory pages: {env.get('host_pages', 'not recorded')}.",
        *(["Also: " + ", ".join(f"{k} {v[k]}" for k in ("numpy", "pillow", "torchvision", "jax_platform", "torch_cuda", "cudnn")
                                 if v.get(k) is not None)
           + (f", GPU driver {env['gpu_driver']}" if env.get("gpu_driver") else "") + "."] if "pillow" in v else []),
        f"Code: {env.get('code', 'not recorded')}; environment: "
        + (", ".join(f"{k}={val}" for k, val in env["env"].items()) if env.get("env") else "no XLA_/JAX_/TORCH_/... variables set") + ".",
        f"Data: {report['data']}.",
        f"Command: `{env['command']}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in report["rows"]:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        xla = _f(r["xla_gflop_per_train_image"], ".3f")
        lines.append(
            f"| {r['label']} | {r['resize']} | {r['dtype']} | {r['batch']} | {r['train_images_per_s']:,.0f} "
            f"| {r['eval_images_per_s']:,.0f} | {r['step_ms_median']:.2f} | {r['step_ms_spread']:.2f} "
            f"| {_f(r['compile_s'], '.1f')} | {_gib(r['peak_device_bytes'])} | {r['train_tflops']:.2f} | {mfu} "
            f"| {r['counted_gflop_per_train_image']:.3f} ({xla}) |"
        )
    if report.get("speedups"):
        lines += ["", "JAX's images/s over PyTorch's (same device, same run):", ""]
        for s in report["speedups"]:
            lines.append(
                f"- {s['resize']}x{s['resize']}, JAX {s['jax_dtype']} vs {s['versus']} ({s['versus_dtype']}): "
                f"training {s['train_speedup']:.2f}x, evaluation {s['eval_speedup']:.2f}x"
            )
    if report["rows"]:
        r0 = report["rows"][0]
        lines += ["", f"Step times: the median and spread of {len(r0['step_ms_all'])} timed repeats of "
                      f"{r0['steps_per_repeat']} steps each, after a warm-up; evaluation: the median of "
                      f"{len(r0['eval_s_all'])} passes over {r0['eval_images']:,} images."]
        lines += [f"- {note}." for note in COLUMN_NOTES]
    peak_rss = _highest_peak_rss(report["rows"], default=_peak_rss_bytes())
    # The chapter's loop reads its own process's peak (ChapterProcess); the largest is the one given.
    lines += ["", f"Process peak RSS (host memory, not device memory; whole run; the largest of this process "
                  f"and the chapter's loop's own): {_gib(peak_rss)}."]
    rounds = max((r.get("rounds", 1) for r in report["rows"]), default=1)
    if rounds > 1:
        lines.append(f"Step and evaluation times pooled over {rounds} interleaved rounds "
                     f"(each implementation measured in turn, {len(report['rows'][0]['step_ms_all']) // rounds} "
                     "timed repeats per round).")
    for r in report["rows"]:
        if r["notes"]:
            lines.append(f"- {r['label']}, {r['resize']}x{r['resize']} {r['dtype']}: {r['notes']}")
    for note in report["notes"]:
        lines.append(f"- {note}")
    fr = report.get("full_recipe")
    if fr:
        lines += [
            "",
            f"Full recipe (`training.fit`, {fr['epochs']} epochs of {fr['train_examples']:,} at batch {fr['batch']}, "
            f"{fr['resize']}x{fr['resize']}, {fr['dtype']}, evaluation on {fr['test_examples']:,} after each epoch): "
            f"**{fr['wall_s']:.1f} s** wall, compile included ({fr['compile_s']:.1f} s compile, "
            f"{fr['train_time_s']:.1f} s training, {fr['train_images_per_s']:,.0f} training images/s), "
            f"final test accuracy {fr['test_acc']:.3f}"
            + (" (synthetic data: chance level is expected)." if "synthetic" in report["data"] else "."),
        ]
        if fr.get("compile_s_by_program"):  # absent from reports written before it existed
            lines.append("Its compile, program by program (trace, lower and compile): "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in fr["compile_s_by_program"].items()) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _highest_peak_rss(rows: list[dict], default: int | None) -> int | None:
    """The highest host peak the rows recorded (None where a platform could not read one)."""
    return max((r["peak_rss_bytes"] for r in rows if r["peak_rss_bytes"] is not None), default=default)


def merge_rounds(rows: list[dict]) -> dict:
    """One row from the same measurement taken in several interleaved rounds (``--rounds``).

    Step and evaluation times are pooled and every statistic is derived again from
    the pool. Compile time and FLOP counts are the first round's (later rounds reuse
    the caches); the device peak is the first round's too (a process-wide high-water mark,
    which a later round may read after a bigger program); the host peak is the highest seen.
    """
    if len(rows) == 1:
        return rows[0]
    row = dict(rows[0])
    row["step_ms_all"] = [ms for r in rows for ms in r["step_ms_all"]]
    row["eval_s_all"] = [t for r in rows for t in r["eval_s_all"]]
    row["peak_rss_bytes"] = _highest_peak_rss(rows, default=None)
    row["rounds"] = len(rows)
    return _with_statistics(row)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="benchmarks/bench.py",
        description="resnet_jax vs the chapter's PyTorch loop vs a tuned PyTorch, one device, one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=256, help="training batch size")
    p.add_argument("--resize", type=int, nargs="+", default=[96, 28], help="image sides to measure")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=DTYPES, help="computation dtypes (JAX and tuned PyTorch)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    p.add_argument("--rounds", type=int, default=1, help="measure every implementation this many times in turn, each round starting one later (JAX, tuned, chapter; tuned, chapter, JAX; ...), and pool the repeats, so that a drift of the machine's speed hits all of them alike")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat (default: fit's steps per dispatch: 32 on GPU/TPU, 1 on CPU)")
    p.add_argument("--train-examples", type=int, default=60_000,
                   help="training set size: synthetic, or with --data its first N images (59,904 = 234 x 256 leaves "
                        "fit no smaller last batch, hence no mask)")
    p.add_argument("--eval-examples", type=int, default=None, help="examples per evaluation pass (default: the 10,000 test images on GPU/TPU, 4 batches on CPU)")
    p.add_argument("--eval-batch", type=int, default=Config().eval_batch_size, help="evaluation batch (JAX and tuned PyTorch)")
    p.add_argument("--conv-impl", default=Config().conv_impl, choices=IMPLS, help="resnet_jax convolution lowering")
    p.add_argument("--data", metavar="NPZ", default=None, help="resnet_jax's array cache instead of synthetic images")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--torch-threads", type=int, default=None, help="PyTorch intra-op CPU threads (default: all CPUs)")
    p.add_argument("--torch-workers", type=int, default=4, help="DataLoader workers of the chapter's loop (d2l: 4)")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto", help="torch.compile in the tuned PyTorch (auto: on for CUDA, off on CPU)")
    p.add_argument("--torch-compile-mode", choices=TORCH_COMPILE_MODES, default="default",
                   help="torch.compile's mode in the tuned PyTorch (reduce-overhead: CUDA graphs)")
    p.add_argument("--full-recipe", action="store_true", help="also time training.fit over the whole recipe: batch 256, 96x96, the first --dtype, evaluation after each epoch (hours on CPU)")
    p.add_argument("--recipe-epochs", type=int, default=10, help="epochs of --full-recipe")
    p.add_argument("--out", metavar="DIR", default=None, help="write bench.json and bench.md here")
    return p


def run(args, argv: list[str], say=print) -> dict:
    """Everything the command line asks for; returns the report (also written to --out)."""
    if args.out:
        check_writable_dir(Path(args.out), "--out")
    backend = jax.default_backend()
    n_eval = args.eval_examples or (10_000 if backend != "cpu" else 4 * args.batch)
    if args.data:
        train, test = load_npz(args.data)
        train, test = train.take(min(args.train_examples, len(train))), test.take(min(n_eval, len(test)))
        data_note = f"the array cache {args.data} ({len(train):,} train images, the first {len(test):,} test images)"
    else:
        train, test = synthetic_splits(args.train_examples, n_eval)
        data_note = (f"synthetic uint8 noise, {len(train):,} train / {len(test):,} eval images "
                     f"(throughput does not depend on the pixels)")
    if len(train) < args.batch:
        raise UserError(f"the training set ({len(train)} images) is smaller than one batch of {args.batch}")
    steps = args.steps or training.steps_per_dispatch(Config(), backend)
    use_torch = not args.no_torch and torch_available()
    if use_torch:
        set_torch_threads(args.torch_threads)

    report = {"environment": environment(argv), "data": data_note, "rows": [], "notes": [], "full_recipe": None}
    if not use_torch:
        report["notes"].append("PyTorch " + ("skipped (--no-torch)" if args.no_torch else "not installed: no PyTorch rows"))
    compile_torch = {"auto": None, "on": True, "off": False}[args.torch_compile]
    if use_torch and compile_torch is None and not torch_compile_default(_torch_device().type):
        report["notes"].append(
            "torch.compile is off for the tuned PyTorch on CPU by default (Inductor's C++ compile of this "
            "network took about a minute even at batch 8, 28x28, on the 2-core machine); --torch-compile on to include it")
    def save(rows: list[dict], done: bool) -> str:
        """The report with ``rows`` so far, written to --out: a run cut off (a time limit) keeps what it measured."""
        report["rows"] = [{**row, "environment": report["environment"]} for row in rows]
        report["speedups"] = speedups(report["rows"])
        report["complete"] = done
        md = markdown(report)
        if args.out:
            out = Path(args.out)
            write_json(out / "bench.json", report)
            (out / "bench.md").write_text(md)
        return md

    measured: list[dict] = []
    # The chapter's loop runs in a process of its own, started once for the whole run (ChapterProcess).
    with ChapterProcess(args.torch_threads) if use_torch else contextlib.nullcontext() as chapter:
        # Smallest first: peak_bytes_in_use is the process's high-water mark, so each row's reading is its own.
        for resize in sorted(set(args.resize)):
            jobs = []  # (what is said, the measurement), in the order of the table
            for dtype in sorted(set(args.dtype)):  # bfloat16 before float32
                config = Config(batch_size=args.batch, resize=resize, dtype=dtype,
                                eval_batch_size=args.eval_batch, conv_impl=args.conv_impl)
                jobs.append((f"JAX {resize}x{resize} {dtype}", functools.partial(bench_jax, config, train, test, args.repeats, steps)))
                if use_torch:
                    jobs.append((f"PyTorch tuned {resize}x{resize} {dtype}", functools.partial(
                        bench_torch_tuned, train, test, resize, args.batch, dtype, args.repeats, steps, compile_torch,
                        args.eval_batch, compile_mode=args.torch_compile_mode)))
            if use_torch:
                jobs.append((f"PyTorch chapter's loop {resize}x{resize}", functools.partial(
                    chapter.measure, train, test, resize, args.batch, args.repeats, steps, workers=args.torch_workers)))
            taken: list[list[dict]] = [[] for _ in jobs]  # each job's row of every round
            for r in range(args.rounds):
                tag = f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""
                # Each round starts one job later (JAX, tuned, chapter; tuned, chapter, JAX; ...), so
                # that no implementation always runs first, on a machine fresh from the last one's rest.
                # The first round keeps the table's order: peak device memory is a process-wide
                # high-water mark, and bf16 before float32 keeps the smaller reading its own.
                for i in (k % len(jobs) for k in range(r, r + len(jobs))):
                    say(f"{jobs[i][0]}{tag} ...")
                    taken[i].append(jobs[i][1]())
                    # Saved after every measurement, so that a run cut off (a time limit) keeps what it
                    # has: the first round's rows as they come, then only whole rounds (pooling one
                    # implementation's second round but not another's would compare unlike things).
                    whole = min(len(rows) for rows in taken)
                    save(measured + ([merge_rounds(rows[:whole]) for rows in taken] if whole
                                     else [rows[0] for rows in taken if rows]), done=False)
            measured += [merge_rounds(rows) for rows in taken]
            save(measured, done=False)
    if args.full_recipe:
        config = Config(epochs=args.recipe_epochs, dtype=args.dtype[0], conv_impl=args.conv_impl)
        say(f"full recipe: {config.epochs} epochs, batch {config.batch_size}, {config.resize}x{config.resize}, {config.dtype} ...")
        if args.data:
            recipe_train, recipe_test = load_npz(args.data)
        else:
            recipe_train, recipe_test = synthetic_splits(FASHION_MNIST.num_train, FASHION_MNIST.num_test)
        report["full_recipe"] = bench_full_recipe(config, recipe_train, recipe_test)

    say(save(measured, done=True))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[:] if argv is None else ["benchmarks/bench.py", *argv]
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    try:
        for flag, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--rounds", args.rounds), ("--train-examples", args.train_examples),
                            ("--eval-batch", args.eval_batch), ("--recipe-epochs", args.recipe_epochs)):
            if value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value}")
        for flag, value in (("--steps", args.steps), ("--eval-examples", args.eval_examples)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value}")
        if args.torch_threads is not None and args.torch_threads < 1:
            raise ConfigError(f"--torch-threads must be a positive integer, got {args.torch_threads}")
        if args.torch_workers < 0:
            raise ConfigError(f"--torch-workers must be >= 0, got {args.torch_workers}")
        for resize in args.resize:  # Config's validation, so the messages match train.py's
            Config(batch_size=args.batch, resize=resize, conv_impl=args.conv_impl, eval_batch_size=args.eval_batch)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run(args, argv, say=lambda msg: print(msg, flush=True))
    except UserError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
