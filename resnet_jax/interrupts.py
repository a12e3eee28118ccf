"""Ctrl-C that is never lost: train.py's SIGINT handler, and the checks that act on it late.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to
be. Inside a garbage-collector callback (JAX registers one) the exception is
printed as "Exception ignored in ..." and dropped, so a Ctrl-C in the first
second of a run was lost and the run trained on to the end. The handler here
raises the same KeyboardInterrupt, but also remembers the signal; :func:`check`,
called at the training loop's regular points (cli's hooks), raises it again if
it was swallowed, and the swallowed one is not printed.

Light on purpose: train.py installs it before importing JAX.
"""

from __future__ import annotations

import signal
import sys
import threading

_seen = False


def _handler(signum, frame):
    global _seen
    _seen = True
    raise KeyboardInterrupt


def _unraisable(unraisable) -> None:
    # A swallowed Ctrl-C is remembered, and check() raises it again: no "Exception ignored" trace.
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _seen:
        return
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """Handle SIGINT as above (main thread only: elsewhere signals can be neither set nor received)."""
    global _seen
    _seen = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        sys.unraisablehook = _unraisable


def seen() -> bool:
    return _seen


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came since install(), even one that something swallowed."""
    if _seen:
        raise KeyboardInterrupt
