"""What a user is told when something they gave cannot work.

:class:`UserError` is a mistake the user can fix: train.py prints its message as one line
and exits 1 (resnet_jax/console.py, ``report_errors``). The helpers here are shared by the
modules that raise it.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path


class UserError(Exception):
    """Something the user can fix; printed as one line, exit 1."""


class RunWideError(UserError):
    """A UserError that, in a run of several processes, every process meets at the same point
    (settings they compared, a loss they share), or that one meets once the others are done:
    the processes can leave together (resnet_jax/processes.py, ``leave``)."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of ``err``'s message, without a trailing colon, cut at ``limit`` characters:
    what a one-line message quotes of a library's exception."""
    text = (str(err).strip().splitlines() or [""])[0].rstrip(":")
    return text if len(text) <= limit else text[:limit] + "..."


def resolved(path: Path, flag: str) -> Path:
    """``path`` made absolute, its symbolic links followed; a UserError naming ``flag`` for a
    loop of links (Path.resolve's RuntimeError, a traceback)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:
        raise UserError(f"{flag} {path} cannot be followed: {err}") from err


def check_output_file(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """A file a command is about to write: a file name (not a folder, nor a device), with one of
    ``suffixes`` (so that a typo cannot overwrite results.json or any other file), in a folder
    that can be written. A UserError naming ``flag`` if not."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory, not a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path} exists and is not a regular file (a device?); give a file name")
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path} does not end in {' or '.join(suffixes)}")
    check_writable_dir(resolved(path, flag).parent, f"{flag}'s folder")


def check_writable_dir(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno == errno.ENOENT and path.is_dir():  # a folder of a virtual file system, such as /proc
            why = f"no file can be created in it ({why})"
        raise UserError(f"{flag} {path} is not a writable directory: {why}") from err
