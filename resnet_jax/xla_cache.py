"""XLA's persistent compilation cache, as train.py uses it: where it lives, and its repair.

``python train.py`` keeps every compiled program on disk (``--compile-cache``) and loads
it in later runs of the same shapes instead of compiling it again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from resnet_jax.errors import UserError, check_writable_dir

MAX_BYTES = 2 * 2**30  # --compile-cache's size limit, unless $JAX_COMPILATION_CACHE_MAX_SIZE says


def setting(flag: str | None, environ=os.environ) -> tuple[Path | None, str]:
    """(the folder of XLA's persistent compilation cache or None for off, where the user named it:
    "--compile-cache", "$JAX_COMPILATION_CACHE_DIR", or "" for the default folder).

    Compiling is most of a short GPU run: on one H200, 35 of the 62 s that ``--recipe best`` took
    (BENCHMARKS.md). JAX can keep each compiled program on disk, keyed by the program, the
    compiler options and the versions, and load it in a later run instead of compiling it; the
    loaded executable is the same executable, so no result changes. JAX leaves that cache off
    unless told where; train.py turns it on, in a folder of its own. JAX keeps only programs that
    took a second or more to compile (the train steps, the initialisation, and the evaluation
    where it is large enough; not the shuffle): on 2 CPU cores that took a 28x28 run's compile
    from 5.9-6.4 s cold to 2.1-2.4 s warm, the rest being tracing and lowering, which every run
    does, and the programs compiled in under a second (BENCHMARKS.md, "Start-up"). A setting of the process, not
    of the run's math: it stays out of Config and of --resume's checks.

    The folder is resolved (symbolic links, ".."): JAX 0.10 puts the path in each entry's key, as
    given, so the same folder named another way missed every entry and stored them all again.
    """
    if flag is not None:
        return (None, "--compile-cache") if flag == "off" else (_resolved(Path(flag)), "--compile-cache")
    if environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX's own variable: the user's choice
        return _resolved(Path(environ["JAX_COMPILATION_CACHE_DIR"])), "$JAX_COMPILATION_CACHE_DIR"
    try:
        base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home folder to be found: no default cache
        return None, ""
    return _resolved(base) / "resnet_jax" / "xla", ""


def _resolved(path: Path) -> Path:
    """``path`` with ~, symbolic links and ".." resolved; only made absolute where that fails (a
    loop of links: then the writability check names the folder, instead of a traceback here)."""
    path = path.expanduser()
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def use(setting: tuple[Path | None, str], say) -> Path | None:
    """Point JAX's persistent compilation cache at the setting's folder (before anything compiles).

    A folder the user named must be writable (one line, exit 1, before any work); the default
    one, if it cannot be made, only costs the cache (one line in the log says so).
    """
    import jax

    folder, named = setting
    if folder is not None and jax.config.jax_compilation_cache_max_size == 0:
        folder = None  # JAX's meaning of a size limit of 0 ($JAX_COMPILATION_CACHE_MAX_SIZE=0): no cache
    if folder is not None:
        try:
            check_writable_dir(folder, named or "--compile-cache")
        except UserError:
            if named:
                raise
            say(f"note: no compile cache (cannot write {folder}); every program is compiled afresh")
            folder = None
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and _has_filelock():
            # Every new shape, dtype or learning rate adds programs (tens of MB each on a GPU):
            # past this size JAX deletes the least recently used ones. That needs filelock (a
            # dependency of ours); without it JAX would cache nothing at all, so no limit then.
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        if jax.config.jax_compilation_cache_max_size != -1:  # (-1: no limit, and no access times needed)
            add_missing_atimes(folder)
    return folder


def add_missing_atimes(folder: Path) -> int:
    """Give each entry of the cache in ``folder`` that lacks one the access-time file JAX's size
    limit reads (its time: the entry's own); how many were added.

    JAX writes an entry's ``-atime`` file only under a size limit (``use`` sets one). A JAX program
    run without one on the same folder (a user's own, with ``$JAX_COMPILATION_CACHE_DIR`` set
    for everything, say), or one killed between an entry's two writes, leaves an entry without
    it; and under a limit JAX below 0.12 reads every entry's before each write, so from then on
    it stored nothing: train.py said "could not store ... No such file or directory: ...-atime"
    for every program of every run, and compiled them all each time. (JAX 0.12 takes a missing
    one as time 0, the oldest: there this only keeps such an entry from being evicted first.)
    """
    added = 0
    with contextlib.suppress(OSError):  # a folder gone or unreadable: nothing to add
        for entry in folder.glob("*-cache"):
            atime = entry.with_name(entry.name[: -len("-cache")] + "-atime")
            if atime.exists():
                continue
            try:
                stamp = entry.stat().st_mtime_ns.to_bytes(8, "little")  # JAX's format: ns, little-endian
                with open(atime, "xb") as f:  # never over one that JAX has just written
                    f.write(stamp)
                added += 1
            except OSError:  # the entry evicted meanwhile, a read-only folder...: JAX copes or says so
                continue
    return added


# JAX's warnings about one entry of the persistent compilation cache (jax/_src/compiler.py).
_CACHE_WARNING = r"Error (reading|writing) persistent compilation cache entry for '([^']+)': (.*)"


@contextlib.contextmanager
def repairing(folder: Path | None, say):
    """Within: an entry of the compile cache in ``folder`` that JAX cannot read or finish writing
    is deleted, and JAX's warning becomes one line.

    JAX writes an entry in place (not through a temporary file), so a full disk or a killed
    process can leave a truncated one; JAX then warns on every later run, compiles the
    program again and never replaces the entry (it keeps any entry that exists). Deleted
    before that compile ends, the entry is stored anew by it. Which entry is damaged:
    those of the program's name that JAX's own reader cannot decompress.
    """
    import re
    import warnings

    if folder is None:
        yield
        return
    pattern = re.compile(_CACHE_WARNING, re.DOTALL)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=_CACHE_WARNING, category=UserWarning)
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            m = pattern.match(str(message))
            if m is None:
                return show(message, category, filename, lineno, file, line)
            verb, name, why = m.groups()
            removed = _remove_damaged_entries(folder, name)
            # (JAX's own words for an entry without its access time: a path ending in -atime not found)
            missing_atime = re.search(r"No such file or directory: '[^']*-atime'", why) is not None
            if verb == "writing" and missing_atime and (added := add_missing_atimes(folder)):
                say(f"note: could not store {name} in the compile cache {folder}: {added} "
                    f"{'entry' if added == 1 else 'entries'} there (written "
                    "without a size limit, or cut short) lacked the access time JAX's size limit needs; added now")
            elif verb == "writing":
                say(f"note: could not store {name} in the compile cache {folder} ({why.strip()[:160]}); "
                    "the next run compiles it again")
            elif removed:
                say(f"note: the compile cache {folder} held a damaged {name}; it was deleted, "
                    "and the program is compiled and stored anew")
            else:
                say(f"note: the compile cache {folder} holds a {name} that JAX cannot read ({why.strip()[:160]}); "
                    "it was compiled anew. Delete the folder if this recurs")

        warnings.showwarning = one_line
        yield


def _remove_damaged_entries(folder: Path, name: str) -> list[str]:
    """Delete the cache entries of ``name`` (a program's name or an entry's key) that do not
    decompress with JAX's own reader; the names of those deleted."""
    import glob

    try:
        from jax._src.compilation_cache import decompress_executable  # JAX's reading of an entry
    except ImportError:  # another JAX: leave the entries to it
        return []
    exact = folder / f"{name}-cache"
    entries = [exact] if exact.is_file() else sorted(folder.glob(f"{glob.escape(name)}-*-cache"))
    removed = []
    for entry in entries:
        try:
            decompress_executable(entry.read_bytes())
        except OSError:  # unreadable as a file: not ours to judge
            continue
        except Exception:
            for path in (entry, folder / (entry.name[: -len("-cache")] + "-atime")):
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(entry.name)
    return removed


def _has_filelock() -> bool:
    import importlib.util

    return importlib.util.find_spec("filelock") is not None
