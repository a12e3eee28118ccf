"""Checkpoints with Orbax: the last K epochs, and the best epoch by validation accuracy.

Layout of a run's ``--output DIR``::

    checkpoints/<epoch>/   the latest K epochs (CheckpointManager, preservation policy LatestN(K))
    best/<epoch>/          with --val-split only: the epoch of highest validation
                           accuracy (preservation policy BestN on "val_acc", n=1)

Each checkpoint holds two Orbax items:

- ``state``: the TrainState as Flax's state dict (params, batch_stats, opt_state,
  step; with ``--recipe best`` also aug_key, ema_params and ema_batch_stats),
  written by Orbax's StandardSave (tensorstore arrays, compressed and
  checked when read, so a truncated or garbled file is detected). Before a
  restore, :func:`arrays_problem` checks each array's name, shape and
  contents, so a damaged checkpoint, or one of another model, is one message.
- ``meta``: JSON with the epoch completed, the per-epoch history, the
  metrics.jsonl records so far, the metadata that rebuilds the model
  (the Config as a dict, dataset, class names, num_classes, input_channels,
  dtype, library versions), and a digest of every array's bytes: bytes
  changed in place that still decode would otherwise restore as wrong
  weights (no checksum of Orbax's or TensorStore's covers the values).

Nothing else is needed to resume exactly: every random stream of the loop is
derived from (seed, epoch) in :func:`resnet_jax.training.fit`, so the epoch
number restores the data order and the state restores everything else.

Orbax writes a checkpoint into a temporary directory and renames it into place
once complete (and only then deletes the oldest), so a crash, a Ctrl-C or a
full disk during a save leaves the previous checkpoints as they were.
Saves are synchronous: a failure is known before training goes on.

Checkpoints are taken at epoch boundaries only. Ctrl-C therefore leaves the
checkpoint of the last epoch completed (the CLI saves it again if the Ctrl-C
landed in its save); the steps of the interrupted epoch are redone by
``--resume``, which then ends bitwise where the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import files, processes
from resnet_jax.config import Config
from resnet_jax.data import DatasetSpec
from resnet_jax.errors import first_line

# What fixes the model's shapes and types: a checkpoint is only ever loaded into a model
# that agrees on all of these.
MODEL_KEYS = ("num_classes", "input_channels", "dtype")
# Config fields a resumed run may change: where files are and how long to train (epochs
# only where the learning rate does not depend on them: rundir._check_resume checks), and
# the evaluation's batch, so that a run that ran out of memory evaluating can go on: it
# changes no trained weight, only the last bits of the evaluated loss (sums in other groups).
# Every other field changes the training math, or its bits (conv lowering, steps per
# dispatch), and would break the promise of an exact resume.
RESUMABLE_FIELDS = frozenset(
    {"epochs", "data_dir", "manual_dir", "offline", "output", "keep", "log_every", "resume", "export_torch",
     "eval_batch_size"}
)


def _val_acc(metrics: dict) -> float:
    return metrics["val_acc"]


class CheckpointError(Exception):
    """A checkpoint that cannot be read, written or used here; the message says why."""


class ProcessLost(CheckpointError):
    """Another process of a multi-process run stopped (killed, preempted) while the processes
    read or wrote checkpoints together: the checkpoints are not at fault, and every process
    must start again. The message says what was under way and which checkpoint is whole."""


def versions() -> dict:
    import flax
    import numpy
    import optax
    import orbax.checkpoint

    import resnet_jax

    return {
        "resnet_jax": resnet_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": numpy.__version__,
    }


# What loading needs of metadata(): Checkpoints.save refuses a meta without them.
METADATA_KEYS = ("config", "num_classes", "input_channels", "dtype")


def metadata(config: Config, spec: DatasetSpec, steps_per_epoch: int | None = None) -> dict:
    """Everything needed to rebuild the model, its optimizer, and know what it was trained on.

    ``steps_per_epoch``: what the learning-rate schedule counts in; default
    ``config.steps_per_epoch``, train.py's. Give it when ``fit`` trains on a
    split of your own size, so that :func:`load_for_inference` rebuilds the
    run's schedule.
    """
    return {
        "config": config.to_dict(),
        "dataset": config.dataset,
        "class_names": list(spec.class_names),
        "num_classes": spec.num_classes,
        "input_channels": spec.channels,
        "dtype": config.dtype,
        "steps_per_epoch": steps_per_epoch if steps_per_epoch is not None else config.steps_per_epoch,
        "versions": versions(),
        "backend": jax.default_backend(),  # what the config's platform defaults meant (differences)
        "prng": prng_settings(),
    }


def prng_settings() -> dict:
    """JAX's settings that decide what a key draws: the same seed shuffles and augments otherwise
    under another (JAX_THREEFRY_PARTITIONABLE=0 gave another run from seed 0)."""
    return {"impl": str(jax.config.jax_default_prng_impl),
            "threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}


def differences(saved: dict, current: dict) -> list[str]:
    """What keeps the checkpoint with metadata ``saved`` from continuing as the run with ``current``."""
    diffs = [
        f"{key} (checkpoint {saved.get(key)!r}, now {current[key]!r})"
        for key in MODEL_KEYS
        if saved.get(key) != current[key]
    ]
    # (Absent from checkpoints saved before it was recorded, or not a record of ours: not compared.)
    saved_prng, current_prng = saved.get("prng"), current.get("prng")
    if isinstance(saved_prng, dict) and isinstance(current_prng, dict):
        for key, value in saved_prng.items():
            if key in current_prng and value != current_prng[key]:
                diffs.append(f"JAX's random numbers: {key} (checkpoint {value!r}, now {current_prng[key]!r})")
    old, new = dict(saved.get("config", {})), dict(current["config"])
    k_old, k_new = (_steps_per_dispatch(c, meta.get("backend")) for c, meta in ((old, saved), (new, current)))
    if k_old is not None and k_new is not None:
        # Compared as the numbers of steps per dispatch the two runs take (the default, None, is
        # the platform's): a CPU run started without the flag continues with
        # `--steps-per-dispatch 1`, and a GPU run's default of 32 is not silently 1 on a CPU.
        if k_old != k_new:
            diffs.append(f"steps_per_dispatch (checkpoint {_k_said(k_old, saved)}, now {_k_said(k_new, current)})")
        old.pop("steps_per_dispatch", None)
        new.pop("steps_per_dispatch", None)
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_FIELDS or key in MODEL_KEYS or old.get(key) == new.get(key):
            continue  # (a model key, dtype say, is named once, above)
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # the recipe: name the ingredients that differ
            diffs += [f"{key}.{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{key} (checkpoint {a!r}, now {b!r})")
    return diffs


def _steps_per_dispatch(config: dict, backend) -> int | None:
    """The steps per dispatch a run with ``config`` on ``backend`` takes; None where unknown (a
    checkpoint saved before its platform was recorded, or a value no run could have had)."""
    from resnet_jax.config import ConfigError
    from resnet_jax.training import steps_per_dispatch

    if not isinstance(backend, str):
        return None
    try:
        return steps_per_dispatch(Config(steps_per_dispatch=config.get("steps_per_dispatch")), backend)
    except (ConfigError, TypeError, ValueError):
        return None


def _k_said(k: int, meta: dict) -> str:
    given = meta.get("config", {}).get("steps_per_dispatch") is not None
    return f"{k}" if given else f"{k}, the default on {meta['backend']}"


# A checkpoint's arrays, as its metadata declares them, against the bytes of its files. TensorStore
# writes no chunk that holds only zeros, so a few kilobytes of files can declare a model of any size
# (a meta naming a billion classes), and reading them allocates all of it. Trained weights barely
# compress (1.09x, measured on the tests' runs of both recipes); a fresh --recipe best state, its
# momentum zero, 1.6x; the chapter's state with its weights zeroed, 750x. A checkpoint that declares
# more than EXPANSION times its files, and more than UNCHECKED_BYTES (the chapter's whole train
# state, EMA and momentum included, is 134 MB), is not read.
EXPANSION = 16
UNCHECKED_BYTES = 500_000_000
ITEMS = ("meta", "state")  # a checkpoint's items, each a folder in its epoch's folder


def _handler_registry(ocp):
    """Which Orbax handler writes and reads each of a checkpoint's two items: the train state
    (StandardSave/StandardRestore) and the JSON record (JsonSave/JsonRestore). Orbax's
    ``item_names=("state", "meta")`` said the same and is deprecated for this. One registry per
    manager: it holds the handler instances."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save, restore in (("state", ocp.args.StandardSave, ocp.args.StandardRestore),
                                ("meta", ocp.args.JsonSave, ocp.args.JsonRestore)):
        registry.add(item, save)
        registry.add(item, restore)
    return registry


@dataclass
class Checkpoint:
    """One restored checkpoint."""

    state: object  # a TrainState
    epoch: int
    history: list[dict]  # fit's per-epoch records
    log: list[dict]  # the metrics.jsonl records written up to this epoch
    metadata: dict
    path: Path

    @property
    def config(self) -> Config:
        return Config(**self.metadata["config"])


def _state_dict(state) -> dict:
    from flax import serialization

    return serialization.to_state_dict(state)


def _before_recipes(meta) -> bool:
    """Whether ``meta`` is from a checkpoint saved before Config had a recipe (ce43940, 2026-11-24):
    its state has another layout (no EMA weights), and its restore failed as "unreadable
    (corrupt or incomplete) ... remove it", of a whole checkpoint. (The package's version
    said 0.1.0 then as now: the config's keys tell, and the digests every save has written since
    2026-12-04, so that a meta of one's own code without a recipe is not taken for one.)"""
    if not isinstance(meta, dict) or "digests" in meta or not isinstance(meta.get("metadata"), dict):
        return False
    config = meta["metadata"].get("config")
    return isinstance(config, dict) and "recipe" not in config


def _meta_problem(meta, epoch: int) -> str | None:
    """What makes a checkpoint's meta item unusable as :meth:`Checkpoints.save` writes it (edited
    by hand, or written by other code), else None: --resume, evaluate and predict read its
    fields without further checks (a TypeError or KeyError traceback, or an epoch trained again
    and refused at its save)."""
    if not isinstance(meta, dict) or not {"epoch", "history", "metadata"} <= set(meta):
        return "its meta item lacks epoch, history or metadata"
    if meta["epoch"] != epoch or isinstance(meta["epoch"], bool):
        return f"its meta item says epoch {meta['epoch']!r}, its folder {epoch}"
    history = meta["history"]
    if not isinstance(history, list) or not history or not all(isinstance(r, dict) for r in history):
        return "its meta item's history is not a list of epoch records"
    if history[-1].get("epoch", epoch) != epoch:  # (records of code of one's own may lack the epoch)
        return f"its meta item's history ends with epoch {history[-1]['epoch']!r}, not {epoch}"
    # (Records of any keys: Checkpoints.save takes a loop of one's own. The curves plot those of
    # train.py's kinds alone.)
    if not isinstance(log := meta.get("log", []), list) or not all(isinstance(r, dict) for r in log):
        return "its meta item's log is not a list of records"
    m = meta["metadata"]
    if not isinstance(m, dict) or (missing := [k for k in METADATA_KEYS if k not in m]):
        return f"its metadata lacks {', '.join(missing) if isinstance(m, dict) else 'everything (not a dict)'}"
    return None


def _check_meta_describes(state, meta: dict) -> None:
    """ValueError unless ``meta`` describes the state: the model and optimizer load_for_inference builds
    from it must take the saved arrays and go on as the state would (a checkpoint that cannot be
    loaded, or loads as another model, is not written)."""
    from resnet_jax import training

    if not isinstance(state, training.TrainState):
        # A dict of params and batch_stats was written, and then could not be loaded ("no array step").
        raise ValueError(f"state is the TrainState to save (training.initial_state's, fit's result.state), "
                         f"got a {type(state).__name__}")
    params = state.params
    have = {"num_classes": params["dense"]["bias"].shape[0], "input_channels": params["b1"]["conv"]["kernel"].shape[2]}
    if wrong := [f"{k} {meta[k]!r} (the state's model: {v})" for k, v in have.items() if meta.get(k) != v]:
        raise ValueError(f"meta says {', '.join(wrong)}: pass checkpoint.metadata(config, spec) of the model's "
                         "dataset, or set those keys to the model's")
    if "class_names" in meta and len(meta["class_names"]) != have["num_classes"]:
        raise ValueError(f"meta names {len(meta['class_names'])} classes; the state's model has {have['num_classes']}")
    try:
        config, steps_per_epoch = _built_by(meta)
    except Exception as err:  # a meta of one's own making: Config's own check or a TypeError
        raise ValueError(f"meta's config cannot be read as a Config ({type(err).__name__}: {err}): "
                         "pass checkpoint.metadata(config, spec)") from err
    # A bfloat16 state under a float32 config's meta loaded as a float32 model, silently; another
    # recipe's state or an optimizer of one's own did not load at all; another schedule trained on
    # from the wrong step size. So the state must be what loading builds: the same model settings,
    # recipe and (where the state knows them) learning rate and schedule, and the same arrays.
    template = _template(config, steps_per_epoch, have["num_classes"], have["input_channels"])
    said = dict(training.built_from(config, steps_per_epoch), **_model_settings(template), recipe=config.recipe)
    mine = dict(state.built_from or (), **_model_settings(state), recipe=state.recipe)  # built_from: None for a model of one's own
    if wrong := [f"{k} {said.get(k)!r} (the state's: {v!r})" for k, v in mine.items() if v is not None and said.get(k) != v]:
        raise ValueError(f"meta's config says {', '.join(wrong)}: pass checkpoint.metadata(config, spec, "
                         "steps_per_epoch) of the config the state was built from")
    if problem := _fit_problem(_state_dict(state), _state_dict(template)):
        raise ValueError(f"the state {problem} that meta's config builds (its optimizer, recipe or dtypes differ): "
                         "load_for_inference could not restore it; pass checkpoint.metadata(config, spec, "
                         "steps_per_epoch) of the config the state was built from")


@functools.lru_cache(maxsize=8)
def _template(config: Config, steps_per_epoch: int, num_classes: int, input_channels: int):
    """The abstract TrainState (shapes and dtypes) that load_for_inference restores a checkpoint into."""
    from resnet_jax import training

    model = training.make_model(config, num_classes, input_channels)
    # The state's optimizer is the run's, schedule included, so that training can go on from it.
    tx = training.make_optimizer(config, steps_per_epoch=steps_per_epoch)
    plan = training.built_from(config, steps_per_epoch)
    return jax.eval_shape(
        lambda: training.create_train_state(model, tx, jax.random.key(0), recipe=config.recipe).replace(built_from=plan)
    )


def _model_settings(state) -> dict:
    """The compute dtype and conv lowering of the state's model (its apply_fn's module), None where unknown."""
    model = getattr(state.apply_fn, "__self__", None)
    if model is None or not hasattr(model, "conv_impl"):
        return {"dtype": None, "conv_impl": None}
    return {"dtype": jax.numpy.dtype(model.dtype or jax.numpy.float32).name, "conv_impl": model.conv_impl}


def _fit_problem(arrays: dict, abstract: dict) -> str | None:
    """How the arrays of one state dict differ from another's (names, shapes, dtypes); None if they do not."""
    have = {_name(k): (np.shape(a), jax.numpy.result_type(a)) for k, a in jax.tree_util.tree_leaves_with_path(arrays)}
    want = {_name(k): (tuple(a.shape), jax.numpy.dtype(a.dtype)) for k, a in jax.tree_util.tree_leaves_with_path(abstract)}
    for names, what in ((sorted(set(want) - set(have)), "lacks"), (sorted(set(have) - set(want)), "has an array not in")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            return f"{what} {names[0]}{more} of the model and optimizer" if what == "lacks" else f"{what} the model and optimizer, {names[0]}{more},"
    for name, (shape, dtype) in want.items():
        if have[name] != (shape, dtype):
            return f"holds {name} as {have[name][1]}{list(have[name][0])}, not as the {dtype}{list(shape)} of the model and optimizer"
    return None


def _as_json(records, name: str):
    """``records`` as JSON holds them, checked before anything is written: NumPy and JAX scalars (a
    loop of one's own sums its metrics in them) become Python numbers; anything else JSON cannot
    hold is a ValueError naming it (Orbax's TypeError came mid-save, leaving a temporary folder)."""
    def scalar(value):
        if np.ndim(value) == 0 and hasattr(value, "item"):
            return value.item()
        raise TypeError(f"{type(value).__name__} {value!r}")

    try:
        return json.loads(json.dumps(records, default=scalar))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} holds a value JSON cannot hold ({err}): numbers, strings, lists and dicts") from err


def _built_by(meta: dict) -> tuple[Config, int]:
    """The config and steps per epoch that load_for_inference builds the model and optimizer from."""
    config = Config(**meta["config"])
    # An older checkpoint's metadata holds no steps per epoch: train.py's, from the config.
    return config, meta.get("steps_per_epoch") or config.steps_per_epoch


def _why_not_written(err: BaseException) -> str:
    """Why a checkpoint write failed, in a few words. A full disk is named as such: TensorStore says
    it at the end of a long message ('RESOURCE_EXHAUSTED: Error writing local file "...": ...
    No space left on device'), which the first 200 characters never reached."""
    if "No space left on device" in str(err):
        return "No space left on device"
    return f"{type(err).__name__}: {first_line(err)}"


class Checkpoints:
    """The checkpoints of one run directory: save after an epoch, restore latest or best.

    A context manager: ``with Checkpoints(run_dir) as ckpts:`` closes it on leaving.

    Unless ``read_only``, it holds the run folder's lock (``files.RUN_LOCK``, as train.py
    does) until closed, on process 0 of a run of several: it cleans up the temporary
    folders of unfinished saves, which are a running train.py's save in progress (that
    save failed). A folder another program writes is refused (CheckpointError); read it
    with ``read_only=True``, as :func:`load_for_inference` does.
    """

    def __init__(self, directory: str | Path, keep: int = 3, track_best: bool = False, read_only: bool = False):
        import orbax.checkpoint as ocp

        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 1):
            raise ValueError(f"keep is how many checkpoints to keep: an int >= 1 (or None for all), got {keep!r}")
        keep = None if keep is None else int(keep)
        self.keep = keep
        self._ocp = ocp
        self.directory = Path(os.path.abspath(directory))  # Orbax takes absolute paths only
        self.latest = self.best = None
        self._lock = contextlib.ExitStack()
        common = dict(enable_async_checkpointing=False, read_only=read_only, create=not read_only)
        try:
            if not read_only:
                refused = None
                if jax.process_index() == 0:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    try:
                        self._lock.enter_context(files.held(self.directory / files.RUN_LOCK, reentrant=True))
                    except files.Busy as err:
                        holder = f" ({err.holder})" if err.holder else ""  # (filelock's names no holder)
                        refused = (f"{self.directory} is being written by another program{holder}; to read it "
                                   "meanwhile, open it with read_only=True (load_for_inference does)")
                    except files.NotALockFile as err:
                        refused = f"{self.directory / files.RUN_LOCK} {err.strerror}"
                # Every process of a run hears process 0's answer (the others would wait in Orbax's
                # first barrier until process 0 ended, then fail in C++).
                if processes.any_process(refused is not None):
                    raise CheckpointError(refused or f"{self.directory} is being written by another program, or cannot be locked "
                                                  "(process 0 says which)")
            self._refuse_what_orbax_would_delete(read_only)  # before the managers clean up anything
            # Orbax warns that a read-only manager keeps and deletes nothing: as intended, so not shown.
            with _absl_quiet() if read_only else contextlib.nullcontext():
                # Which checkpoints stay is a preservation policy: Orbax has deprecated max_to_keep.
                policies = ocp.checkpoint_managers
                self.latest = ocp.CheckpointManager(
                    self.directory / "checkpoints",
                    options=ocp.CheckpointManagerOptions(
                        preservation_policy=policies.LatestN(n=keep), cleanup_tmp_directories=not read_only, **common),
                    handler_registry=_handler_registry(ocp),
                )
                self.best = None
                if track_best or (self.directory / "best").is_dir():
                    self.best = ocp.CheckpointManager(
                        self.directory / "best",
                        # best_fn/best_mode still say which step best_step() returns; the policy
                        # says which one stays (reverse=False: ascending, the highest kept).
                        options=ocp.CheckpointManagerOptions(
                            best_fn=_val_acc, best_mode="max",
                            preservation_policy=policies.BestN(
                                get_metric_fn=_val_acc, reverse=False, n=1, keep_checkpoints_without_metrics=False),
                            cleanup_tmp_directories=not read_only, **common,
                        ),
                        handler_registry=_handler_registry(ocp),
                    )
            # Each manager starts a thread that cleans up temporary folders; a program that exits
            # while it runs (one that never calls close()) gets a traceback from the interpreter's
            # shutdown. Waiting for it here leaves no thread behind (it takes milliseconds).
            self._await_cleanup()
        except CheckpointError:
            self.close()
            raise
        except Exception as err:  # e.g. 'checkpoints' is a file, or the folder cannot be read
            self.close()
            if lost := self._lost(err, f"opening {self.directory}"):
                raise lost from err
            raise CheckpointError(f"cannot use {self.directory} for checkpoints: {type(err).__name__}: {first_line(err)}") from err

    def _refuse_what_orbax_would_delete(self, read_only: bool) -> None:
        """CheckpointError for what is in checkpoints/ or best/ and is not this run's to rotate.

        A file where an epoch's folder would be: Orbax skips it when restoring and deletes it
        when it saves that epoch. Someone put it there; it is theirs to move. Writing, Orbax also
        deletes every other folder named by a number as it rotates checkpoints, whatever it holds,
        and cleans up temporary folders: a link there, a folder of someone else's (a run folder from
        elsewhere whose best/ is a link to ~/photos, with 2019/ and 2020/ in it), or a checkpoints/
        or best/ that links into another run's folder, is refused before anything is written. (A
        checkpoints/ linked to a folder of its own on a bigger disk is fine.)
        """
        here = os.path.realpath(self.directory)
        for folder in ("checkpoints", "best"):
            path = self.directory / folder
            if not read_only and path.is_symlink():
                owner = Path(os.path.realpath(path)).parent
                if str(owner) != here and any((owner / name).exists() for name in files.RUN_FILES):
                    raise CheckpointError(f"{path} is a symbolic link into another run's folder ({owner}), whose "
                                          "checkpoints rotating would delete; remove the link")
            with contextlib.suppress(OSError):
                for entry in path.iterdir():
                    if not entry.name.isdigit():
                        continue
                    where = f"where the checkpoint of epoch {entry.name} would be"
                    if not read_only and entry.is_symlink():
                        raise CheckpointError(f"{entry} is a symbolic link {where} (rotating checkpoints would "
                                              "delete what it points to); move it elsewhere")
                    if not entry.is_dir():
                        raise CheckpointError(f"{entry} is a file {where}; move it elsewhere")
                    if not read_only and not any((entry / item).exists() for item in ITEMS):
                        if _left_of_ours(entry):
                            raise CheckpointError(f"{entry} is what is left of the checkpoint of epoch {entry.name}, "
                                                  f"partly removed (its items {', '.join(ITEMS)} are gone), and no "
                                                  "checkpoint to use: remove it by hand")
                        raise CheckpointError(f"{entry} is a folder {where} that holds none of a checkpoint's "
                                              f"items ({', '.join(ITEMS)}), and rotating checkpoints would delete "
                                              "it; move it elsewhere")

    def close(self) -> None:
        """Close Orbax's managers and release the lock (idempotent); ``with Checkpoints(...) as ckpts:`` does it on leaving."""
        try:
            with contextlib.suppress(Exception):  # a cleanup that fails (the folder gone) must not keep the lock
                self._await_cleanup()
            for manager in (self.latest, self.best):
                if manager is not None:
                    with _absl_quiet():
                        manager.close()
        finally:
            self._lock.close()

    def _await_cleanup(self) -> None:
        for manager in (self.latest, self.best):
            if manager is not None:
                with _absl_quiet():
                    # Orbax 0.12's close() does not wait for its cleanup thread; its own
                    # save() does, through this private method (skipped if Orbax renames it).
                    wait_for_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
                    if wait_for_cleanup is not None:
                        wait_for_cleanup()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _manager(self, which: str):
        if which == "latest":
            return self.latest
        if which == "best":
            if self.best is None or self.best.latest_step() is None:
                why = ("the run was trained without --val-split" if self.best is None else
                       # (An older version's run stopped after epoch 1 left it so; --resume writes it.)
                       "its best/ is empty: the run stopped before saving one; --resume writes it")
                raise CheckpointError(f"{self.directory} has no best checkpoint ({why})")
            return self.best
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")

    def latest_epoch(self) -> int | None:
        return self.latest.latest_step()

    def _lost(self, err: BaseException, doing: str) -> ProcessLost | None:
        """A ProcessLost for ``err`` when it says a process of the run is gone; else None.

        Without it, a lost process read as a damaged checkpoint: "unreadable (corrupt or
        incomplete) ... remove it", of a checkpoint that was whole."""
        if not processes.lost_process(err):
            return None
        return ProcessLost(f"another process of this run stopped while {doing} ({first_line(err, 160)}); "
                           f"{self.after_a_lost_process()}")

    def after_a_lost_process(self) -> str:
        """What a run that lost one of its processes keeps, and how to go on: the end of its one line."""
        kept = self._epoch_on_disk()
        if kept is None:
            return "no checkpoint was written"
        return f"the checkpoint of epoch {kept} in {self.directory} is intact: start every process again with --resume"

    def _epoch_on_disk(self) -> int | None:
        """The latest whole checkpoint's epoch, read from the folder, not from Orbax's list (which
        a save cut short by a lost process may not have updated): Orbax writes each one in a
        temporary folder and renames it to its epoch when every process's part is in."""
        with contextlib.suppress(OSError):
            epochs = [int(p.name) for p in (self.directory / "checkpoints").iterdir() if p.name.isdigit() and p.is_dir()]
            return max(epochs, default=None)
        return None

    def _steps_on_disk(self, manager) -> set[int]:
        """The epochs of the whole checkpoints in ``manager``'s folder (renamed from Orbax's temporary folder)."""
        with contextlib.suppress(OSError):
            return {int(p.name) for p in Path(manager.directory).iterdir() if p.name.isdigit() and p.is_dir()}
        return set()

    def write_problem(self, epochs: int | None = None) -> str | None:
        """Why a save would be refused for want of permission, or None.

        A save makes a folder in ``checkpoints/`` (and ``best/``) and then removes the checkpoints
        that ``keep`` rotates away (and, on a resume, the superseded ones): all must be writable.
        ``epochs``: the epoch the run ends at, when known: then only the checkpoints that ``keep``
        rotates away before it are asked about (with --keep 3, a run resumed from epoch 1 to 3
        removes none: one left read-only was refused all the same).
        Asked before training: otherwise a folder made read-only (a permission, a read-only
        mount) was found by the first save, after an epoch's work. (Root passes os.access's
        permission bits, but not a read-only mount's or an immutable folder's, as the save would.)"""
        import tempfile

        for manager in (self.latest, self.best):
            if manager is None:
                continue
            folder = Path(manager.directory)
            # A folder made and removed, as a save makes its temporary folder and rotation removes
            # one. (Not tempfile.TemporaryDirectory: in a folder that takes a new folder but lets
            # none be removed, an append-only one (chattr +a), its cleanup recursed until a
            # RecursionError, 6,000 lines of traceback, and left its folder behind unnamed.)
            probe = None
            try:
                probe = tempfile.mkdtemp(dir=folder, prefix=".write-test-")
                os.rmdir(probe)
            except OSError as err:
                left = (f" ({probe}, made to find that out, cannot be removed either: remove it once the folder is writable)"
                        if probe is not None and os.path.lexists(probe) else "")
                return f"no checkpoint can be written in {folder}: {err.strerror or first_line(err)}{left}"
            steps = sorted(self._steps_on_disk(manager))
            if manager is self.latest and epochs is not None:
                # Every epoch up to ``epochs`` is saved, after the ones here; the newest ``keep`` stay.
                new = max(0, epochs - max(steps, default=0))
                stay = 0 if self.keep is None else max(0, self.keep - new)
                steps = [] if self.keep is None else steps[:max(0, len(steps) - stay)]
            for epoch in steps:
                for sub, _, _ in os.walk(folder / str(epoch)):  # removing a checkpoint empties each of its folders
                    if not os.access(sub, os.W_OK):
                        return (f"{sub} cannot be changed (not writable), and the run removes that checkpoint "
                                f"{'when newer ones replace it (--keep)' if manager is self.latest else 'when a better one replaces it'}")
        return None

    def save(self, state, epoch: int, history: list[dict], log: list[dict], meta: dict, best_only: bool = False) -> list[str]:
        """Save the state after ``epoch``; also as the best if its val_acc beats every earlier epoch's.

        ``history``: fit's records of epochs 1..epoch; ``log``: the step log (may be empty);
        ``meta``: :func:`metadata` (config, dataset), what :func:`load_for_inference` rebuilds the
        model from (ValueError, nothing written, when keys are missing).
        ``best_only``: the best checkpoint alone (:meth:`repair_best`).
        Raises CheckpointError (the earlier checkpoints stay as they were) when the write fails;
        ProcessLost, one, when it failed because another process of the run is gone.
        Returns notes (lines to show): the save is whole, but older checkpoints that it rotated
        away could not be removed.
        """
        if missing := [k for k in METADATA_KEYS if k not in meta]:
            raise ValueError(f"meta lacks {', '.join(missing)}: pass checkpoint.metadata(config, spec)")
        meta = _as_json(meta, "meta")
        _check_meta_describes(state, meta)
        # The epoch names the checkpoint's folder and is what resume continues after: a float
        # made a folder "4.0", a numpy int failed after the write began, and an epoch at or
        # below the latest replaced or hid a later checkpoint.
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 1:
            raise ValueError(f"epoch is the number of epochs done: an int >= 1, got {epoch!r}")
        epoch = int(epoch)
        if not best_only and (kept := self.latest_epoch()) is not None and epoch <= kept:
            raise ValueError(f"{self.latest.directory} holds the checkpoint of epoch {kept} already: "
                             f"save epochs in order (got {epoch})")
        history, log = _as_json(history, "history"), _as_json(log, "log")
        last = history[-1] if isinstance(history, list) and history else None
        if not isinstance(last, dict) or last.get("epoch") != epoch:
            # Loaded, the history says where training goes on from: --resume continues after its
            # last record's epoch (an empty one redid epoch 1 and was refused at its save).
            ends = "is empty" if last is None else f"ends with {last!r}"[:120]
            raise ValueError(f"history {ends}; the checkpoint is of epoch {epoch}: pass the records of "
                             "epochs 1..epoch, each a dict with its 'epoch', as fit's history")
        ocp = self._ocp
        state_dict = _state_dict(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict),
            meta=ocp.args.JsonSave({"epoch": epoch, "history": history, "log": log, "metadata": meta,
                                    "digests": digests(state_dict)}),
        )
        targets = [] if best_only else [(self.latest, None)]
        if self.best is not None and (val_acc := _best_so_far(history)) is not None:
            targets.append((self.best, {"val_acc": val_acc}))
        # A full disk is the usual failure: found here, it is one clean message. Found by
        # Orbax mid-write, it also leaves its writer threads printing tracebacks.
        if problem := self.room_problem(state, copies=len(targets)):
            raise CheckpointError(self._not_saved(epoch, self.latest, problem))
        notes = []
        for manager, metrics in targets:
            before = None  # the steps listed just before Orbax's save began
            try:
                with _absl_quiet():  # Orbax's threads log each failure with a traceback; the error below says it once
                    if manager is self.best:
                        # A best checkpoint of this epoch or a later one is from the run before a resume
                        # redid those epochs (its latest checkpoints removed): superseded, and in the way
                        # (Orbax: "StepAlreadyExistsError", after the epoch's work).
                        for stale in [s for s in manager.all_steps() if s >= epoch]:
                            manager.delete(stale)
                    before = set(manager.all_steps())
                    manager.save(epoch, args=args, metrics=metrics, force=True)
                    manager.wait_until_finished()
            except Exception as err:  # a lost mount, a permission change, a disk filled by another process...
                if lost := self._lost(err, f"the checkpoint of epoch {epoch} was being written in {manager.directory}"):
                    raise lost from err
                # Orbax removes the checkpoints --keep rotates away after the new one is whole (renamed
                # to its epoch, in its list): a failure there loses nothing and does not stop the run.
                # (It was reported as "could not save the checkpoint of epoch N ... epoch N is intact".)
                # (Not a stale best of this epoch that could not be removed: Orbax lists a step until it is
                # gone, and the note said the new best was saved when the old one stayed.)
                if (before is not None and epoch not in before and epoch in manager.all_steps()
                        and epoch in (on_disk := self._steps_on_disk(manager))):
                    notes.append(f"the checkpoint of epoch {epoch} is saved in {manager.directory}, but "
                                 + _rotation_stopped(before - set(manager.all_steps()), on_disk, _why_not_written(err)))
                    continue
                raise CheckpointError(self._not_saved(epoch, manager, _why_not_written(err))) from err
        return notes

    def repair_best(self, restored: "Checkpoint") -> bool:
        """Save ``restored`` (the latest checkpoint) as the best too if it is the best epoch and ``best/``
        lacks it: a run killed between an epoch's two saves left ``best/`` on an earlier epoch, which
        --resume then kept for good. True if it saved."""
        kept = self.best.latest_step() if self.best is not None else None
        if self.best is None or (kept is not None and kept >= restored.epoch) or _best_so_far(restored.history) is None:
            return False  # no best/ kept; best/ holds this epoch or a later one; or this epoch is not the best
        self.save(restored.state, restored.epoch, restored.history, restored.log, restored.metadata, best_only=True)
        return True

    def _not_saved(self, epoch: int, manager, why: str) -> str:
        kept = self.latest_epoch()
        return (
            f"could not save the checkpoint of epoch {epoch} in {manager.directory}: {why}; "
            + (f"the checkpoint of epoch {kept} is intact" if kept is not None else "no earlier checkpoint")
        )

    def room_problem(self, state, copies: int = 1) -> str | None:
        """'only N MB free ...' when the run directory's disk cannot take ``copies`` more checkpoints of ``state``; else None.

        A checkpoint takes at most the state's raw bytes (zstd shrinks float
        weights little), plus its small JSON and Orbax's metadata.
        """
        import shutil

        leaves = jax.tree_util.tree_leaves(_state_dict(state))
        raw = sum(x.size * x.dtype.itemsize if hasattr(x, "dtype") else 8 for x in leaves)  # 8: a Python step count
        need = copies * raw + (4 << 20)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError as err:  # the folder moved or deleted under the run, a stale network mount
            return f"cannot reach {self.directory}: {err.strerror or first_line(err)}"
        if free >= need:
            return None
        return f"only {free / 1e6:.0f} MB free on its disk, and {'a checkpoint takes' if copies == 1 else f'{copies} checkpoints take'} about {need / 1e6:.0f} MB"

    def read_meta(self, which: str = "latest") -> dict:
        """The ``meta`` item of the latest (or best) checkpoint, without reading any array."""
        manager = self._manager(which)
        epoch = manager.latest_step() if which == "latest" else manager.best_step()
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {manager.directory}")
        step_dir = manager.directory / str(epoch)
        missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
        if missing:  # an interrupted copy, or a folder made by hand: say so, and what would be used instead
            raise CheckpointError(f"checkpoint {step_dir} is incomplete (no {' and no '.join(m + '/' for m in missing)}); "
                                  f"{_instead(manager, epoch)}")
        try:
            meta = manager.restore(epoch, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())).meta
        except Exception as err:
            if lost := self._lost(err, f"checkpoint {step_dir} was being read"):
                raise lost from err
            raise CheckpointError(
                f"checkpoint {manager.directory / str(epoch)} is unreadable (corrupt or incomplete): "
                f"{type(err).__name__}: {first_line(err)}; {_instead(manager, epoch)}"
            ) from err
        if _before_recipes(meta):  # whole, and of another layout: neither "corrupt" nor to be removed
            raise CheckpointError(f"checkpoint {step_dir} was written by an early resnet_jax (before --recipe, "
                                  "2026-11-24), whose train state this version cannot read; it is left as it is: "
                                  "read it with the version that wrote it, or train again")
        if problem := _meta_problem(meta, epoch):  # read whole, but not as save writes it: not "corrupt"
            raise CheckpointError(f"checkpoint {step_dir} has a meta item this package cannot use "
                                  f"(edited by hand, or written by other code?): {problem}; {_instead(manager, epoch)}")
        return {**meta, "path": str(manager.directory / str(epoch))}

    def restore(self, template_state, which: str = "latest", meta: dict | None = None) -> Checkpoint:
        """The latest (or best) checkpoint's arrays into the structure of ``template_state``."""
        from flax import serialization

        meta = meta or self.read_meta(which)
        manager = self._manager(which)
        epoch, path = meta["epoch"], Path(meta["path"])
        abstract = jax.eval_shape(lambda: _state_dict(template_state))
        # Read onto the devices of this process's run, replicated (every array of the train
        # state is), not onto the devices it was saved from: Orbax would otherwise refuse a
        # checkpoint of 4 GPUs on 1, or of a cluster on a laptop.
        here = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec())
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract)
        declared = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(abstract))
        if declared > max(UNCHECKED_BYTES, EXPANSION * (stored := _bytes_under(path / "state"))):
            raise CheckpointError(f"checkpoint {path} declares {declared / 1e6:,.0f} MB of arrays in {stored / 1e6:,.1f} MB "
                                  f"of files, more than {EXPANSION}x (edited by hand, or written by other code?), "
                                  f"and is not read; {_instead(manager, epoch)}")
        # Check before Orbax reads: its restore reads all arrays at once and, at the first
        # failure, abandons the other reads, which print a traceback each when collected.
        problem = arrays_problem(path / "state", abstract, meta.get("digests"))  # older checkpoints hold no digests
        if problem and problem.startswith("does not fit"):  # another model's: older ones are no better
            raise CheckpointError(f"checkpoint {path} {problem}")
        if problem:  # damaged: the earlier checkpoints may be whole
            raise CheckpointError(f"checkpoint {path} {problem}; {_instead(manager, epoch)}")
        try:
            restored = manager.restore(
                epoch, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract))
            ).state
            state = serialization.from_state_dict(template_state, restored)
        except Exception as err:
            if lost := self._lost(err, f"checkpoint {path} was being read"):
                raise lost from err
            raise CheckpointError(f"checkpoint {path} is unreadable: {_root_cause(err)}") from err
        return Checkpoint(state, epoch, meta["history"], meta.get("log", []), meta["metadata"], path)


def _left_of_ours(folder: Path) -> bool:
    """Whether ``folder``, which holds none of ITEMS, is what a removal left of one of our checkpoints:
    Orbax's record in it names exactly our items. (A rotation that stopped at a file it could not remove
    leaves it so; it was refused as a folder of someone else's, to be moved elsewhere. Someone else's
    Orbax checkpoint names its own items, and stays refused as such.)"""
    try:
        record = json.loads((folder / "_CHECKPOINT_METADATA").read_text())
        return sorted(record["item_handlers"]) == sorted(ITEMS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _rotation_stopped(tried: set[int], on_disk: set[int], why: str) -> str:
    """The end of the note of a save whose rotation failed: ``tried``, the epochs Orbax took off its list
    to remove, ``on_disk``, those whose folders are still there.

    Orbax removes them oldest first, each folder as far as it can, and stops at the first it cannot
    remove: that one is left partly removed (its meta item gone and its state kept, say), and the
    ones after it whole, not tried. Neither is on its list any more: this run leaves them there, and
    the next one (--resume) tries the stuck one first again and stops there again. (The note named
    them all alike as "could not be removed", the half-removed one among the whole ones.)"""
    left = sorted(tried & on_disk)
    if not left:
        return f"removing older ones failed: {why}"
    stuck, rest = left[0], left[1:]
    one = len(rest) == 1
    return (f"removing the older ones stopped at epoch {stuck} ({why}), whose folder may be left partly removed and "
            f"is no checkpoint to use: remove it by hand"
            + (f"; {'that' if one else 'those'} of epoch{'' if one else 's'} {', '.join(map(str, rest))}, whole, "
               f"{'was' if one else 'were'} left too: remove {'it' if one else 'them'} by hand as well" if rest else ""))


def _bytes_under(folder: Path) -> int:
    """The bytes of the files in ``folder`` and its subfolders (links not followed), as written on
    the disk: a sparse file (``truncate -s 1T state/junk``) counts its written blocks alone, not the
    size it claims, which would otherwise let any checkpoint through the EXPANSION check."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                blocks = getattr(st, "st_blocks", None)  # (none on Windows)
                total += st.st_size if blocks is None else min(st.st_size, blocks * 512)
    return total


def _best_so_far(history: list[dict]) -> float | None:
    """The last epoch's val_acc if it beats every earlier epoch's (what goes into best/), else None."""
    val_acc = history[-1].get("val_acc") if history else None
    earlier = [r["val_acc"] for r in history[:-1] if r.get("val_acc") is not None]
    return val_acc if val_acc is not None and (not earlier or val_acc > max(earlier)) else None


def _instead(manager, epoch: int) -> str:
    """What a damaged checkpoint of ``epoch`` leaves: the way to the one before it, if any."""
    earlier = [s for s in manager.all_steps() if s < epoch]
    return f"remove it to use the checkpoint of epoch {max(earlier)}" if earlier else "there is no earlier checkpoint"


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def digests(state_dict) -> dict[str, str]:
    """``{'params/dense/kernel': digest of its bytes, ...}`` for the arrays of a state dict.

    Replicated arrays (every array of our train state, on any number of devices
    or hosts) are digested from one local copy; an array split across hosts is
    left out, as is a Python number.
    """
    out = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(state_dict):
        if isinstance(leaf, jax.Array):
            if leaf.is_fully_addressable:
                out[_name(key_path)] = _digest(np.asarray(leaf))
            elif leaf.is_fully_replicated:
                out[_name(key_path)] = _digest(np.asarray(leaf.addressable_data(0)))
        elif isinstance(leaf, np.ndarray):
            out[_name(key_path)] = _digest(leaf)
    return out


def arrays_problem(state_dir: Path, abstract, expected_digests: dict[str, str] | None = None) -> str | None:
    """Why the arrays in ``state_dir`` cannot restore ``abstract`` ('does not fit ...', 'is unreadable ...'); None if they can.

    Orbax's restore reads all arrays at once and, at the first failure, abandons
    the other reads, which later print a traceback each (with a TensorStore
    spec, tens of lines) when collected or at exit. So the arrays are checked
    first, one at a time, through TensorStore's synchronous API: their names
    (Orbax stores ``params/dense/kernel`` as ``params.dense.kernel`` in one
    OCDBT database), shapes and dtypes, then one full read, where zstd and
    OCDBT detect a truncated, garbled or missing file, and where each array's
    bytes are compared with ``expected_digests`` (the meta item's, if any).
    The read costs about 0.5 s for the largest state (the best recipe's, with
    EMA copies).
    """
    import tensorstore as ts

    # The folder as a spec, as Orbax writes it, not a file:// URL: a URL read "#", "?" and "%41"
    # in a folder's name as its fragment, query and an escaped "A", and found no checkpoint there.
    database = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{state_dir}/"}}
    try:
        stored = {key.decode().split("/")[0] for key in ts.KvStore.open(database).result().list().result()}
    except Exception as err:
        return f"is unreadable (corrupt or incomplete): {_root_cause(err)}"
    wanted = {_name(k): leaf for k, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    key = {name: name.replace("/", ".") for name in wanted}  # each array's name in the database
    if not stored & set(key.values()):  # none of the arrays: a damaged save, not another model
        return "is incomplete: it holds none of the model's arrays"
    if missing := sorted(n for n in wanted if key[n] not in stored):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"does not fit this model: it has no array {missing[0]}{more}"
    if extra := sorted(stored - set(key.values())):
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"does not fit this model: it has an array this model lacks, {extra[0].replace('.', '/')}{more}"
    arrays = {}
    for name, want in wanted.items():
        try:
            arrays[name] = array = _open_array(ts, {**database, "path": key[name] + "/"})
        except Exception as err:
            return f"is unreadable (corrupt or incomplete): array {name}: {_root_cause(err)}"
        have = (tuple(array.shape), jax.numpy.dtype(array.dtype.numpy_dtype))
        if have != (tuple(want.shape), jax.numpy.dtype(want.dtype)):
            return (
                f"does not fit this model: {name} is {have[1]}{list(have[0])} in the checkpoint, "
                f"{jax.numpy.dtype(want.dtype)}{list(want.shape)} in this model"
            )
    for name, array in arrays.items():
        try:
            values = array.read().result()
        except Exception as err:
            return f"is unreadable (corrupt or incomplete): array {name}: {_root_cause(err)}"
        if expected_digests and name in expected_digests and _digest(values) != expected_digests[name]:
            return (f"is corrupt: array {name} is not what was saved (its bytes changed after the save, "
                    "and still decode)")
    return None


@contextlib.contextmanager
def _absl_quiet():
    """absl's logger (Orbax's) silent below CRITICAL inside, as it was after; and
    :func:`_without_closed_loop_errors` inside."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    hook = sys.unraisablehook
    sys.unraisablehook = _without_closed_loop_errors(hook)
    try:
        yield
    finally:
        logger.setLevel(level)
        sys.unraisablehook = hook


def _without_closed_loop_errors(hook):
    """``hook`` (an unraisable hook) but for the "Event loop is closed" errors of a failed save.

    When one write fails (a disk filled mid-save), Orbax closes its event loop while
    TensorStore's other writes still complete, and each completion's callback reports a
    RuntimeError as "unraisable": about 90 tracebacks, 500 lines, for this network on a full
    disk (measured), during the save or after it has failed. The save's own error says what
    happened, once.
    """

    def quiet(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            hook(unraisable)

    return quiet


def quiet_abandoned_writes() -> None:
    """For a process that ends on a failed or interrupted save (train.py's): from here on, the
    save's unfinished writes report nothing. They would, after the one line that says what is
    kept: absl's tracebacks, "Event loop is closed" (:func:`_without_closed_loop_errors`),
    asyncio's "Task exception was never retrieved" as they are collected, and a coroutine never
    awaited at the exit."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _open_array(ts, kvstore):
    """The TensorStore array at ``kvstore``: zarr v2 (Orbax's default format), else zarr v3."""
    try:
        return ts.open({"driver": "zarr", "kvstore": kvstore}, open=True, read=True).result()
    except Exception as v2_error:
        try:
            return ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True, read=True).result()
        except Exception:
            raise v2_error from None


def _name(key_path) -> str:
    """'params/dense/kernel' for a state-dict key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def _root_cause(err: BaseException) -> str:
    """The innermost exception of ``err``'s chain, as 'Type: first line'.

    Orbax wraps TensorStore's error (which names the array and what is wrong
    with it, e.g. 'ZSTD_decompressStream() failed: Data corruption detected')
    in a generic Exception whose text is a repr of the TensorStore spec.
    """
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return f"{type(err).__name__}: {first_line(err)}"


def load_for_inference(directory: str | Path, which: str = "latest") -> Checkpoint:
    """A checkpoint with its model and optimizer rebuilt from its own metadata.

    For evaluate and predict, and to train on: the state's optimizer is the
    run's, learning-rate schedule included (:func:`metadata`'s steps per epoch).
    """
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file, not a run directory (a train.py --output DIR)")
    if not (directory / "checkpoints").is_dir():
        # A path inside a run (RUN/checkpoints, RUN/checkpoints/3): name the run.
        run = next((p.parent for p in (directory, directory.parent) if p.name == "checkpoints"), None)
        hint = f"; did you mean {run}, the run directory?" if run and (run / "checkpoints").is_dir() else ""
        raise CheckpointError(
            f"{directory} holds no checkpoints (expected {directory / 'checkpoints'}; pass a train.py --output DIR){hint}"
        )
    tries = 3
    while True:
        listed = _listing(directory)
        try:
            with Checkpoints(directory, read_only=True) as ckpts:
                return _load_for_inference(ckpts, which)
        except CheckpointError:
            # Read while a train.py run saves and rotates (--keep), the checkpoint can be deleted
            # under the reader: "corrupt", "unreadable", or gone. If the folder changed meanwhile,
            # read the newer checkpoint; a checkpoint that fails in a folder at rest is reported.
            tries -= 1
            if not tries or _listing(directory) == listed:
                raise


def _listing(directory: Path) -> list[str]:
    """The entries of a run's checkpoints/ and best/ (epochs, and Orbax's temporary folders while it saves)."""
    names = []
    for folder in ("checkpoints", "best"):
        with contextlib.suppress(OSError):
            names += sorted(f"{folder}/{p.name}" for p in (directory / folder).iterdir())
    return names


def _load_for_inference(ckpts: Checkpoints, which: str) -> Checkpoint:
    meta = ckpts.read_meta(which)
    m = meta["metadata"]
    try:
        config, steps_per_epoch = _built_by(m)
        template = _template(config, steps_per_epoch, m["num_classes"], m["input_channels"])
    except Exception as err:
        raise CheckpointError(f"checkpoint {meta['path']} has unusable metadata: {type(err).__name__}: {err}") from err
    if m["dtype"] != config.dtype:
        raise CheckpointError(f"checkpoint {meta['path']} metadata disagrees: dtype {m['dtype']} vs config {config.dtype}")
    return ckpts.restore(template, which, meta)
