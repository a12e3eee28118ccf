"""Files written whole or not at all.

Every file the package writes for a user (results.json, curves and confusion
PNGs, the array cache, exported PyTorch weights, bench.json) goes through
:func:`atomic_write`: a reader never sees half a file, and a failure (a full
disk, Ctrl-C) leaves the previous file in place and no temporary file behind.

:func:`held` keeps a second program out of a folder that one is writing (a run's --output,
whose lock is :data:`RUN_LOCK`), or has it wait its turn (a data dir being prepared).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)  # the portable way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", replace: bool = True):
    """Yield a file object to write ``path``'s new content to; ``path`` changes only once it is complete.

    The content goes to a temporary file in the same folder (so the final
    ``os.replace`` is a rename on one file system), which replaces ``path``
    when the ``with`` block ends without an exception and is deleted otherwise.
    An existing ``path`` that is not a regular file (``/dev/null``, a FIFO) is
    refused with an OSError rather than renamed over.
    ``replace=False``: a file that is at ``path`` when the content is complete (another
    program's, written meanwhile) is kept: FileExistsError, and the new content is dropped.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a rename would replace a device, a FIFO, a folder...
        raise OSError(errno.EEXIST, "exists and is not a regular file, so it is not replaced", str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        f = os.fdopen(fd, mode)  # owns fd from here: closing f closes it
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        with f:
            # mkstemp makes the file private (0600); give it the mode open() would (0666 less the umask).
            os.chmod(tmp, 0o666 & ~_UMASK)
            yield f
        if replace:
            os.replace(tmp, path)
        else:
            _name_unless_taken(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _name_unless_taken(tmp: str, path: Path) -> None:
    """Give the complete file ``tmp`` the name ``path`` unless a file has that name by now.

    A hard link is made or refused (EEXIST) in one step, where a look before os.replace left a
    window in which another program's file was silently replaced. Where no link can be made, for
    whatever reason, that look and os.replace are what is left (a window of microseconds, and what
    every export did before this one-step naming): file systems without hard links answer with many
    errnos (EPERM on Linux's FAT and exFAT, ENOSYS from some FUSE file systems, EROFS from fusepy's
    default, EINVAL on Windows, whose FAT drives fail with ERROR_INVALID_FUNCTION), and a real
    problem (the folder gone, a full disk) is os.replace's error then."""
    taken = FileExistsError(errno.EEXIST, "another program wrote a file there meanwhile, which is kept", str(path))
    try:
        os.link(tmp, path)
    except FileExistsError:
        # NFS: link() is not idempotent; a retransmitted request whose first reply was lost answers
        # EEXIST though the link was made (link(2)). The file there is then this one.
        try:
            made = os.path.samefile(tmp, path)
        except OSError:
            made = False
        if not made:
            raise taken from None
    except OSError:
        if os.path.lexists(path):
            raise taken from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):  # the content has its name; a temporary name left behind is only clutter
        os.unlink(tmp)


def json_safe(obj):
    """``obj`` with every NaN or infinite float as None (null): JSON has no such numbers, and
    ``json.dumps`` would write ``NaN``, which JSON readers refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON with a final newline, atomically (:func:`json_safe`)."""
    with atomic_write(path, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        f.write("\n")


class Busy(OSError):
    """Another program holds the lock; ``holder`` is what it wrote in the lock file (its pid and host)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(errno.EWOULDBLOCK, f"in use by {holder or 'another program'}", str(path))
        self.holder = holder


RUN_LOCK = ".train.lock"  # in a run folder while a program writes its checkpoints (train.py, Checkpoints)
# A run folder's other files of its own (resnet_jax/rundir.py): with RUN_LOCK, what tells a run folder
# apart from any other folder (Checkpoints will not rotate checkpoints inside another run's).
METRICS = "metrics.jsonl"  # every epoch's (and --log-every's) record, one JSON object a line
RESULTS = "results.json"  # the run's final report (rundir.write_run_files), and the --json line
RUN_FILES = (METRICS, RESULTS, RUN_LOCK)

# The locks this process holds, by real path: [holds, unlock]. The last hold released,
# whichever it is, calls unlock().
_held_here: dict[str, list] = {}
_held_here_guard = threading.Lock()


def _release(key: str) -> None:
    with _held_here_guard:
        entry = _held_here[key]
        entry[0] -= 1
        if entry[0]:
            return
        del _held_here[key]
    entry[1]()


def _unlock_flock(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()  # while still holding it: see the inode check in held()
    os.close(fd)


def _lock_filelock(path: Path, on_wait: Callable[[str], None] | None) -> Callable[[], None]:
    """held()'s lock where fcntl is missing (Windows): filelock's, msvcrt's there; its release.

    Windows locks the file's bytes against other readers, so the holder is not named.
    """
    import filelock

    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is None:
            raise Busy(path, "") from None
        on_wait("")
        lock.acquire()  # polls; Ctrl-C ends the wait
    return lock.release


@contextlib.contextmanager
def held(path: str | Path, on_wait: Callable[[str], None] | None = None, *, reentrant: bool = False):
    """An exclusive lock on the file ``path`` for the ``with`` block, or :class:`Busy` at once.

    With ``on_wait``, a held lock is waited for instead: ``on_wait(holder)`` is called once
    first (holder: what the holder wrote, its pid and host), and Ctrl-C ends the wait.
    The lock is the kernel's (``flock``), so it ends with the process however that ends (a
    kill, a crash): a lock file left behind never blocks anyone. The file is deleted on the
    way out, and a lock taken on a file that another holder has just deleted is dropped and
    taken again, so two programs never both hold one. Where ``fcntl`` is missing (Windows)
    the lock is filelock's, which does not name its holder.

    ``reentrant``: if this process holds the lock already (train.py holds its run folder's
    when it opens the folder's Checkpoints), the ``with`` block simply runs under that hold.
    Off by default: a data dir's lock also keeps out the other threads of this process.
    """
    path = Path(path)
    key = os.path.realpath(path)
    with _held_here_guard:
        nested = reentrant and key in _held_here
        if nested:
            _held_here[key][0] += 1
    if not nested:
        try:
            import fcntl
        except ImportError:  # Windows
            unlock = _lock_filelock(path, on_wait)
        else:
            unlock = _lock_flock(fcntl, path, on_wait)
        with _held_here_guard:
            _held_here[key] = [1, unlock]  # (no other hold here: either lock refuses a second one of this process too)
    try:
        yield
    finally:
        _release(key)


class NotALockFile(OSError):
    """The lock's path holds something held() must not write to: a symbolic link, a hard link, a FIFO..."""


def _open_lock_file(path: Path) -> int:
    """The lock file open for reading and writing (created if missing); NotALockFile where ``path`` is not
    a plain file of its own.

    The holder writes its name into the file and deletes it on release: through a symbolic or hard
    link planted in a run folder or data dir (one downloaded, or in a shared /tmp), that would have
    emptied the linked file (a ~/.bashrc, say), or made one where the link points.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():  # (ELOOP: O_NOFOLLOW met a link)
            raise NotALockFile(errno.ELOOP, "is a symbolic link, not a lock file: remove it (nothing it points to "
                               "is written)", str(path)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise NotALockFile(errno.EEXIST, f"is {what}, not a lock file: remove it (it is not written)", str(path))
    return fd


def _lock_flock(fcntl, path: Path, on_wait: Callable[[str], None] | None) -> Callable[[], None]:
    """held()'s lock: flock on the file, which then names its holder; its release."""
    while True:
        fd = _open_lock_file(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                if on_wait is None:
                    raise Busy(path, holder) from None
                on_wait(holder)
                on_wait = lambda holder: None  # said once, however many holders come and go
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder deleted the file as we took it: take the new one
    unlock = functools.partial(_unlock_flock, fd, path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except BaseException:
        unlock()
        raise
    return unlock

