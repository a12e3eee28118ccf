"""train.py's start-up choice of 2 MiB host pages (resnet_jax/hugepages.py)."""

import os
import subprocess
import sys

import pytest

from resnet_jax import hugepages

PROBE = "from resnet_jax.hugepages import reexec_with_huge_pages as r; r(); import os; print(os.environ.get('GLIBC_TUNABLES'))"


def _run(env_updates):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    env.update(env_updates)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_restarts_once_with_the_tunable_where_it_can_work(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(hugepages.OPT_OUT, raising=False)
    if not hugepages.wanted():
        pytest.skip("not Linux/glibc, or the kernel's transparent huge pages are off")
    assert _run({}) == "glibc.malloc.hugetlb=1"
    # Other tunables are kept; the restarted process does not restart again (it printed once).
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_the_users_choice_wins():
    assert _run({hugepages.OPT_OUT: "0"}) == "None"
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "glibc.malloc.hugetlb=0"


def test_active_reads_the_tunable(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert hugepages.active() and not hugepages.wanted()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert not hugepages.active()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert not hugepages.active()


def test_importing_the_package_does_not_import_jax():
    code = "import sys, resnet_jax, resnet_jax.hugepages; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
