"""The files of a training run: its paths, checked before any work, and the --output run directory.

What a run directory holds (README, "Checkpoints, resume, evaluate, predict"): checkpoints/ and best/ (Orbax,
resnet_jax/checkpoint.py), metrics.jsonl, results.json, curves.png, and a lock file while a
run writes there. The rules here keep one run's files from another's: a new run never
overwrites a run it did not write, --resume only continues a run that fits its flags, and a
run that fails before writing anything leaves no empty folders behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from resnet_jax import files, processes
from resnet_jax.config import Config
from resnet_jax.console import counted
from resnet_jax.errors import RunWideError, UserError, check_output_file, check_writable_dir, resolved
from resnet_jax.files import METRICS, RESULTS  # the names of a run folder's files


def read_results(output) -> dict:
    """``output``/results.json; OSError or ValueError if it is missing, unreadable or not a JSON object."""
    results = json.loads((Path(output) / RESULTS).read_text())
    if not isinstance(results, dict):
        raise ValueError(f"{RESULTS} is not a JSON object")
    return results


def check_paths(config: Config) -> None:
    """Everything about files that can be checked before any work.

    The --output folder is created (to test it) last, so that no other refusal leaves it behind.
    """
    if config.data_dir and Path(config.data_dir).exists() and not Path(config.data_dir).is_dir():
        raise UserError(f"--data-dir {config.data_dir} is not a directory")
    if config.data_dir:  # TFDS would prepare the data in a folder named as a checkpoint: the run's latest, "incomplete"
        check_not_among_checkpoints(Path(config.data_dir), "--data-dir", "folder")
    if config.manual_dir and not Path(config.manual_dir).is_dir():
        raise UserError(f"--manual-dir {config.manual_dir} is not a directory")
    check_torch_paths(config)
    if config.output:
        try:  # Orbax hands paths to C++ as UTF-8: it failed at the first save, after an epoch's work
            config.output.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"--output {config.output!r}: the path is not valid UTF-8, which Orbax's "
                            "checkpoints need; choose another folder name") from None
        check_not_among_checkpoints(Path(config.output), "--output", "folder")
        for sub in ("checkpoints", "best"):  # Orbax would only fail at the first save
            if (path := Path(config.output) / sub).exists() and not path.is_dir():
                raise UserError(f"--output {config.output}: {sub} is not a folder (a run directory keeps its checkpoints there)")
        for name, what in ((METRICS, "records"), (RESULTS, "results"), ("curves.png", "curves")):
            if (Path(config.output) / name).is_dir():  # found only after the training, when written
                raise UserError(f"--output {config.output}: {name} is a folder, and the run writes its {what} "
                                "there; move it elsewhere, or choose another --output")
        try:
            check_writable_dir(Path(config.output), "--output")
        except UserError as err:
            # A finished run in a read-only folder (an archive, a read-only mount): --resume only
            # reports it, but takes the folder's lock first, a file written there, and the bare
            # "not a writable directory" left it at that. What reads it without writing is named.
            # (With --export-torch it exports as well: "only report" was not so.)
            if config.resume and (done := _finished_epoch(Path(config.output))) == config.epochs:
                raise UserError(f"{err}; it holds a finished run (all {counted(done, 'epoch')} trained), which "
                                f"--resume would only report{' and export' if config.export_torch else ''}, "
                                f"after locking the folder: its results are in "
                                f"{Path(config.output) / RESULTS}, and `train.py evaluate {config.output}` reads "
                                "its checkpoint without writing") from err
            raise


def _finished_epoch(out: Path) -> int | None:
    """The epoch of ``out``'s latest checkpoint when its results.json reports that epoch too (a finished run); else None."""
    with contextlib.suppress(OSError, ValueError):  # (ValueError: a folder named by a digit int() does not read, "²")
        latest = max((int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit() and p.is_dir()), default=None)
        if latest is not None and results_epoch(out) == latest:
            return latest
    return None


def check_torch_paths(config: Config) -> None:
    """--init-from-torch must be a file, --export-torch's folder writable, and torch importable."""
    # On --resume the checkpoint holds the weights: the file is not read again.
    loads = config.init_from_torch and not config.resume
    if loads and not Path(config.init_from_torch).is_file():
        what = " is a directory, not a file" if Path(config.init_from_torch).is_dir() else ": no such file"
        raise UserError(f"--init-from-torch {config.init_from_torch}{what}")
    if config.export_torch:
        target = Path(config.export_torch)
        check_not_among_checkpoints(target, "--export-torch", "file")  # before its folder is made
        if config.output:  # this run's own, which has no metrics.jsonl yet for _enclosing_run to know it by
            own = [resolved(Path(config.output), "--output") / sub for sub in ("checkpoints", "best")]
            if any(resolved(target, "--export-torch").is_relative_to(d) for d in own):
                raise UserError(f"--export-torch {config.export_torch} is among this run's checkpoints, which Orbax "
                                "manages and --keep rotates away; choose a file outside them")
        check_output_file(target, "--export-torch", (".pt", ".pth"))
        # A folder the run makes, at the export's name or under it (--output run.pt --export-torch
        # run.pt; one there already is refused above as a directory): the export met it only after
        # the whole training, and called it another program's file.
        for flag, folder in (("--output", config.output), ("--data-dir", config.data_dir)):
            if folder and (made := resolved(Path(folder), flag)).is_relative_to(export := resolved(target, "--export-torch")):
                where = f"the run's {flag} folder" if made == export else f"a folder above the run's {flag} {folder}"
                raise UserError(f"--export-torch {config.export_torch} is {where}: give the export another name")
        if config.init_from_torch and target.resolve() == Path(config.init_from_torch).resolve():  # on --resume too
            raise UserError(f"--export-torch {config.export_torch} is the --init-from-torch file: "
                            "it would overwrite the weights the run started from; give another name")
        if target.exists() and not _own_export(config, target):  # another run's model, say: kept
            raise UserError(f"--export-torch {config.export_torch} already exists, and this run did not write it: "
                            "give another name, or remove it first")
        _export_found[str(target)] = _identity(target)  # what check_export_unchanged compares, at the export
    if loads or config.export_torch:
        from resnet_jax.convert import ConversionError, import_torch

        try:
            import_torch()
        except ConversionError as err:
            flag = "--init-from-torch" if loads else "--export-torch"
            raise UserError(f"{flag}: {err}") from err


# --export-torch's file as check_torch_paths found it (None: no file), by path: the export, an epoch
# or hours later, must still find it so. Another program may have written it meanwhile: a second
# run started with the same --export-torch, which finished first (both runs found no file, and the
# later export silently replaced the earlier run's model, which both results.json then listed).
# The export itself then names its file only if none is there (export_may_replace), so a file
# written between that last look and the rename is kept too.
_export_found: dict[str, tuple | None] = {}


def _identity(path: Path) -> tuple | None:
    """What tells one file at ``path`` from another written there since: None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        try:  # a symbolic link to no file: a name taken all the same (the export's hard link is refused there)
            st = os.lstat(path)
        except OSError:
            return None
        return "link", st.st_dev, st.st_ino, st.st_mtime_ns
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_export_unchanged(config: Config) -> None:
    """A UserError if --export-torch's file appeared (or changed) since check_torch_paths looked at it:
    someone else's, which the export must not replace. (No check where check_torch_paths did not run.)"""
    key = str(Path(config.export_torch))
    if key not in _export_found or (now := _identity(Path(key))) is None or now == _export_found[key]:
        return  # (a file deleted meanwhile loses nothing)
    raise export_taken(config)


def export_may_replace(config: Config) -> bool:
    """Whether the export may replace a file at --export-torch: not where check_torch_paths found
    none (one there now is another program's, written since: the export names its file only if
    none is there, in one step; files.atomic_write)."""
    return _export_found.get(str(Path(config.export_torch)), ()) is not None


def export_taken(config: Config) -> UserError:
    """The refusal of an export whose file another program wrote during the run."""
    return UserError(f"--export-torch {config.export_torch}: not written: another program wrote that file since this "
                     f"run started (another run with the same --export-torch?), and it is left as it is; {export_kept(config)}")


def export_kept(config: Config) -> str:
    """What a failed export leaves, and how to write it after all (the run's training is not lost)."""
    return (f"the run's checkpoints are kept: export them with --resume --output {config.output} --export-torch "
            "ANOTHER.pt" if config.output else "nothing was written")


def earlier_exports(config: Config) -> list[str]:
    """The PyTorch exports that the run --resume continues wrote, as its results.json lists them
    ("exports", and its config's export_torch); [] for a new run or an unreadable results.json.
    The resumed run's results.json keeps them: each stays the run's own to write again."""
    if not (config.resume and config.output):
        return []
    try:
        results = read_results(config.output)
        earlier = [results["config"].get("export_torch"), *results.get("exports", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return list(dict.fromkeys(e for e in earlier if isinstance(e, str) and e))


def _own_export(config: Config, target: Path) -> bool:
    """Whether ``target`` is the export of the run that --resume continues (its results.json says so):
    the one file an export may replace."""
    return any(Path(e).resolve() == target.resolve() for e in earlier_exports(config))


def record_export(config: Config) -> None:
    """Add the export to the run's results.json ("exports"): the file is then this run's to write again
    (an export of a finished run, --resume --export-torch, changes nothing else there)."""
    try:
        results = read_results(config.output)
        if config.export_torch not in results.setdefault("exports", []):
            results["exports"].append(config.export_torch)
            files.write_json(Path(config.output) / RESULTS, results)
    except (OSError, ValueError, AttributeError, TypeError):  # the export is written; only writing it again needs the record
        pass


def check_not_among_checkpoints(path: Path, flag: str, what: str) -> None:
    """A UserError if ``path`` lies among a run's checkpoints (see :func:`_enclosing_run`)."""
    if run := _enclosing_run(path, flag):
        raise UserError(f"{flag} {path} is among the checkpoints of the run in {run}, which Orbax "
                        f"manages and --keep rotates away; choose a {what} outside them")


def _enclosing_run(path: Path, flag: str = "--output") -> Path | None:
    """The train.py run whose checkpoints ``path`` would be written among, if any.

    Orbax keeps a run's checkpoints in numbered folders of RUN/checkpoints and RUN/best and
    rotates them (--keep): a run written in one (``--output RUN/checkpoints/2``, a slip of
    tab completion) would be deleted with it, and its own folders would break the outer
    run's (evaluate and --resume found an "incomplete" checkpoint). Symbolic links are
    followed; another folder that happens to be named checkpoints is left alone.
    """
    parts = resolved(path, flag).parts
    for i in range(1, len(parts)):
        if parts[i] in ("checkpoints", "best"):
            run = Path(*parts[:i])
            metrics = run / METRICS
            ours = (run / "checkpoints").is_dir() and metrics.is_file() and not foreign_metrics(metrics)
            if ours and (i + 1 == len(parts) or parts[i + 1].isdigit()):
                return run
    return None


OUTPUT_LOCK = files.RUN_LOCK  # in --output while a run writes there (files.held)


class OutputBusy(RunWideError):
    """Another run holds --output: the refused run must leave everything there as it is."""


def hold_output(config: Config, stack: contextlib.ExitStack, main_process: bool) -> None:
    """The --output folder for this run alone, until ``stack`` closes; OutputBusy if another run holds it.

    Two runs started in one folder used to interleave their checkpoints and metrics.jsonl
    records, and both could report success. Process 0 takes the lock for a run of several
    processes, and all of them hear its answer (the others waited, then crashed in C++).
    """
    problem = None
    if main_process:
        try:
            stack.enter_context(files.held(Path(config.output) / OUTPUT_LOCK))
        except files.Busy as err:
            problem = OutputBusy(f"--output {config.output} is in use by another program ({err.holder}; a train.py "
                                 "run, or a script writing checkpoints there); wait for it to end, or choose another --output")
        except OSError as err:
            problem = RunWideError(f"--output {config.output}: cannot use its lock file {OUTPUT_LOCK}: "
                                   f"{err.strerror or err}")
    if processes.any_process(problem is not None):
        raise problem or OutputBusy(f"--output {config.output} is in use by another run, or cannot be locked: "
                                    "process 0 says which")


# What a run leaves in --output besides checkpoints/: a new run must not overwrite another's.
# (metrics.jsonl is not among them: a run stopped before its first checkpoint leaves one,
# and the same command run again must simply start over. A metrics.jsonl that is not
# ours, though, is someone's file: foreign_metrics.)
RUN_FILES = (RESULTS, "curves.png", "best")


OUR_RECORD_KEYS = {"epoch", "step", "train_loss", "train_acc"}  # in every record of metrics.jsonl (training.py)


def foreign_metrics(path: Path) -> bool:
    """Whether ``path`` is a non-empty file that no run of ours wrote.

    Each of our lines is a JSON record of kind "epoch" or "steps" with its epoch, step and train metrics.
    """
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if not isinstance(rec, dict) or rec.get("kind") not in ("epoch", "steps") or not OUR_RECORD_KEYS <= rec.keys():
                    return True
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    return False


def link_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a file a run writes through, if it is a symbolic link; else None.

    A run writes metrics.jsonl from its first byte, resumed runs too. Through a link that came with a
    run folder from elsewhere it would overwrite the file the link names (a ~/.bashrc, say), or
    create it. Links to streams stay usable: to a FIFO a live plotter reads, or to a terminal.
    """
    if not path.is_symlink():
        return None
    try:
        mode = os.stat(path).st_mode  # where the link leads, through any further links
    except OSError:  # nothing there (a write would create it), or a loop
        return f"is a symbolic link to {os.readlink(path)}, which does not exist, and a run would create it"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
        return None
    return f"is a symbolic link to {os.path.realpath(path)}, which a run would overwrite"


def holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint or a run's results (what --resume continues, or refuses)."""
    with contextlib.suppress(OSError):
        if any(p.name.isdigit() for p in (out / "checkpoints").iterdir()):
            return True
    return bool(_run_files(out))


def _run_files(out: Path) -> list[str]:
    """The RUN_FILES a run left in ``out`` (an empty folder, as Checkpoints() makes, does not count)."""
    return [name for name in RUN_FILES if (p := out / name).is_file() or (p.is_dir() and any(p.iterdir()))]


def open_checkpoints(config: Config, meta: dict):
    """The run directory's checkpoints, after checking that --resume (or its absence) fits what is there."""
    if not config.output:
        return None
    from resnet_jax import checkpoint as ckpt_mod

    out = Path(config.output)
    # Before Checkpoints() creates its (empty) folders: what another run left here.
    found = _run_files(out)
    if not config.resume and foreign_metrics(out / METRICS):
        raise UserError(f"--output {config.output} holds a metrics.jsonl that train.py did not write, and a run "
                        "would overwrite it; choose another --output (or move that file)")
    if problem := link_problem(out / METRICS):
        raise UserError(f"--output {config.output}: its metrics.jsonl {problem}; remove the link (a run writes "
                        "metrics.jsonl itself; a link to a FIFO or a terminal is followed)")
    created = [d for d in (out, out / "checkpoints", out / "best") if not d.exists()]
    try:
        ckpts = ckpt_mod.Checkpoints(config.output, keep=config.keep, track_best=config.val_split is not None)
    except ckpt_mod.CheckpointError as err:
        raise UserError(str(err)) from err
    try:
        _check_resume(config, meta, ckpts, found)
    except BaseException:
        ckpts.close()  # its threads must not outlive a refusal (they print tracebacks at exit)
        for d in reversed(created):  # nor its empty folders: a refused command leaves the folder as it was
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return ckpts


def _resumable_flags() -> str:
    """The flags --resume may change, from checkpoint.RESUMABLE_FIELDS: "--data-dir, ... and --output"."""
    from resnet_jax.checkpoint import RESUMABLE_FIELDS

    flags = [f"--{name.replace('_', '-')}" for name in sorted(RESUMABLE_FIELDS - {"resume"})]
    return ", ".join(flags[:-1]) + " and " + flags[-1]


def _check_resume(config: Config, meta: dict, ckpts, found: list[str]) -> None:
    """Whether --resume (or its absence) fits the checkpoints and files in --output; UserError if not."""
    from resnet_jax import checkpoint as ckpt_mod

    try:
        latest = ckpts.latest_epoch()
        if config.resume:
            if latest is None:
                raise UserError(f"--resume: no checkpoint in {config.output} to continue from")
            saved = ckpts.read_meta()
            if saved["epoch"] > config.epochs:
                raise UserError(f"--resume: the checkpoint in {config.output} has trained {saved['epoch']} epochs, "
                                f"more than --epochs {config.epochs}")
            diffs = ckpt_mod.differences(saved["metadata"], meta)
            if diffs:
                raise UserError(
                    f"--resume: the checkpoint in {config.output} was trained with another configuration: "
                    + "; ".join(diffs) + f" (only {_resumable_flags()} may change)"
                )
            planned = saved["metadata"]["config"].get("epochs")
            r = config.recipe
            if planned != config.epochs and r.scheduled:
                raise UserError(
                    f"--resume: the run was planned for {counted(planned, 'epoch')} and its learning-rate schedule "
                    f"({r.schedule}, warmup {counted(r.warmup_epochs, 'epoch')}) spans them; --epochs {config.epochs} "
                    "would change the rates of steps already taken. Resume with the same --epochs, or train a new run"
                )
        elif latest is not None:
            raise UserError(
                f"--output {config.output} already holds a run (checkpoint of epoch {latest}); "
                "pass --resume to continue it, or choose another --output"
            )
        elif found:  # no checkpoint, but another run's results (its checkpoints deleted)
            raise UserError(
                f"--output {config.output} already holds another run's {', '.join(found)}; "
                "choose another --output (or remove them)"
            )
    except ckpt_mod.CheckpointError as err:
        raise UserError(str(err)) from err


def first_missing(path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (``path`` itself, or an ancestor); None if it exists."""
    if not path:
        return None
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_empty_folders(top: Path | None) -> None:
    """``top`` and the folders below it, if they hold no file: what a run that failed before
    writing anything made (its --output, an empty checkpoints/). A file anywhere keeps it."""
    if top is None or not top.is_dir():
        return
    for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):  # children first: an emptied parent can go too
        with contextlib.suppress(OSError):  # not empty: it stays
            os.rmdir(folder)


def write_run_files(config: Config, report: dict, log: list, say) -> None:
    """curves.png, then results.json, in --output.

    results.json last: it marks the run's files complete. A --resume of a finished run whose
    results.json reports its last epoch has nothing to do, so a curves.png that a full disk
    stopped must not come after it (it was then never written)."""
    from resnet_jax import plots

    # The chapter's plot; step records (--log-every) go in at their fraction of an epoch.
    try:
        plots.plot_curves(plots.epoch_axis(log, config.steps_per_epoch), Path(config.output) / "curves.png")
    except OSError as err:
        raise UserError(f"could not write {config.output}/curves.png: {err.strerror or err}") from err
    try:
        files.write_json(Path(config.output) / RESULTS, report)
    except OSError as err:
        raise UserError(f"could not write {config.output}/{RESULTS}: {err.strerror or err}") from err
    say(f"checkpoints in {config.output}/checkpoints"
        + (f" and {config.output}/best" if config.val_split else "")
        + "; metrics in metrics.jsonl, results.json, curves.png")


def results_epoch(output) -> int | None:
    """The last epoch that ``output``/results.json reports; None if it is missing or unreadable."""
    try:
        history = read_results(output)["history"]
        return int(history[-1]["epoch"]) if history else 0
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
