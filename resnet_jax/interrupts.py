"""Ctrl-C that is never lost: train.py's SIGINT handler, and the checks that act on it late.

SIGTERM (``kill``, a batch scheduler's preemption, ``docker stop``) is handled the same way: the
run stops at once, keeps its last completed epoch (and finishes a checkpoint it was saving),
says "terminated" and exits 143 instead of 130.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to
be. Inside a garbage-collector callback (JAX registers one) the exception is
printed as "Exception ignored in ..." and dropped, so a Ctrl-C in the first
second of a run was lost and the run trained on to the end. The handler here
raises the same KeyboardInterrupt, but also remembers the signal; :func:`check`,
called at the training loop's regular points (cli's hooks), raises it again if
it was swallowed, and the swallowed one is not printed.

While the heavy modules import (numpy, JAX, Flax, Orbax) a Ctrl-C is only
remembered and acted on when the import ends (:func:`defer`, :func:`deferred`):
raised inside jaxlib's initialisation, a KeyboardInterrupt aborts the process.
The same holds while an epoch's checkpoint is written. A second signal in such
a wait ends the process at once (one line, exit 130 or 143).

:class:`Interrupted` is how a training run that stopped for a signal says so (which
checkpoint --resume would continue from); :func:`ignored` holds both signals off while a
cut-short checkpoint is saved again.

Light on purpose: train.py sets it up before importing JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_seen = None  # the signal that came (SIGINT or SIGTERM), None before one


def _handler(signum, frame):
    global _seen
    _seen = signum
    raise KeyboardInterrupt


def _unraisable(unraisable) -> None:
    # A swallowed Ctrl-C is remembered, and check() raises it again: no "Exception ignored" trace.
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _seen is not None:
        return
    sys.__unraisablehook__(unraisable)


def _excepthook(exc_type, exc, tb) -> None:
    # Extensions that print an error while importing (numpy's, jaxlib's) go through here.
    if issubclass(exc_type, KeyboardInterrupt) and _seen is not None:
        return
    sys.__excepthook__(exc_type, exc, tb)


def _record(signum, frame):
    global _seen
    if _seen is not None:
        # A second signal while the first waits (for an import, or a checkpoint being written,
        # which on a stuck disk or a host that never answers can wait forever): stop now.
        first = "terminated" if _seen == signal.SIGTERM else "interrupted"
        os.write(2, f"train.py: {first} again: stopped at once; a checkpoint being written may be left "
                    "incomplete (the earlier ones are kept)\n".encode())
        os._exit(128 + signum)
    _seen = signum


def _set(handler) -> None:
    for signum in SIGNALS:
        signal.signal(signum, handler)


def defer() -> None:
    """Until :func:`install`: a Ctrl-C is only remembered (check it with :func:`seen`).

    For JAX's import: a KeyboardInterrupt raised inside a native extension's
    initialisation (jaxlib's, through nanobind) aborts the process (exit 134).
    """
    global _seen
    _seen = None
    if threading.current_thread() is threading.main_thread():
        _set(_record)


def release_held() -> None:
    """Unblock SIGINT and SIGTERM, which train.py blocks from its first line (``pthread_sigmask``)
    until :func:`defer` has set its handler; a signal that came meanwhile counts as the first.

    Both may be pending at once (a Ctrl-C, then a scheduler's SIGTERM): delivered together,
    the second would read as a second signal in a wait ("again: stopped at once").
    """
    def first(signum, frame):
        global _seen
        if _seen is None:
            _seen = signum

    previous = {s: signal.signal(s, first) for s in SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # CPython runs the handlers of pending signals before it returns
    for s, handler in previous.items():
        signal.signal(s, handler)


def install() -> None:
    """Handle SIGINT and SIGTERM as above (main thread only: elsewhere signals can be neither set nor received)."""
    global _seen
    _seen = None
    if threading.current_thread() is threading.main_thread():
        _set(_handler)
        sys.unraisablehook = _unraisable
        sys.excepthook = _excepthook


def _late(signum, frame):
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    how = "terminated" if signum == signal.SIGTERM else "interrupted"
    os.write(2, f"train.py: {how} while exiting\n".encode())
    os._exit(128 + signum)


def exiting() -> None:
    """After the run (its files written, its last line printed): a signal ends the process at once, with
    one line and 130 or 143. A KeyboardInterrupt raised in Python's own shutdown was swallowed
    (see _excepthook): exit 130 with no word."""
    if threading.current_thread() is threading.main_thread():
        _set(_late)


def seen() -> bool:
    return _seen is not None


def terminated() -> bool:
    """Whether the signal was SIGTERM rather than Ctrl-C."""
    return _seen == signal.SIGTERM


def word() -> str:
    """How the run ended, for its last line: "terminated" (SIGTERM) or "interrupted" (Ctrl-C)."""
    return "terminated" if terminated() else "interrupted"


def exit_code() -> int:
    """The shell's code for the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if terminated() else signal.SIGINT)


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came since install(), even one that something swallowed."""
    if _seen is not None:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """Inside: a Ctrl-C is remembered, not raised; on leaving, it is raised (KeyboardInterrupt).

    Around the heavy imports (JAX, Flax, Orbax): :func:`defer`'s reason. Outside the
    main thread, or before :func:`install`, it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not _handler:
        yield
        return
    _set(_record)
    try:
        yield
    finally:
        _set(_handler)
    check()


@contextlib.contextmanager
def ignored():
    """Ctrl-C and SIGTERM ignored inside (main thread only; elsewhere signals cannot be set, nor arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during training; says which checkpoint a --resume would continue from."""

    def __init__(self, epoch: int | None, output: str | None):
        how = word()
        if epoch is not None:
            msg = f"{how}; the checkpoint of epoch {epoch} is in {output}: continue with --resume"
        elif output:
            msg = f"{how} before the first epoch ended; no checkpoint was written"
        else:
            msg = f"{how} (no --output, nothing saved)"
        super().__init__(msg)
