"""A run of several processes (several hosts, or several processes on one): their start,
their agreement, and their end.

JAX's own ``jax.distributed.initialize()`` connects them; this module runs it so that
Ctrl-C and its timeout are one line (JAX alone is deaf to Ctrl-C there and aborts with a
C++ stack trace), checks that the processes were started alike and share ``--output``,
and makes a failed process leave without JAX's exit handlers: after meeting the others at
JAX's shutdown barrier when they stop too, at once when one of them is gone.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path

from resnet_jax import interrupts
from resnet_jax.config import Config, ConfigError
from resnet_jax.errors import RunWideError, UserError, first_line

INIT_TIMEOUT_S = 300  # jax.distributed.initialize's own default


def settings_from_args(args: argparse.Namespace) -> dict | None:
    """jax.distributed.initialize()'s arguments from the flags; None for a one-process run.

    Launch settings, not training math: they stay out of Config (and out of --resume's checks).
    """
    explicit = {"coordinator_address": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if args.distributed and given:
        raise ConfigError("--distributed detects the cluster's settings; do not combine it with --coordinator/--num-processes/--process-id")
    if args.init_timeout is not None:
        if not (args.distributed or given):
            raise ConfigError("--init-timeout is for runs of several processes (--distributed, or --coordinator ...)")
        if args.init_timeout < 1:
            raise ConfigError(f"--init-timeout must be at least 1 second, got {args.init_timeout}")
    timeout = {"initialization_timeout": args.init_timeout or INIT_TIMEOUT_S}
    if args.distributed:
        return timeout
    if not given:
        return None
    if len(given) < 3:
        raise ConfigError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id must be in [0, --num-processes), got {args.process_id} of {args.num_processes}")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator must be HOST:PORT (process 0's address), got {args.coordinator!r}")
    return {**explicit, **timeout}


def _check_coordinator(address: str, serves: bool) -> None:
    """What JAX would not say in one line about --coordinator, said before it starts.

    A host that does not resolve: JAX waits 5 minutes, then aborts in C++. A port already
    in use on process 0, which serves it: JAX's service crashes the process (exit 139).
    """
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except OSError as err:
        raise UserError(f"--coordinator {address}: cannot resolve {host} ({err.strerror or err})") from err
    if not serves or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return
    # Bind as JAX's service will ("[::]:PORT", all addresses; SO_REUSEADDR as gRPC sets it), and let go.
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        any_address = "::"
    except OSError:  # no IPv6 on this host
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        any_address = "0.0.0.0"
    with probe:
        # On Windows SO_REUSEADDR binds a port another program listens on, and the check would
        # pass every time: there an exclusive bind is what finds it in use.
        exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR if exclusive is None else exclusive, 1)
        try:
            probe.bind((any_address, int(port)))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:  # another program, or this run's process 0 started twice
                raise UserError(f"--coordinator {address}: process 0 serves port {port} on this host, but it is in use; "
                                "if no other process of this run was given --process-id 0, choose another port "
                                "for every process") from err
            raise UserError(f"--coordinator {address}: process 0 serves port {port} on this host, but "
                            f"{err.strerror or err}; choose another port for every process") from err


# What one host may set its own way: where it finds the data. Every other setting is the run's.
PER_HOST_FIELDS = ("data_dir", "manual_dir")


def check_same_settings(config: Config, launch: dict | None = None) -> None:
    """A UserError, in every process, naming each setting the processes of one run disagree on.

    Each process builds its own replicas: with another --seed, say, their "replicated"
    weights would differ, and the run would train to a wrong result and exit 0. A digest
    of each setting goes to every process (one all-gather of a few int32s).
    ``launch``: :func:`settings_from_args`'s dict. Its --num-processes is compared too: the
    coordinator's count wins, so a process given another one ran on, saying nothing.
    """
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    # Every process sees every device: counted without a collective (JAX's all-gathers, the one
    # below included, assume the same count everywhere, and failed in a reshape traceback).
    per_process = collections.Counter(d.process_index for d in jax.devices())
    if len(set(per_process.values())) > 1:
        raise RunWideError(
            "the processes of this run have different numbers of devices ("
            + ", ".join(f"process {i}: {per_process[i]}" for i in sorted(per_process))
            + "); give every process as many (CUDA_VISIBLE_DEVICES, or the hosts' GPU counts)")
    values = config.to_dict()
    if launch and launch.get("num_processes") is not None:  # --distributed reads it from the cluster
        values["num_processes"] = launch["num_processes"]
    names = [name for name in values if name not in PER_HOST_FIELDS]
    digest = lambda v: int.from_bytes(hashlib.blake2b(json.dumps(v, sort_keys=True).encode(), digest_size=4).digest(), "little") >> 1
    mine = np.array([digest(values[name]) for name in names], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, settings)
    differ = [name for i, name in enumerate(names) if (every[:, i] != every[0, i]).any()]
    if differ:
        raise RunWideError(
            "the processes of this run were started with different settings: "
            + ", ".join(f"--{name.replace('_', '-')} (here {values[name]!r})" for name in differ)
            + "; start every process with the same flags (only --data-dir and --manual-dir may differ)"
        )


# What XLA's errors say when a collective finds another process of the run gone (killed,
# preempted, its host down, or stopped at its own error).
_LOST_PROCESS = ("Gloo", "by peer", "heartbeat")


def _says_lost(err: BaseException) -> bool:
    return any(s in str(err) for s in _LOST_PROCESS)


def lost_process(err: BaseException) -> bool:
    """Whether ``err`` (an XLA RuntimeError) says that another process of this run is gone."""
    import jax

    return jax.process_count() > 1 and _says_lost(err)


@contextlib.contextmanager
def lost_process_is_one_line():
    """Another process gone, found by a collective: a UserError, not XLA's traceback (after which
    JAX's exit handler waited ~100 s for the lost process and aborted in C++, exit 134)."""
    try:
        yield
    except RuntimeError as err:
        if not lost_process(err):
            raise
        raise UserError(f"another process of this run stopped ({first_line(err, 160)}); start every process again") from err


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process of the run (one all-gather); ``flag`` itself for one process.

    For a decision one process makes (process 0 takes --output's lock) that all must act on:
    a process that leaves alone makes the others crash in JAX's C++ at their next collective.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


SHARED_OUTPUT_WAIT_S = 10.0  # how long a process looks for process 0's file (a network file system may lag)


def check_shared_output(config: Config) -> None:
    """A UserError, in every process, when --output is not one folder that all the processes share.

    Every process writes its part of each checkpoint into --output, and Orbax finishes a save
    only once all the parts are there: with each host's own disk, the first save waited forever.
    Process 0 writes a file there under a name drawn at random (so no file left by an earlier
    check, and no name a network file system remembers as missing, can answer for it); every
    process then looks for it, for up to SHARED_OUTPUT_WAIT_S seconds.
    """
    import secrets

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1 or not config.output:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))  # process 0's draw
    marker = Path(config.output) / f".resnet_jax-shared-{token:08x}"
    if jax.process_index() == 0:
        marker.touch()
    multihost_utils.sync_global_devices("resnet_jax: --output check written")
    deadline = time.monotonic() + SHARED_OUTPUT_WAIT_S
    while not (seen := marker.exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    every = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    if not every.all():
        blind = [str(i) for i in np.flatnonzero(every == 0)]
        raise RunWideError(
            f"--output {config.output} is not one folder shared by all the processes: "
            f"process{'es' if len(blind) > 1 else ''} {', '.join(blind)} did not see a file that process 0 wrote "
            "there; every process writes its part of each checkpoint into --output, so give a folder all the "
            "hosts share (NFS, a bucket mount)"
        )


def start(distributed: dict | None) -> bool:
    """jax.distributed.initialize() when asked; whether this is process 0 (the one that speaks and writes)."""
    import jax

    if distributed is not None:
        if distributed.get("coordinator_address"):
            _check_coordinator(distributed["coordinator_address"], serves=distributed["process_id"] == 0)
        _initialize(distributed)
    return jax.process_index() == 0


# How long the processes of a run wait for each other where their paths may differ in length:
# after loading the data (a host may have to prepare it, or download it) and after compiling
# (a host's compile cache may be cold). Without such a wait, the first collective after it
# met XLA:CPU's 30 s deadline for setting up Gloo on the late process and the run died.
READY_TIMEOUT_S = 600
# Barrier ids, counted per group of processes: every process of a group calls wait_for_all for
# it in the same order (the CLI's, after the data; fit's, once per call on the group's devices).
_barriers: dict[tuple[int, ...], itertools.count] = collections.defaultdict(itertools.count)


def wait_for_all(what: str, timeout_s: float | None = None, process_ids=None) -> None:
    """Wait until every process of the run (or each of ``process_ids``) has got to ``what``;
    at once for one process. ``timeout_s``: READY_TIMEOUT_S, as it is at the call.

    A barrier of JAX's coordination service (the one jax.distributed.initialize connects to),
    not a collective over the devices: a collective waits for a late process only as long as
    its backend's own setup deadline (30 s for XLA:CPU's Gloo), and this waits ``timeout_s``.
    JAX has no public function for it; Orbax's multihost.sync_global_processes uses the same
    client. Ctrl-C is heard while waiting (the wait runs in a thread, as in _initialize).
    A process found gone raises the coordination service's error (see :func:`lost_process`);
    the wait running out, a UserError.
    """
    import jax

    group = tuple(sorted(set(range(jax.process_count()) if process_ids is None else process_ids)))
    if len(group) <= 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # processes JAX did not connect through jax.distributed: nothing to wait on
        return
    timeout_s = READY_TIMEOUT_S if timeout_s is None else timeout_s
    barrier = f"resnet_jax/{','.join(map(str, group))}/{next(_barriers[group])}: {what}"
    everyone = len(group) == jax.process_count()
    failed: list[BaseException] = []

    def wait():
        try:
            if everyone:
                client.wait_at_barrier(barrier, int(timeout_s * 1000))
            else:
                client.wait_at_barrier(barrier, int(timeout_s * 1000), process_ids=list(group))
        except BaseException as err:  # handed to the main thread
            failed.append(err)

    thread = threading.Thread(target=wait, name=f"wait_for_all({what})", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)  # interruptible: a Ctrl-C lands here
    if failed:
        err = failed[0]
        if _says_lost(err) or "DEADLINE_EXCEEDED" not in str(err):
            raise err
        raise UserError(
            f"the {len(group)} processes of this run did not all get to {what} within {timeout_s:.0f} s "
            f"(this is process {jax.process_index()}): is one of them stopped or stuck?"
        ) from err


class ProcessesDidNotMeet(UserError):
    """jax.distributed.initialize() is still waiting at --init-timeout.

    Its thread is stuck in JAX's C++ and JAX's exit handlers would wait on it: the
    process must leave at once (:func:`resnet_jax.console.report_errors`).
    """


def _initialize(settings: dict) -> None:
    """jax.distributed.initialize(), with Ctrl-C heard and its timeout one line.

    JAX waits for the other processes inside C++: deaf to Ctrl-C, and at its timeout it
    aborts the process with a C++ stack trace (exit 134). So it runs in a thread, and
    this one waits for it in short slices (a Ctrl-C is the usual KeyboardInterrupt) and
    gives up at the timeout. JAX's own deadline is set a minute later: it never fires first.
    """
    import jax

    settings = dict(settings)
    timeout_s = settings.pop("initialization_timeout", INIT_TIMEOUT_S)
    failed: list[BaseException] = []
    # JAX's preemption service (on by default) puts a C++ SIGTERM handler in place of train.py's:
    # a SIGTERM (a scheduler's preemption) was then only logged, and the run trained on to its end
    # and exited 0. train.py's handler keeps the last epoch and stops, as on one process.
    with contextlib.suppress(AttributeError):  # (should a later JAX drop the option)
        jax.config.update("jax_enable_preemption_service", False)

    def connect():
        try:
            jax.distributed.initialize(**settings, initialization_timeout=timeout_s + 60)
        except BaseException as err:  # handed to the main thread
            failed.append(err)

    thread = threading.Thread(target=connect, name="jax.distributed.initialize", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        thread.join(0.1)  # interruptible: a Ctrl-C lands here
        if thread.is_alive() and time.monotonic() > deadline:
            where = settings.get("coordinator_address")
            n = settings.get("num_processes")
            raise ProcessesDidNotMeet(
                f"the {n} processes did not all meet at {where} within {timeout_s} s (--init-timeout): "
                "is every process running (one that refused its flags or paths stopped with its own message), "
                "and were all started with the same --coordinator and --num-processes?"
                if where else
                f"the cluster's processes did not all meet within {timeout_s} s (--init-timeout): was every process started?"
            )
    if failed:
        err = failed[0]
        if isinstance(err, (RuntimeError, ValueError)):
            hint = ""
            if not settings.get("coordinator_address") and "coordinator_address" in str(err):
                # --distributed outside a cluster JAX knows (SLURM, Open MPI, TPU pods...)
                hint = ("; --distributed found no cluster to read the settings from (SLURM, Open MPI, "
                        "a TPU pod...): give --coordinator, --num-processes and --process-id")
            raise UserError(f"jax.distributed.initialize failed: {str(err).rstrip('.') if hint else err}{hint}") from err
        raise err


# How long a process that stops waits at JAX's shutdown barrier for the others. A RunWideError
# brings every process there: the wait ends when the last one comes (well within a second, unless
# one is late on a loaded machine). Any other stop (a signal, an error in one process) may be the
# stop of every process, or of this one alone, whose leaving the others, waiting in a collective
# for it, then learn of ("by peer"): a short wait, which is all the delay it adds.
RUN_WIDE_WAIT_S = 30.0
OTHER_WAIT_S = 2.0


def leave(code: int, err: BaseException | None = None) -> int:
    """``code``; in a run of several processes, meet the others at JAX's shutdown barrier if they come, and leave.

    Process 0 serves JAX's coordination service. When it left at once, a process still on
    its way out of the same error lost the service under it, and JAX aborted it with a C++
    stack trace (exit 134): seen in CI under load, and every time when that process was half
    a second late. So a process first waits for the others at jax.distributed.shutdown()'s
    barrier: up to RUN_WIDE_WAIT_S for a RunWideError, OTHER_WAIT_S otherwise, and not at
    all when ``err`` says that a process is gone (the barrier would wait for it until JAX's
    heartbeat timeout, ~100 s, and abort). A signal during the wait ends it (one line, 130 or
    143). Leaving skips JAX's exit handlers, which would wait as long; the run's files are
    written and flushed by then.
    """
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    if not _chain_says_lost(err):
        interrupts.exiting()
        meeting = threading.Thread(target=jax.distributed.shutdown, name="jax.distributed.shutdown", daemon=True)
        meeting.start()
        meeting.join(RUN_WIDE_WAIT_S if isinstance(err, RunWideError) else OTHER_WAIT_S)
    os._exit(code)


def _chain_says_lost(err: BaseException | None) -> bool:
    """Whether the libraries' error that ``err`` was raised from (XLA's, Orbax's) says that another process is gone.

    Our own messages, and OSError's, are not read: they quote the user's paths, which may hold any word.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        ours = type(err).__module__.split(".")[0] == "resnet_jax" or isinstance(err, (UserError, OSError))
        if not ours and _says_lost(err):
            return True
        err = err.__cause__ or err.__context__
    return False
