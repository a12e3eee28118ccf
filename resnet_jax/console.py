"""What train.py and its commands say, and how they exit.

One line on stderr for a user's mistake, never a traceback; the exit codes; console writes that
survive a reader going away (``| head``) or a full disk. Shared by the training CLI
(resnet_jax/cli.py), ``train.py evaluate`` and ``predict`` (resnet_jax/commands.py) and the
benchmark scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback

from resnet_jax import interrupts, processes
from resnet_jax.config import Config, ConfigError
from resnet_jax.errors import UserError


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_PIPE = 0, 1, 2, 130, 143, 141


class OutputLost(Exception):
    """A line could not be written to the console: its reader went away (``| head``), or its disk is full."""

    def __init__(self, err: OSError, stream: str):
        super().__init__(err.strerror or str(err))
        self.errno, self.stream = err.errno, stream


def out_of_memory(err: BaseException) -> str | None:
    """XLA's out-of-memory error in a few words ("1.6 GB needed at once"); None for any other error.

    XLA:GPU and TPU say RESOURCE_EXHAUSTED; XLA:CPU says INTERNAL, "Out of memory allocating N bytes".
    """
    import re

    text = str(err)
    if not isinstance(err, RuntimeError) or ("RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text):
        return None
    line = text.strip().splitlines()[0].split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    m = re.search(r"allocat(?:ing|e) (\d+) bytes", line)  # XLA:CPU's "allocating", XLA:GPU's "trying to allocate"
    return f"{int(m.group(1)) / 1e9:,.1f} GB needed at once" if m else line[:200]


def counted(n, word: str) -> str:
    """"1 epoch", "2 epochs", "0.5 epochs": a count and its noun, for the lines a user reads."""
    return (f"{n:g}" if isinstance(n, float) else str(n)) + f" {word}" + ("" if n == 1 else "s")


def emit(*values, file=None, essential: bool = True) -> None:
    """print() and flush, with a failed write as :class:`OutputLost` instead of a traceback.

    ``essential=False``: a line that says what is going on, not a result; a failed write
    of it is ignored (``predict ... 2>/dev/full`` still prints its predictions).

    On a lost stdout, fd 1 then points at /dev/null: Python flushes sys.stdout once more at
    exit, and would print "Exception ignored ... BrokenPipeError" there.
    """
    file = file or sys.stdout
    try:
        print(*values, file=file, flush=True)
    except OSError as err:
        if not essential:
            return  # the stream stays as it is: a result written to it next still fails, and says so
        if file is sys.stdout:
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
        raise OutputLost(err, "stdout" if file is sys.stdout else "stderr" if file is sys.stderr else "the output") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), not the whole usage block before it."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def check_sizes(parser: argparse.ArgumentParser, batch: int, resizes: list[int]) -> None:
    """The benchmark scripts' --batch and --resize, within train.py's limits; else one line, exit 2."""
    if batch < 1:
        parser.error(f"--batch must be a positive integer, got {batch}")
    for resize in resizes:
        try:
            Config(resize=resize)
        except ConfigError as err:
            parser.error(str(err))


@contextlib.contextmanager
def native_stdout_to_stderr(active: bool):
    """With --json, stdout carries the JSON line alone: what native code prints there goes to stderr.

    Python's own reports already go to stderr, but C++ libraries write to file descriptor 1
    directly (Gloo, JAX's CPU collectives between processes, announces each connection there).
    So fd 1 points at stderr while the run works, and is put back for the JSON line.
    """
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def report_errors(prog: str, fn, usage_errors: tuple[type[Exception], ...] = ()) -> int:
    """``fn()``'s exit code, with a user's mistake or Ctrl-C as one line on stderr instead of a trace.

    ``usage_errors``: exceptions that mean a flag value cannot work (exit 2);
    :class:`UserError` means the run could not be done (exit 1). Shared by
    training and train.py's other commands, so every command exits alike.
    """
    try:
        return fn()
    except usage_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OutputLost as err:
        if err.errno == errno.EPIPE:  # `| head` has read what it wanted: nothing to say
            return processes.leave(EXIT_PIPE, err)
        with contextlib.suppress(OSError):
            print(f"{prog}: error: cannot write to {err.stream}: {err}", file=sys.stderr)
        return processes.leave(EXIT_FAILED, err)
    except processes.ProcessesDidNotMeet as err:
        # A thread is stuck in JAX's C++, and JAX's exit handlers would wait on it, then abort.
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_FAILED)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return processes.leave(EXIT_FAILED, err)
    except RuntimeError as err:
        # $JAX_PLATFORMS names a platform this machine lacks, or misspells one: JAX says so in
        # its first line ("Unable to initialize backend 'cuda': ..."), at the first use of a device.
        if not str(err).startswith("Unable to initialize backend"):
            raise
        print(f"{prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return processes.leave(EXIT_FAILED, err)
    except AssertionError as err:
        # JAX_PLATFORMS=cuda on a machine without an NVIDIA GPU: JAX 0.10 skips the platform and
        # then fails its own assertion that some backend started, with no message.
        tb = traceback.extract_tb(err.__traceback__)
        if not (os.environ.get("JAX_PLATFORMS") and tb and tb[-1].filename.endswith("xla_bridge.py")):
            raise
        print(f"{prog}: error: JAX could start no backend of JAX_PLATFORMS={os.environ['JAX_PLATFORMS']!r} "
              "on this machine (unset it to take what there is)", file=sys.stderr)
        return processes.leave(EXIT_FAILED, err)
    except interrupts.Interrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return processes.leave(interrupts.exit_code(), err)
    except KeyboardInterrupt as err:
        print(f"{prog}: {interrupts.word()}", file=sys.stderr)
        return processes.leave(interrupts.exit_code(), err)
