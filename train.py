#!/usr/bin/env python
"""Train the chapter's ResNet-18 on Fashion-MNIST: ``python train.py --help``.

The training itself starts in resnet_jax/cli.py (``main``); this file only prepares the process
for it: console streams, host memory pages, and Ctrl-C during JAX's import.
"""

import os
import sys


def open_standard_streams() -> None:
    """Point a closed stdin, stdout or stderr (``train.py 2>&-``) at /dev/null; stdout never fails to encode.

    Started with one of them closed, Python has ``sys.stderr is None`` (the progress bar
    crashed on it), and the next file opened takes the closed descriptor's number, so that
    writes meant for the console would land in that file. With /dev/null there, what would
    have been printed is dropped and the run goes on. (Ctrl-C and SIGTERM are blocked by
    then, so nothing imported here is cut short.)
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))
    # A character stdout's encoding lacks is written as an escape (\u30e9), as stderr writes it,
    # not a UnicodeEncodeError: Python on Windows writes a redirected stdout in the ANSI code
    # page (cp1252), and a folder named in Japanese ended a finished run in a traceback.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


if __name__ == "__main__":
    import signal

    # Ctrl-C and SIGTERM blocked, that is held pending, not lost, until the handlers below are
    # in place. The block and a pending signal outlive the restart for huge pages (execve keeps
    # both), which runs the interpreter's start-up a second time: a Ctrl-C there was a traceback
    # or a silent death (exit -2). Only the first start-up, before this line, is Python's own.
    held = hasattr(signal, "pthread_sigmask")  # (not on Windows)
    if held:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    open_standard_streams()  # before anything prints or opens a file

    # Host memory in 2 MiB pages (Linux/glibc; RESNET_JAX_HUGE_PAGES=0 opts out):
    # restarts this command once, before JAX is imported. resnet_jax/hugepages.py says why.
    from resnet_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

    from resnet_jax import interrupts

    # Ctrl-C (or SIGTERM) during JAX's import is remembered, not raised (inside jaxlib's
    # initialisation a KeyboardInterrupt aborts the process), and acted on right after it;
    # so is one held since the start (delivered as the block is lifted).
    interrupts.defer()
    if held:
        interrupts.release_held()
    try:
        from resnet_jax.cli import main
    except ValueError as err:
        # A JAX_* variable JAX cannot read ("Invalid value "" for JAX flag ...", "invalid truth
        # value 'maybe' for environment 'JAX_ENABLE_X64'"): JAX refuses it as it is imported.
        if "for JAX flag" not in str(err) and "for environment 'JAX_" not in str(err):
            raise
        print(f"train.py: error: {str(err).splitlines()[0]} (from the environment)", file=sys.stderr, flush=True)
        sys.exit(2)
    from resnet_jax.console import EXIT_INTERRUPTED, EXIT_TERMINATED

    if interrupts.seen():
        print(f"train.py: {interrupts.word()}", file=sys.stderr, flush=True)
        os._exit(interrupts.exit_code())
    interrupts.install()  # from here a Ctrl-C is a KeyboardInterrupt, never lost (resnet_jax/interrupts.py)

    code = main()
    interrupts.exiting()  # a signal from here on: one line, 130 or 143, at once
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        # Ctrl-C or SIGTERM was handled: the message is out, the checkpoint saved and its files
        # closed. A second signal is ignored from here; JAX's exit handlers would race its own
        # threads (a compile cut short): tracebacks, and now and then a crash (exit 139).
        # Leave without them.
        for s in interrupts.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
