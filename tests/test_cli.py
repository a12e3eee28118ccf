"""``python train.py`` end to end, as a user runs it, and every refusal of a bad flag."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tree_digest
from resnet_jax import cli, xla_cache

REPO = Path(__file__).resolve().parents[1]


def train_py(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


def test_help_lists_the_flags():
    r = train_py("--help")
    assert r.returncode == 0
    for flag in ("--epochs", "--batch-size", "--lr", "--resize", "--seed", "--data-dir", "--manual-dir",
                 "--train-limit", "--test-limit", "--output", "--json", "--offline", "--dtype"):
        assert flag in r.stdout, flag


def test_a_short_run_reports_and_writes_metrics(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    r = train_py("--data-dir", prepared_data_dir, "--offline", "--train-limit", 300, "--test-limit", 200,
                 "--epochs", 1, "--resize", 28, "--batch-size", 64, "--output", out, "--json")
    assert r.returncode == 0, r.stderr
    # Human report on stderr in --json mode, like train_ch6's lines.
    assert "epoch 1/1: loss" in r.stderr and "examples/sec on cpu:0" in r.stderr
    assert "loss " in r.stderr and "train acc" in r.stderr and "test acc" in r.stderr
    final = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "examples_per_sec", "device", "wall_time_s"):
        assert key in final, key
    assert final["device"].startswith("cpu") and 0 <= final["test_acc"] <= 1 and final["examples_per_sec"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["step"] == 5  # 300 = 4 x 64 + 44
    # The JSON line carries every epoch's record too, as metrics.jsonl has it.
    assert [{"kind": "epoch", **r} for r in final["history"]] == records
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_acc"] == final["test_acc"] and saved["config"]["train_limit"] == 300


def test_a_disk_full_while_logging_leaves_metrics_jsonl_whole(tmp_path):
    # A real full tmpfs left metrics.jsonl at 4096 bytes, ending in '{"kind": "s': the part of a
    # record that fitted.
    import errno

    from resnet_jax.config import Config

    old = [{"kind": "epoch", "epoch": 1, "train_loss": 2.0}]
    config = Config(output=str(tmp_path))
    reporter = cli._Reporter(config, print, True, list(old))
    reporter.record({"kind": "step", "step": 4, "loss": 1.5})
    whole = (tmp_path / "metrics.jsonl").read_text()

    class FillsUp:  # the disk fills in the middle of a record
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    reporter.metrics_file = FillsUp(reporter.metrics_file)
    with pytest.raises(cli.MetricsNotWritten, match=r"metrics.jsonl: No space left on device$"):
        reporter.record({"kind": "step", "step": 5, "loss": 1.25})
    assert (tmp_path / "metrics.jsonl").read_text() == whole
    assert [json.loads(line)["step"] for line in whole.splitlines()[1:]] == [4]


def test_a_metrics_jsonl_without_a_position_is_still_written(tmp_path):
    # A metrics.jsonl linked to /dev/stderr (a pipe) has no position to cut back to on a write
    # error: asking for it stopped the run at its start ("underlying stream is not seekable").
    from resnet_jax.config import Config

    read, write = os.pipe()
    try:
        (tmp_path / "metrics.jsonl").symlink_to(f"/proc/self/fd/{write}")
        reporter = cli._Reporter(Config(output=str(tmp_path)), print, True, [])
        reporter.record({"kind": "step", "step": 1, "loss": 2.0})
        reporter.close()
        assert json.loads(os.read(read, 1 << 16).decode()) == {"kind": "step", "step": 1, "loss": 2.0}
    finally:
        os.close(read)
        os.close(write)


def test_metrics_jsonl_is_opened_once_so_a_named_pipe_keeps_its_reader(tmp_path, monkeypatch):
    # metrics.jsonl made with mkfifo, for a live plotter: it was opened to write the resumed run's
    # records, closed (its reader saw end of file and could go) and opened again, which then
    # waits for a reader for ever.
    import builtins
    import threading

    from resnet_jax.config import Config

    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file).name if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    reporter = cli._Reporter(Config(output=str(tmp_path)), print, True, [{"kind": "epoch", "epoch": 1}])
    reporter.record({"kind": "epoch", "epoch": 2})
    reporter.close()
    reader.join(timeout=30)
    assert opened.count("metrics.jsonl") == 1
    assert [json.loads(line)["epoch"] for line in got[0].splitlines()] == [1, 2]


def test_fit_from_initial_state_computes_what_train_py_computes(prepared_data_dir, capsys):
    # README's Python example: initial_state(config), then fit. It drew its weights from another
    # key than train.py did, so a learner's numbers disagreed with the command's.
    from resnet_jax import data, training
    from resnet_jax.config import Config

    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", 96, "--test-limit", 48, "--epochs", 1,
             "--resize", 17, "--batch-size", 32, "--seed", 3, "--json"]
    assert cli.main(list(map(str, flags))) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = Config(epochs=1, resize=17, batch_size=32, train_limit=96, test_limit=48, seed=3)
    train, test = data.load("fashion_mnist", data_dir=str(prepared_data_dir), offline=True)
    result = training.fit(config, train.take(96), test.take(48), training.initial_state(config))
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert result.final[key] == final[key], key


def test_more_than_one_step_per_dispatch_on_cpu_is_run_with_a_note(prepared_data_dir, capsys):
    # On CPU a step in a device loop is many times slower (BENCHMARKS.md): a user who copied a
    # GPU command line is told why the run crawls.
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", 64, "--test-limit", 32, "--epochs", 1,
             "--resize", 17, "--batch-size", 32, "--steps-per-dispatch", 2147483647]
    assert cli.main(list(map(str, flags))) == 0
    out = capsys.readouterr().out
    assert "note: --steps-per-dispatch 2 on CPU, where XLA runs a step inside a loop many times slower" in out, out
    assert cli.main(list(map(str, flags[:-2]))) == 0  # the default there: no note
    assert "steps-per-dispatch" not in capsys.readouterr().out


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--epochs", "-1"], "--epochs must be a non-negative integer"),
    (["--resize", "16"], "--resize must be an integer in [17, 512]"),
    (["--resize", "100000"], "--resize must be an integer in [17, 512]"),
    (["--lr", "1e300"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--train-limit", "60001"], "--train-limit 60001 is larger than the fashion_mnist split"),
    (["--test-limit", "10001"], "--test-limit 10001 is larger than the fashion_mnist split"),
    (["--train-limit", "0"], "--train-limit must be a positive integer"),
    (["--seed", "-3"], "--seed must be an integer"),
    (["--batch-size", "abc"], "invalid int value"),
    (["--dtype", "float16"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--coordinator", "127.0.0.1:1234"], "--coordinator, --num-processes and --process-id go together"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, --num-processes)"),
    (["--distributed", "--process-id", "0"], "--distributed detects the cluster's settings"),
    (["--coordinator", "h", "--num-processes", "2", "--process-id", "1"], "--coordinator must be HOST:PORT"),
    (["--init-timeout", "10"], "--init-timeout is for runs of several processes"),
    (["--distributed", "--init-timeout", "0"], "--init-timeout must be at least 1 second"),
    (["--batch-size", str(10**30)], "--batch-size must be a positive integer (at most 2**31 - 1)"),
    (["--recipe", "best", "--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs 3 is longer than the run (--epochs 2)"),
    (["--recipe", "best", "--weight-decay", "1e39"], "--weight-decay must be a finite number >= 0"),  # inf in float32
    (["--recipe", "best", "--train-limit", "256", "--batch-size", "32", "--warmup-epochs", "0.05"],
     "--warmup-epochs 0.05 is 0.4 of a step at 8 steps per epoch, which rounds to no warmup: give 0 for none, "
     "or at least 0.125 (one step)"),
    (["--manual-dir", ""], "--manual-dir is empty"),
    (["--init-from-torch", ""], "--init-from-torch is empty"),
    (["--export-torch", " "], "--export-torch is empty"),
    (["--compile-cache", ""], "--compile-cache needs a folder, or 'off'"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_any_work(args, message, tmp_path):
    out = tmp_path / "out"
    r = train_py(*args, "--output", out, "--data-dir", tmp_path / "tfds", "--offline")
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and not (tmp_path / "tfds").exists()


def test_a_coordinator_that_does_not_resolve_is_named_at_once(tmp_path):
    # JAX alone would wait its 5-minute timeout, deaf to Ctrl-C, then abort with a C++ stack.
    r = train_py("--coordinator", "no-such-host.invalid:1234", "--num-processes", "2", "--process-id", "1",
                 "--data-dir", tmp_path / "tfds", "--offline", timeout=120)
    assert r.returncode == 1 and "--coordinator no-such-host.invalid:1234: cannot resolve no-such-host.invalid" in r.stderr
    assert "Traceback" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("process_id", [0, 1])
def test_processes_that_do_not_meet_are_one_line_at_the_timeout(tmp_path, process_id):
    # Process 1 with no process 0 to connect to; process 0 with no process 1 coming. JAX
    # alone waits in C++ (deaf to Ctrl-C), then aborts with a C++ stack trace: exit 134.
    start, address = time.monotonic(), f"127.0.0.1:{_free_port()}"
    r = train_py("--coordinator", address, "--num-processes", "2", "--process-id", process_id,
                 "--init-timeout", "2", "--data-dir", tmp_path / "tfds", "--offline", timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"train.py: error: the 2 processes did not all meet at {address} within 2 s "
        "(--init-timeout): is every process running (one that refused its flags or paths stopped with its own "
        "message), and were all started with the same --coordinator and --num-processes?"]
    assert time.monotonic() - start < 60 and not (tmp_path / "tfds").exists()


def test_two_processes_train_as_one_through_train_py(prepared_data_dir, tmp_path):
    # The CLI's way in (jax.distributed.initialize in a thread, resnet_jax/cli.py): two processes
    # with two CPU devices each take one step on one 64-image batch, as one process with four does,
    # and --json's stdout stays one line although Gloo announces its connections on fd 1.
    # Only the step's loss is compared: after one float32 update, the test loss moves by 5e-4 when
    # the summation order changes, as much as when the initial weights move by 1e-7 (measured);
    # tests/test_sharding.py checks the maths in float64.
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "64", "--test-limit", "64",
             "--epochs", "1", "--resize", "28", "--batch-size", "64", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, flags), "--coordinator", address,
                               "--num-processes", "2", "--process-id", str(i), "--init-timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for i in (0, 1)]
    (out0, err0), (out1, _) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], err0
    assert out1 == ""  # only process 0 speaks
    both = json.loads(out0)
    assert both["device"] == "cpu:0 x4"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    one = json.loads(subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, flags)], capture_output=True,
                                    text=True, env=env, cwd=tmp_path, timeout=300, check=True).stdout)
    assert both["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)


def _patching_site(tmp_path: Path, module: str, patch: str) -> str:
    """A folder for PYTHONPATH whose sitecustomize.py runs ``patch`` (Python source defining
    ``patch(module)``) on ``module`` as it is imported: after train.py's start-up, which restarts
    the interpreter. The folder, for the one process that should load it."""
    site = tmp_path / f"site-{module}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(patch + f"""

import importlib.abc, importlib.util, sys

class Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != {module!r}:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Patch())
""")
    return str(site)


# Loaded by process 1 alone: an error its check of the run's settings finds reaches train.py half
# a second late, as on a loaded machine. Process 0, which serves JAX's coordination service, used
# to leave first, and JAX aborted process 1 with a C++ stack trace (exit 134) as the service went
# (CI, 2026-12-06; with this delay, every time).
_LATE_CHECK = """
import time

def patch(module):
    check = module.check_same_settings

    def late(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except Exception:
            time.sleep(0.5)
            raise

    module.check_same_settings = late
"""


def _late_site(tmp_path: Path) -> str:
    return _patching_site(tmp_path, "resnet_jax.processes", _LATE_CHECK)


def test_processes_with_different_numbers_of_devices_are_refused_in_one_line(prepared_data_dir, tmp_path):
    # Two devices in process 0, one in process 1 (another CUDA_VISIBLE_DEVICES on one host):
    # JAX's all-gather of the settings failed in a reshape, a 40-line traceback in both.
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "48", "--test-limit", "48",
             "--epochs", "1", "--resize", "17", "--batch-size", "48", "--compile-cache", "off"]
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, flags), "--coordinator", address,
                               "--num-processes", "2", "--process-id", str(i), "--init-timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *[_late_site(tmp_path)] * i]),
                                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 - i}"})
             for i in (0, 1)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1], errs
    for err in errs:
        assert err.strip().splitlines() == [
            "train.py: error: the processes of this run have different numbers of devices (process 0: 2, process 1: 1); "
            "give every process as many (CUDA_VISIBLE_DEVICES, or the hosts' GPU counts)"], err


def test_a_process_lost_at_start_up_is_one_line(monkeypatch):
    # A process killed while the others ran the start-up checks: XLA's traceback, then ~100 s in
    # JAX's exit handler and a C++ abort (exit 134). Now one line, as when it is lost mid-training.
    import jax

    from resnet_jax import processes
    from resnet_jax.errors import UserError

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    lost = RuntimeError("UNKNOWN: Gloo all-reduce failed: Connection reset by peer\nmore")
    with pytest.raises(UserError) as err:
        with processes.lost_process_is_one_line():
            raise lost
    assert str(err.value) == ("another process of this run stopped (UNKNOWN: Gloo all-reduce failed: Connection "
                              "reset by peer); start every process again") and err.value.__cause__ is lost
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # anything else goes on as it was
        with processes.lost_process_is_one_line():
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    monkeypatch.setattr(jax, "process_count", lambda: 1)  # one process: no other to lose
    with pytest.raises(RuntimeError, match="Gloo"):
        with processes.lost_process_is_one_line():
            raise lost


def test_a_failed_process_meets_the_others_at_shutdown_unless_one_is_lost(monkeypatch):
    # Process 0 left at once, and a process still on its way out of the same error lost JAX's
    # coordination service: a C++ abort (the two tests above, with a late process). It now waits
    # at the shutdown barrier: long for an error every process meets, briefly for any other
    # stop (which may be this process's alone), not at all when a process is gone (the barrier
    # would wait ~100 s for it).
    import jax

    from resnet_jax import interrupts, processes
    from resnet_jax.errors import RunWideError, UserError

    exits = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "shutdown", lambda: time.sleep(30))  # the others never come
    monkeypatch.setattr(interrupts, "exiting", lambda: None)  # (it sets this process's signal handlers)
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(processes, "RUN_WIDE_WAIT_S", 1.0)
    monkeypatch.setattr(processes, "OTHER_WAIT_S", 0.0)

    def waited(err) -> float:
        start = time.monotonic()
        processes.leave(1, err)
        assert exits.pop() == 1
        return time.monotonic() - start

    def from_xla(message: str, what: str) -> UserError:  # as training raises it: the one line, from XLA's error
        try:
            try:
                raise RuntimeError(message)
            except RuntimeError as xla:
                raise UserError(what) from xla
        except UserError as err:
            return err

    assert waited(RunWideError("the processes of this run were started with different settings: --seed")) >= 1.0
    assert waited(UserError("could not write /runs/heartbeat by peer Gloo/results.json")) < 1.0  # words in a path
    assert waited(from_xla("UNKNOWN: Gloo all-reduce failed: Connection reset by peer",
                           "another process of this run stopped; start every process again")) < 1.0
    assert processes._chain_says_lost(from_xla("UNKNOWN: Gloo all-reduce failed: Connection reset by peer", "lost"))
    assert not processes._chain_says_lost(from_xla("INTERNAL: out of memory", "could not write /runs/heartbeat"))
    assert not processes._chain_says_lost(OSError(28, "No space left on device", "/runs/heartbeat/metrics.jsonl"))


def test_sigterm_still_reaches_train_pys_handler_after_jax_distributed_starts():
    # JAX's preemption service replaced the SIGTERM handler: a preempted multi-process run only
    # logged "SIGTERM caught", trained on to its end and exited 0.
    script = (
        "import signal, sys\nfrom resnet_jax import interrupts, processes\ninterrupts.install()\n"
        f"processes._initialize({{'coordinator_address': '127.0.0.1:{_free_port()}', 'num_processes': 1, 'process_id': 0}})\n"
        "try:\n    signal.raise_signal(signal.SIGTERM)\nexcept KeyboardInterrupt:\n"
        "    print('handled', interrupts.exit_code())\n    sys.stdout.flush()\n    import os\n    os._exit(0)\n"
        "print('not handled')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout == "handled 143\n", (r.stdout, r.stderr[-2000:])


def test_a_coordinator_port_in_use_is_named_at_once(tmp_path):
    # Process 0 serves the port; JAX's service crashed the process (exit 139) when it was taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        r = train_py("--coordinator", address, "--num-processes", "2", "--process-id", "0",
                     "--data-dir", tmp_path / "tfds", "--offline", timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"train.py: error: --coordinator {address}: process 0 serves port {address.split(':')[1]} on this host, "
        "but it is in use; if no other process of this run was given --process-id 0, choose another port for every process"]


def test_ctrl_c_while_the_processes_wait_for_each_other_is_heard(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
         "--process-id", "1", "--data-dir", str(tmp_path / "tfds"), "--offline"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    time.sleep(5)  # well into the wait (the default timeout is 300 s)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip().splitlines() == ["train.py: interrupted"], err


def test_an_empty_output_is_refused_not_taken_for_no_output(tmp_path):
    # "--output $RUN" with RUN unset: a run that trains for hours and saves nothing.
    r = train_py("--output", "", "--data-dir", tmp_path / "tfds", "--offline")
    assert r.returncode == 2 and "--output is empty; give a path, or leave the flag out" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "tfds").exists()


def test_path_flags_expand_the_home_folder_once_for_every_use():
    # The shell does not expand "~" after "=": the flag's value must mean the same path
    # where it is checked and where it is used.
    home = os.path.expanduser("~")
    args = cli.build_parser().parse_args(
        ["--output=~/r", "--data-dir=~/d", "--manual-dir=~/m", "--init-from-torch=~/i.pt", "--export-torch=~/e.pt"])
    c = cli.config_from_args(args)
    assert (c.output, c.data_dir, c.manual_dir, c.init_from_torch, c.export_torch) == tuple(
        os.path.join(home, p) for p in ("r", "d", "m", "i.pt", "e.pt"))


def test_path_flags_are_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cli.config_from_args(cli.build_parser().parse_args(["--output", "runs/r18", "--data-dir", "../d"]))
    assert (c.output, c.data_dir) == (str(tmp_path / "runs" / "r18"), str(tmp_path.parent / "d"))


def test_relative_paths_work_for_training_resume_evaluate_and_predict(prepared_data_dir, tmp_path):
    # README's own form, --output runs/r18: Orbax takes absolute paths only (a relative one failed
    # the first save, after the epoch's work), and the run records its data folder for evaluate,
    # which may run from another folder.
    (tmp_path / "elsewhere").mkdir()
    data = os.path.relpath(prepared_data_dir, tmp_path)
    flags = ["--data-dir", data, "--offline", "--train-limit", "64", "--test-limit", "64", "--resize", "28",
             "--batch-size", "32", "--output", "runs/r18"]
    r = train_py(*flags, "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = train_py(*flags, "--epochs", "2", "--resume", cwd=tmp_path)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr
    assert sorted(p.name for p in (tmp_path / "runs/r18/checkpoints").iterdir()) == ["1", "2"]
    r = train_py("evaluate", "../runs/r18", "--json", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["examples"] == 64
    np.save(tmp_path / "elsewhere" / "two.npy", np.zeros((2, 28, 28, 1), np.uint8))
    r = train_py("predict", "../runs/r18", "two.npy", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0 and r.stdout.count("two.npy[") == 2, r.stderr


def test_no_data_offline_exits_1_with_instructions(tmp_path):
    r = train_py("--data-dir", tmp_path / "tfds", "--offline", "--epochs", "1")
    assert r.returncode == 1
    assert "--manual-dir" in r.stderr and "train-images-idx3-ubyte.gz" in r.stderr
    assert "(--offline)" in r.stderr and "manual_dir" not in r.stderr  # the flags' names, not load's arguments
    assert "Traceback" not in r.stderr


def test_a_path_the_consoles_encoding_cannot_write_is_escaped_not_a_traceback(tmp_path):
    # Python on Windows writes a redirected stdout in cp1252: a folder named in Japanese ended a
    # finished run in a UnicodeEncodeError at its last line ("checkpoints in ..."). ASCII here.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "ascii"}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--output", str(tmp_path / "ラン"), "--resume",
                        "--data-dir", str(tmp_path / "tfds"), "--offline"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "\\u30e9\\u30f3 holds no checkpoint yet" in r.stdout  # the line, then the data's own error
    assert "--manual-dir" in r.stderr


def test_unwritable_output_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    r = train_py("--output", blocker / "sub", "--data-dir", tmp_path / "tfds", "--offline")
    assert r.returncode == 1 and "--output" in r.stderr and "not a writable directory" in r.stderr
    assert "Traceback" not in r.stderr and blocker.read_text() == "keep me"


def test_an_output_path_that_is_not_utf8_is_refused_before_training(tmp_path):
    # Orbax takes paths to C++ as UTF-8: the first save failed ("Unable to cast Python instance"),
    # after an epoch's work, leaving a temporary checkpoint folder behind.
    output = os.fsencode(tmp_path) + b"/bad\xfcname"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--output", output, "--data-dir", str(tmp_path / "tfds"),
                        "--offline"], capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "the path is not valid UTF-8, which Orbax's checkpoints need" in err
    assert not os.path.exists(output) and not (tmp_path / "tfds").exists()


def test_missing_manual_dir_is_refused(tmp_path):
    r = train_py("--manual-dir", tmp_path / "nowhere", "--data-dir", tmp_path / "tfds")
    assert r.returncode == 1 and "--manual-dir" in r.stderr and "not a directory" in r.stderr


def test_a_data_dir_that_is_a_file_is_refused_before_tfds_runs(tmp_path):
    (tmp_path / "file").write_text("")
    r = train_py("--data-dir", tmp_path / "file", "--offline")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"train.py: error: --data-dir {tmp_path / 'file'} is not a directory"]


def test_the_compile_cache_folder_follows_the_flag_then_jax_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    assert xla_cache.setting("off", {}) == (None, "--compile-cache")
    assert xla_cache.setting("cc", {"JAX_COMPILATION_CACHE_DIR": "/j"}) == (Path.cwd().resolve() / "cc", "--compile-cache")
    assert xla_cache.setting(None, {"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) == (Path("/j"), "$JAX_COMPILATION_CACHE_DIR")
    assert xla_cache.setting(None, {"XDG_CACHE_HOME": "/x"}) == (Path("/x/resnet_jax/xla"), "")
    assert xla_cache.setting(None, {}) == (tmp_path.resolve() / "home/.cache/resnet_jax/xla", "")
    # One folder, one name: JAX 0.10 keys its entries with the folder's path as given, so a link
    # to the folder, or a path through "..", missed every entry and stored each again.
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert xla_cache.setting(str(tmp_path / "link"), {})[0] == real.resolve()
    assert xla_cache.setting(None, {"JAX_COMPILATION_CACHE_DIR": f"{tmp_path}/link/../real"})[0] == real.resolve()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # not resolvable: left for the writability check to name
    assert xla_cache.setting(str(tmp_path / "loop" / "xla"), {}) == (tmp_path / "loop" / "xla", "--compile-cache")


@pytest.mark.parametrize("name, value, says, code", [
    ("JAX_COMPILATION_CACHE_MAX_SIZE", "", 'Invalid value "" for JAX flag jax_compilation_cache_max_size '
     "(from the environment)", 2),  # `export VAR=` to unset it
    ("JAX_ENABLE_X64", "maybe", "invalid truth value 'maybe' for environment 'JAX_ENABLE_X64' (from the environment)", 2),
    ("JAX_PLATFORMS", "bogus", "Unable to initialize backend 'bogus'", 1),
    ("JAX_PLATFORMS", "cuda", "JAX could start no backend of JAX_PLATFORMS='cuda' on this machine", 1),
])
def test_a_jax_variable_that_jax_refuses_is_one_line(tmp_path, name, value, says, code):
    if value == "cuda" and shutil.which("nvidia-smi"):
        pytest.skip("this machine may have the GPU that JAX_PLATFORMS=cuda asks for")
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--output", str(tmp_path / "out"),
                        "--data-dir", str(tmp_path / "tfds"), "--offline"],
                       env={**os.environ, "PYTHONPATH": str(REPO), name: value},
                       capture_output=True, text=True, timeout=300)
    [line] = r.stderr.strip().splitlines()  # no traceback
    assert (r.returncode, r.stdout) == (code, "") and line.startswith("train.py: error: ") and says in line, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "tfds").exists()


def test_a_named_compile_cache_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    r = train_py("--compile-cache", blocker / "xla", "--output", tmp_path / "out", "--data-dir", tmp_path / "tfds",
                 "--offline")
    assert r.returncode == 1 and r.stdout == "" and blocker.read_text() == "keep me"
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("train.py: error: --compile-cache ") and "not a writable directory" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "tfds").exists()
    # The message names where the folder came from: here the variable, not the flag.
    env = xla_cache.setting(None, {"JAX_COMPILATION_CACHE_DIR": str(blocker)})
    with pytest.raises(cli.UserError, match=r"^\$JAX_COMPILATION_CACHE_DIR .*a_file"):
        xla_cache.use(env, print)


def test_a_compile_cache_size_limit_of_0_is_no_cache(tmp_path):
    import jax

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size,
              jax.config.jax_enable_compilation_cache)
    try:
        jax.config.update("jax_compilation_cache_max_size", 0)  # JAX: "Caching will be disabled"
        assert xla_cache.use((tmp_path / "xla", "--compile-cache"), print) is None
        assert not jax.config.jax_enable_compilation_cache and not (tmp_path / "xla").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])
        jax.config.update("jax_enable_compilation_cache", before[2])


def test_the_compile_cache_is_reused_and_changes_no_result(prepared_data_dir, tmp_path):
    # The second run loads the programs the first one compiled (JAX keeps those that took a
    # second or more: the train and evaluation steps); a loaded program is the same program,
    # so the two runs agree to the bit. "off" (and only "off") writes no cache anywhere.
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "64", "--test-limit", "64",
             "--epochs", "1", "--resize", "28", "--batch-size", "32", "--json"]
    cache = tmp_path / "xla"
    first = train_py(*flags, "--compile-cache", cache)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was cached"
    second = train_py(*flags, "--compile-cache", cache)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries  # every program found, none compiled anew
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert [a[k] for k in ("train_loss", "test_loss", "test_acc")] == [b[k] for k in ("train_loss", "test_loss", "test_acc")]

    # Entries cut short (a full disk, a killed run): one line each, and they are stored anew.
    for entry in cache.glob("*-cache"):
        entry.write_bytes(entry.read_bytes()[:1000])
    third = train_py(*flags, "--compile-cache", cache)
    assert third.returncode == 0, third.stderr
    notes = [line for line in third.stderr.splitlines() if "compile cache" in line]
    assert notes and all("held a damaged jit_" in line for line in notes), third.stderr
    assert "Warning" not in third.stderr and "warnings.warn" not in third.stderr
    assert json.loads(third.stdout)["test_loss"] == a["test_loss"]
    # No damaged entry is left: each was deleted and, where JAX kept the new compile, written whole.
    assert all(entry.stat().st_size != 1000 for entry in cache.glob("*-cache"))

    env_free = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, flags), "--compile-cache", "off"],
                       capture_output=True, text=True, timeout=600,
                       env={**env_free, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "xdg").exists()


def test_jaxs_compile_cache_warnings_become_one_line_and_damaged_entries_go(tmp_path, monkeypatch):
    import warnings

    from jax._src.compilation_cache import compress_executable

    good = tmp_path / "jit_step-aaa-cache"
    good.write_bytes(compress_executable(b"an executable"))
    cut = tmp_path / "jit_step-bbb-cache"
    cut.write_bytes(compress_executable(b"another executable" * 100)[:20])
    (tmp_path / "jit_step-bbb-atime").write_bytes(b"12345678")
    other = tmp_path / "jit_other-ccc-cache"
    other.write_bytes(b"the start of an entry whose write failed")
    said, shown = [], []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    with xla_cache.repairing(tmp_path, said.append):
        warnings.warn("Error reading persistent compilation cache entry for 'jit_step': error: Error -5 while "
                      "decompressing data: incomplete or truncated stream")
        warnings.warn("Error writing persistent compilation cache entry for 'jit_other': OSError: "
                      "[Errno 28] No space left on device")
        warnings.warn("Error reading persistent compilation cache entry for 'jit_gone': XlaRuntimeError: bad")
        warnings.warn("something else")
    assert shown == ["something else"]  # other warnings pass through
    assert said == [
        f"note: the compile cache {tmp_path} held a damaged jit_step; it was deleted, and the program is compiled and stored anew",
        f"note: could not store jit_other in the compile cache {tmp_path} (OSError: [Errno 28] No space left on device); "
        "the next run compiles it again",
        f"note: the compile cache {tmp_path} holds a jit_gone that JAX cannot read (XlaRuntimeError: bad); "
        "it was compiled anew. Delete the folder if this recurs",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jit_step-aaa-cache"]  # the partial write went too


def test_entries_written_without_a_size_limit_do_not_stop_the_cache(tmp_path, monkeypatch):
    # JAX writes an entry's -atime file only under a size limit, and under one (below JAX 0.12)
    # reads every entry's before each write. An entry from a JAX program without a limit (the
    # user's own, sharing $JAX_COMPILATION_CACHE_DIR) made every later write fail: train.py stored
    # nothing, ever.
    import jax
    import warnings
    from jax._src.lru_cache import LRUCache  # what JAX stores its entries with under a size limit

    folder = tmp_path / "cache"
    folder.mkdir()
    no_limit = LRUCache(str(folder), max_size=-1)  # JAX's default
    no_limit.put("jit_theirs-aaa", b"an executable")
    assert sorted(p.name for p in folder.iterdir()) == ["jit_theirs-aaa-cache"]
    if tuple(int(v) for v in jax.__version_info__[:2]) < (0, 12):  # not vacuous: what JAX did
        with pytest.raises(FileNotFoundError, match="jit_theirs-aaa-atime"):
            LRUCache(str(folder), max_size=2**30).put("jit_ours-bbb", b"ours")

    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    try:
        xla_cache.use((folder, True), print)  # as train.py starts
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])
    mtime = (folder / "jit_theirs-aaa-cache").stat().st_mtime_ns
    assert (folder / "jit_theirs-aaa-atime").read_bytes() == mtime.to_bytes(8, "little")
    limited = LRUCache(str(folder), max_size=2**30)
    limited.put("jit_ours-bbb", b"ours")
    assert limited.get("jit_ours-bbb") == b"ours"

    # And one written while train.py runs: its failed write adds the access times, once.
    no_limit.put("jit_theirs-ccc", b"another")
    said = []
    # (What JAX below 0.12 warns, in its words: an OSError's own.)
    failed = FileNotFoundError(2, "No such file or directory", str(folder / "jit_theirs-ccc-atime"))
    with xla_cache.repairing(folder, said.append):
        warnings.warn(f"Error writing persistent compilation cache entry for 'jit_ours': FileNotFoundError: {failed}")
        warnings.warn(f"Error writing persistent compilation cache entry for 'jit_ours': FileNotFoundError: {failed}")
    assert said[0] == (f"note: could not store jit_ours in the compile cache {folder}: 1 entry there (written without "
                       "a size limit, or cut short) lacked the access time JAX's size limit needs; added now")
    assert said[1].startswith("note: could not store jit_ours in the compile cache") and "next run" in said[1]
    limited.put("jit_ours-ddd", b"ours too")
    assert xla_cache.add_missing_atimes(folder) == 0


def test_the_compile_cache_is_kept_below_its_size_limit(tmp_path, monkeypatch):
    import jax

    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    folder = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR", tmp_path))  # this session's own (conftest.py)
    before = jax.config.jax_compilation_cache_max_size
    try:
        assert xla_cache.use((folder, True), print) == folder
        assert jax.config.jax_compilation_cache_max_size == xla_cache.MAX_BYTES == 2 * 2**30
        assert jax.config.jax_compilation_cache_dir == str(folder)
        # Without filelock JAX would refuse every cache entry under a size limit: no limit then.
        jax.config.update("jax_compilation_cache_max_size", -1)
        monkeypatch.setattr(xla_cache, "_has_filelock", lambda: False)
        xla_cache.use((folder, True), print)
        assert jax.config.jax_compilation_cache_max_size == -1
    finally:
        jax.config.update("jax_compilation_cache_max_size", before)


def test_a_default_compile_cache_that_cannot_be_made_only_costs_the_cache(tmp_path, prepared_data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--data-dir", str(prepared_data_dir), "--offline",
                        "--train-limit", "32", "--test-limit", "32", "--epochs", "1", "--resize", "28",
                        "--batch-size", "32"], capture_output=True, text=True, timeout=600,
                       env={**env, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(blocker)})
    assert r.returncode == 0, r.stderr
    assert f"note: no compile cache (cannot write {blocker}/resnet_jax/xla)" in r.stdout
    assert blocker.read_text() == "keep me"


def test_a_mistyped_command_is_named_with_the_closest_one(capsys):
    for argv, hint in ((["evalute", "runs/r18"], "did you mean 'evaluate'?"),
                       (["fit"], "the commands are evaluate, predict")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"unknown command '{argv[0]}'" in err and hint in err, err
        assert len(err.strip().splitlines()) == 1


def test_processes_started_with_different_settings_are_refused_in_one_line_each(prepared_data_dir, tmp_path):
    # Another --seed in one process gave replicas with different weights: a wrong run, exit 0.
    # Another --num-processes was overruled by the coordinator's count, without a word.
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "64", "--test-limit", "64",
             "--epochs", "1", "--resize", "17", "--batch-size", "32", "--compile-cache", "off"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shutil.copytree(prepared_data_dir, tmp_path / "data1")
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, flags), "--seed", str(seed),
                               "--data-dir", tmp_path / f"data{i}" if i else prepared_data_dir,  # may differ per host
                               "--coordinator", address, "--num-processes", str(n), "--process-id", str(i),
                               "--init-timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**env, "PYTHONPATH": os.pathsep.join([str(REPO), *[_late_site(tmp_path)] * i])})
             for i, seed, n in ((0, 0, 2), (1, 1, 3))]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
        assert p.returncode == 1 and lines == [
            f"train.py: error: the processes of this run were started with different settings: --seed (here {procs.index(p)}), "
            f"--num-processes (here {procs.index(p) + 2}); start every process with the same flags (only --data-dir and --manual-dir may differ)"], err[-2000:]
        assert "Traceback" not in err and "Check failure" not in err


def test_a_second_run_into_a_busy_output_is_refused_and_changes_nothing(prepared_data_dir, tmp_path):
    # Two runs in one folder interleaved their checkpoints and metrics.jsonl; both could exit 0.
    out = tmp_path / "run"
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "256", "--test-limit", "64",
             "--resize", "17", "--batch-size", "64", "--compile-cache", "off", "--output", out]
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, flags), "--epochs", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not (out / ".train.lock").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = train_py(*flags, "--epochs", "1", "--lr", "0.1")
        assert first.poll() is None, "the first run ended before the second one started: the test proves nothing"
        assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert second.stderr.startswith(f"train.py: error: --output {out} is in use by another program "
                                        f"(pid {first.pid} on "), second.stderr
        assert second.stderr.strip().endswith("; a train.py run, or a script writing checkpoints there); wait for it "
                                              "to end, or choose another --output")
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        first.kill()
        first.communicate()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert json.loads((out / "results.json").read_text())["config"]["lr"] == 0.05
    assert not (out / ".train.lock").exists()


def test_a_data_dir_among_another_runs_checkpoints_is_refused(tmp_path):
    # TFDS prepared the data in RUN/checkpoints/7, which that run's evaluate then took for its
    # latest checkpoint ("incomplete ... remove it"), and its --resume refused.
    from resnet_jax import rundir
    from resnet_jax.config import Config
    from resnet_jax.errors import UserError

    run = tmp_path / "r1"
    (run / "checkpoints" / "1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "step": 3, "train_loss": 2.0, "train_acc": 0.1}) + "\n")
    inner = run / "checkpoints" / "7"
    with pytest.raises(UserError, match=r"^--data-dir .*/r1/checkpoints/7 is among the checkpoints of the run in .*/r1, "):
        rundir.check_paths(Config(data_dir=str(inner), output=str(tmp_path / "r2")))
    assert not inner.exists() and not (tmp_path / "r2").exists()
    rundir.check_paths(Config(data_dir=str(run / "data"), output=str(tmp_path / "r2")))  # beside the checkpoints: fine


def test_an_output_among_another_runs_checkpoints_is_refused(tmp_path):
    # Orbax's rotation in the outer run (--keep) deleted the run written inside it, and its
    # folders made the outer run's evaluate and --resume fail on an "incomplete" checkpoint.
    run = tmp_path / "r1"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "step": 3, "train_loss": 2.0, "train_acc": 0.1}) + "\n")
    (tmp_path / "link").symlink_to(run / "checkpoints")
    before = tree_digest(tmp_path)
    for inner in (run / "checkpoints", run / "checkpoints" / "2", run / "checkpoints" / "2" / "new", run / "best" / "3",
                  tmp_path / "link" / "9"):
        r = train_py("--data-dir", tmp_path / "tfds", "--offline", "--output", inner, timeout=120)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"train.py: error: --output {inner} is among the checkpoints of the run in {run}, which Orbax manages and "
            "--keep rotates away; choose a folder outside them"], r.stderr
    # A PyTorch export there would be rotated away with the checkpoint (its folder was even made
    # by the check, and the run then refused for the wrong reason).
    inner = run / "checkpoints" / "3" / "model.pt"
    r = train_py("--data-dir", tmp_path / "tfds", "--offline", "--output", tmp_path / "r2", "--export-torch", inner, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"train.py: error: --export-torch {inner} is among the checkpoints of the run in {run}, which Orbax manages and "
        "--keep rotates away; choose a file outside them"], r.stderr
    assert tree_digest(tmp_path) == before
    # A loop of symbolic links: one line, not Path.resolve's RuntimeError.
    (tmp_path / "loop").symlink_to("loop")
    r = train_py("--data-dir", tmp_path / "tfds", "--offline", "--output", tmp_path / "loop", timeout=120)
    assert r.returncode == 1 and r.stderr.startswith(f"train.py: error: --output {tmp_path / 'loop'} cannot be followed: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "loop").unlink()
    # Among this run's own checkpoints-to-be (no metrics.jsonl there yet to know the run by).
    own = tmp_path / "r3" / "checkpoints" / "1" / "model.pt"
    r = train_py("--data-dir", tmp_path / "tfds", "--offline", "--output", tmp_path / "r3", "--export-torch", own, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"train.py: error: --export-torch {own} is among this run's checkpoints, which Orbax manages and "
        "--keep rotates away; choose a file outside them"], r.stderr
    assert not (tmp_path / "r3").exists()
    # Folders that only share the names: not a train.py run's, or not a numbered checkpoint.
    (tmp_path / "proj" / "checkpoints").mkdir(parents=True)
    (tmp_path / "proj" / "results.json").write_text("{}")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "metrics.jsonl").write_text("step,loss\n1,2.3\n")
    for elsewhere in (tmp_path / "proj" / "checkpoints" / "resnet18", tmp_path / "sweep" / "best",
                      run / "checkpoints" / "notes"):
        r = train_py("--data-dir", tmp_path / "tfds", "--offline", "--output", elsewhere, timeout=120)
        # Past the path checks, it stops at the data (there is none offline here): one line, not this refusal.
        assert r.returncode == 1 and "among the checkpoints" not in r.stderr and "--offline" in r.stderr, r.stderr


def _two_processes_into(out: Path, data_dir, cwd: Path, second_prefix=(), extra=()) -> list[tuple[int, str]]:
    """A tiny run of two processes (one host, loopback) with --output ``out``: each one's (exit code, stderr).

    ``second_prefix``: what process 1's command runs under (a private mount, say); ``extra``: more flags."""
    flags = ["--data-dir", data_dir, "--offline", "--train-limit", "64", "--test-limit", "64",
             "--epochs", "1", "--resize", "17", "--batch-size", "32", "--compile-cache", "off", "--output", out, *extra]
    address = f"127.0.0.1:{_free_port()}"
    commands = [[sys.executable, str(REPO / "train.py"), *map(str, flags), "--coordinator", address,
                 "--num-processes", "2", "--process-id", str(i), "--init-timeout", "120"] for i in (0, 1)]
    commands[1] = [*second_prefix, *commands[1]]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for c in commands]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()


def test_a_busy_output_stops_every_process_of_a_run_in_one_line(prepared_data_dir, tmp_path):
    # Process 0 alone took the lock and left; process 1 then crashed in JAX's C++ (exit 134).
    from resnet_jax import files

    out = tmp_path / "out"
    out.mkdir()
    with files.held(out / ".train.lock"):  # another run, as far as these two know
        results = _two_processes_into(out, prepared_data_dir, tmp_path)
        assert (out / ".train.lock").exists()  # the holder's file, untouched
    for i, (code, err) in enumerate(results):
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert lines[0] == (f"train.py: error: --output {out} is in use by another program (pid {os.getpid()} on "
                            f"{socket.gethostname()}; a train.py run, or a script writing checkpoints there); wait for "
                            "it to end, or choose another --output" if i == 0 else
                            f"train.py: error: --output {out} is in use by another run, or cannot be locked: "
                            "process 0 says which"), err


# Process 1's data.load takes 40 s longer (for a subprocess with this folder on its PYTHONPATH).
# Process 1 made late or failing (for a subprocess with this folder on its PYTHONPATH, as
# $PROCESS_1 says): its data.load and fit's compile 35 s slower, or its data.load refused
# after 35 s (a preparation that failed).
PROCESS_1 = """
import os, time
import resnet_jax.data as data, resnet_jax.training as training
def slower(fn):
    def late(*args, **kwargs):
        time.sleep(35)
        return fn(*args, **kwargs)
    return late
if os.environ["PROCESS_1"] == "late":
    data.load, training._compile = slower(data.load), slower(training._compile)
else:
    def refuse(*args, **kwargs):
        raise data.DataError("no data on this host (a test's)")
    data.load = slower(refuse)
"""


def _with_process_1(tmp_path, how: str) -> list[str]:
    """The second_prefix of _two_processes_into that makes process 1 ``how`` (PROCESS_1)."""
    folder = tmp_path / "process1"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PROCESS_1)
    return ["env", f"PYTHONPATH={folder}:{REPO}", f"PROCESS_1={how}"]


def test_a_process_late_to_load_its_data_and_to_compile_is_waited_for(prepared_data_dir, tmp_path, monkeypatch):
    # As a host that prepares its data, or compiles with a cold cache: the first collective after
    # the delay (the restore of --resume; the first step) waited only the 30 s XLA:CPU gives Gloo
    # to set up, and the run died (exit 1 and 134). (Seen with two devices per process.)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    out = tmp_path / "out"
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "64", "--test-limit", "64",
             "--epochs", "1", "--resize", "17", "--batch-size", "32", "--compile-cache", "off", "--output", out]
    assert train_py(*flags, timeout=240).returncode == 0  # epoch 1, one process
    results = _two_processes_into(out, prepared_data_dir, tmp_path, _with_process_1(tmp_path, "late"),
                                  extra=["--resume", "--epochs", "2"])
    assert [code for code, _ in results] == [0, 0], [err[-1500:] for _, err in results]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "epoch"] == [1, 2]


def test_a_process_that_cannot_load_its_data_stops_the_others_with_it(prepared_data_dir, tmp_path, monkeypatch):
    # The others waited for it at the barrier after the data until JAX's heartbeat timeout
    # (about 100 s), and their line came after 13 of JAX's C++ log lines. Its refusal comes 35 s
    # late: the others wait for it (the barrier), then all stop together.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    start = time.monotonic()
    results = _two_processes_into(tmp_path / "out", prepared_data_dir, tmp_path, _with_process_1(tmp_path, "fail"))
    assert time.monotonic() - start < 90
    assert [code for code, _ in results] == [1, 1]
    assert [err.strip().splitlines() for _, err in results] == [
        ["train.py: error: another process of this run could not load its data or build its state (that process's line says why)"],
        ["train.py: error: no data on this host (a test's)"]], [err[-1500:] for _, err in results]


def _private_folder_works() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_an_output_folder_the_hosts_do_not_share_is_refused_in_one_line_each(prepared_data_dir, tmp_path):
    # Process 1 sees an empty folder of its own mounted over --output (a mount namespace):
    # what two hosts see with --output on their own disks. Orbax's first save waited forever.
    if not _private_folder_works():
        pytest.skip("needs unshare --mount --map-root-user, to give one process a folder of its own")
    out = tmp_path / "out"
    out.mkdir()
    private = ["unshare", "--mount", "--map-root-user", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(out)]
    for code, err in _two_processes_into(out, prepared_data_dir, tmp_path, second_prefix=private):
        assert code == 1 and err.strip().splitlines()[-1:] == [
            f"train.py: error: --output {out} is not one folder shared by all the processes: process 1 did not see "
            "a file that process 0 wrote there; every process writes its part of each checkpoint into --output, "
            "so give a folder all the hosts share (NFS, a bucket mount)"], err[-2000:]
        assert "Traceback" not in err
    assert list(out.iterdir()) == []  # the check's file is gone, and nothing else was written


def test_distributed_outside_a_cluster_says_what_to_give_instead(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--distributed", "--data-dir", str(tmp_path / "tfds"),
                        "--offline", "--compile-cache", "off"], capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "train.py: error: jax.distributed.initialize failed: coordinator_address should be defined; --distributed "
        "found no cluster to read the settings from (SLURM, Open MPI, a TPU pod...): give --coordinator, "
        "--num-processes and --process-id"]


def _two_process_run(tmp_path: Path, flags: list, second_env: dict | None = None) -> list[subprocess.Popen]:
    """Two processes of one train.py run (loopback), stdout/stderr in tmp_path/out{i}, err{i}.

    ``second_env``: what process 1's environment adds (PYTHONPATH is added to the package's)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in (0, 1):
        extra = dict(second_env or {}) if i == 1 else {}
        env = {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [extra.get("PYTHONPATH")])])}
        with open(tmp_path / f"out{i}", "w") as out, open(tmp_path / f"err{i}", "w") as err:  # the child keeps its copies
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), *map(str, flags), "--coordinator", address,
                 "--num-processes", "2", "--process-id", str(i), "--init-timeout", "120"],
                stdout=out, stderr=err, env=env, cwd=tmp_path))
    return procs


def _survivor_lines(procs: list[subprocess.Popen], lose, tmp_path: Path) -> list[str]:
    """``lose(procs)`` loses process 1 (kills it, or waits for it to die); process 0 must then stop,
    exit 1, within 30 s: its stderr lines. (JAX alone waits ~80 s, for its heartbeat timeout.)"""
    try:
        lose(procs)
        lost = time.monotonic()
        assert procs[0].wait(timeout=60) == 1
        assert time.monotonic() - lost < 30
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return (tmp_path / "err0").read_text().strip().splitlines()


def _last_logged_step(metrics: Path) -> int:
    """The last step a run's metrics.jsonl logged (--log-every); 0 before the first."""
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is left out
    return max((r["step"] for r in steps if r.get("kind") == "steps"), default=0)


def test_a_process_killed_mid_run_stops_the_other_at_once_in_one_line(prepared_data_dir, tmp_path):
    # The survivor's collectives fail ("Connection reset by peer"); it used to print a traceback
    # and wait for JAX's heartbeat timeout (about 80 s), then abort with a C++ stack (exit 134).
    # Killed in the middle of epoch 2's steps (64 an epoch, each one logged): the epoch-1
    # checkpoint is whole, and no save is under way (a kill in a save: the test after this one).
    out = tmp_path / "out"
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "2048", "--test-limit", "64",
             "--epochs", "20", "--resize", "17", "--batch-size", "32", "--compile-cache", "off",
             "--log-every", "1", "--output", out]
    def kill_in_epoch_2(procs):
        deadline = time.monotonic() + 240
        while _last_logged_step(out / "metrics.jsonl") < 64 + 16:
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "err0").read_text()
            time.sleep(0.02)
        procs[1].kill()

    lines = _survivor_lines(_two_process_run(tmp_path, flags), kill_in_epoch_2, tmp_path)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: another process of this run stopped ("), lines
    assert "Gloo" in lines[0] and "by peer" in lines[0], lines  # reset, or closed
    assert lines[0].endswith(f"); the checkpoint of epoch 1 in {out} is intact: start every process again with --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]


# Loaded by process 1 alone (PYTHONPATH): it dies (exit 9) where its part of a checkpoint's save
# ($DIE_IN "save EPOCH") or of --resume's restore ("restore") begins, as if killed there, when
# process 0 is already in Orbax's save or restore.
_DIE_IN = """
import os

def patch(module):
    where, *epoch = os.environ["DIE_IN"].split()
    save, read_meta = module.Checkpoints.save, module.Checkpoints.read_meta

    def dying_save(self, state, at, *args, **kwargs):
        if where == "save" and at == int(epoch[0]):
            self.latest.save = lambda *a, **k: os._exit(9)
        return save(self, state, at, *args, **kwargs)

    def dying_read_meta(self, *args, **kwargs):
        if where == "restore":
            self.latest.restore = lambda *a, **k: os._exit(9)
        return read_meta(self, *args, **kwargs)

    module.Checkpoints.save, module.Checkpoints.read_meta = dying_save, dying_read_meta
"""


def _one_process_dies_in(where: str, tmp_path: Path, flags: list) -> list[str]:
    """Process 1 dies in a save or restore (_DIE_IN); process 0's stderr lines, once it has stopped at once."""
    site = _patching_site(tmp_path, "resnet_jax.checkpoint", _DIE_IN)
    procs = _two_process_run(tmp_path, flags, second_env={"PYTHONPATH": site, "DIE_IN": where})

    def wait_for_its_death(procs):
        assert procs[1].wait(timeout=240) == 9, (tmp_path / "err1").read_text()[-2000:]  # it died there

    return _survivor_lines(procs, wait_for_its_death, tmp_path)


def test_a_process_lost_in_a_save_or_a_restore_stops_the_other_at_once_in_one_line(prepared_data_dir, tmp_path):
    # The survivor said "could not save the checkpoint" (the lost process unnamed, and no word of
    # starting every process again), and when reading for --resume, that a whole checkpoint was
    # "unreadable (corrupt or incomplete)": "remove it".
    out = tmp_path / "out"
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "128", "--test-limit", "64",
             "--epochs", "3", "--resize", "17", "--batch-size", "32", "--compile-cache", "off", "--output", out]
    lines = _one_process_dies_in("save 2", tmp_path, flags)
    assert "epoch 2/3" in (tmp_path / "out0").read_text()  # the epoch's line came before its save
    assert len(lines) == 1 and lines[0].startswith(
        f"train.py: error: another process of this run stopped while the checkpoint of epoch 2 was being written "
        f"in {out / 'checkpoints'} ("), lines
    assert "Gloo" in lines[0] and lines[0].endswith(
        f"); the checkpoint of epoch 1 in {out} is intact: start every process again with --resume"), lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]

    lines = _one_process_dies_in("restore", tmp_path, [*flags, "--resume"])
    assert len(lines) == 1 and lines[0].startswith(
        f"train.py: error: another process of this run stopped while checkpoint {out / 'checkpoints' / '1'} "
        "was being read ("), lines
    assert "Gloo" in lines[0] and lines[0].endswith(
        f"); the checkpoint of epoch 1 in {out} is intact: start every process again with --resume"), lines
    assert "corrupt" not in lines[0] and "remove" not in lines[0]


def test_a_finished_run_in_a_read_only_folder_names_what_reads_it_on_resume(prepared_data_dir, tmp_path):
    # --resume of a finished run only reports it, but locks the folder first (a file written there):
    # in a read-only folder it said "not a writable directory" and no more. A run with epochs left
    # is refused as before: it would write.
    run = tmp_path / "run"
    flags = ["--data-dir", prepared_data_dir, "--offline", "--train-limit", "64", "--test-limit", "64", "--resize", "28",
             "--batch-size", "32", "--output", run]
    assert train_py(*flags, "--epochs", "1").returncode == 0
    before = tree_digest(run)
    if os.geteuid() != 0 or shutil.which("chattr") is None or subprocess.run(
            ["chattr", "-R", "+i", str(run)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only here")
    try:
        finished = train_py(*flags, "--epochs", "1", "--resume")
        unfinished = train_py(*flags, "--epochs", "2", "--resume")
        exported = train_py(*flags, "--epochs", "1", "--resume", "--export-torch", tmp_path / "w.pt")
        evaluated = train_py("evaluate", run)
    finally:
        subprocess.run(["chattr", "-R", "-i", str(run)], capture_output=True)
    bare = f"train.py: error: --output {run} is not a writable directory: Operation not permitted"
    assert finished.returncode == 1 and finished.stderr == (
        f"{bare}; it holds a finished run (all 1 epoch trained), which --resume would only report, after locking "
        f"the folder: its results are in {run / 'results.json'}, and `train.py evaluate {run}` reads its checkpoint "
        "without writing\n")
    assert unfinished.returncode == 1 and unfinished.stderr == bare + "\n"
    # With --export-torch, --resume of a finished run exports: it does not "only report".
    assert exported.returncode == 1 and exported.stderr == (
        f"{bare}; it holds a finished run (all 1 epoch trained), which --resume would only report and export, after "
        f"locking the folder: its results are in {run / 'results.json'}, and `train.py evaluate {run}` reads its "
        "checkpoint without writing\n")
    assert not (tmp_path / "w.pt").exists()
    assert evaluated.returncode == 0 and "test: loss" in evaluated.stdout, evaluated.stderr
    assert tree_digest(run) == before
