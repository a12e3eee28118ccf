"""Transparent huge pages for host memory: a start-up choice for train.py on Linux.

Why. On CPU, XLA computes each convolution's weight gradient with Eigen, which
wants the batch as the minor axis: XLA transposes every activation from NHWC to
CHWN first. That transpose reads with a stride of H*W*C floats (144 KiB at
b2's 24x24x64), so with 4 KiB pages nearly every read misses the TLB: one such
transpose of a 9.4 MB activation takes 3.3 ms on either one core or two, and
1.6 ms with 2 MiB pages. Over the whole step (batch 64, 96x96, 2 cores) huge
pages took the JAX training step from about 455 ms to about 375-410 ms
(BENCHMARKS.md, "CPU: bench.py, batch 64"). PyTorch gains from them too.

How. Linux hands a process huge pages only where it asks (``madvise``), unless
the machine's ``/sys/kernel/mm/transparent_hugepage/enabled`` says ``always``.
glibc (2.35 and later) asks for every allocation of its own when started with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, and it reads that variable only at
start-up, so :func:`reexec_with_huge_pages` starts the same command again, once,
with the tunable added. It does nothing when the tunable is already set, on
anything but Linux with glibc, where the kernel's setting is ``never``, or when
``RESNET_JAX_HUGE_PAGES=0``. Results are unchanged: only page sizes differ.
"""

from __future__ import annotations

import os
import platform
import sys

OPT_OUT = "RESNET_JAX_HUGE_PAGES"  # set to 0 to keep the default 4 KiB pages
TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _tunables() -> dict[str, str]:
    """``GLIBC_TUNABLES`` as name -> value (its syntax: ``name=value:name=value``)."""
    pairs = (t.partition("=") for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t)
    return {name: value for name, _, value in pairs}


def active() -> bool:
    """Whether this process was started with glibc asked for huge pages."""
    return _tunables().get(TUNABLE, "0") != "0"


def wanted() -> bool:
    """Whether :func:`reexec_with_huge_pages` would restart this process."""
    if os.environ.get(OPT_OUT, "1") == "0" or TUNABLE in _tunables():
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the glibc tunable set (see the module doc).

    Call it first thing in a script's ``__main__`` block, before JAX is imported:
    the process is replaced, nothing before the call survives. Returns only when
    nothing needs to change.
    """
    if not wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
