"""Ctrl-C is never lost, and never a traceback: resnet_jax/interrupts.py and train.py's use of it."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_jax import interrupts

REPO = Path(__file__).resolve().parents[1]


def test_a_swallowed_ctrl_c_is_raised_again_by_check(interrupts_installed):
    interrupts.check()  # nothing yet
    try:  # what a garbage-collector callback does with the KeyboardInterrupt raised inside it
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass
    assert interrupts.seen()
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_the_swallowed_ctrl_c_is_not_printed_but_other_unraisables_are(interrupts_installed, capsys):
    class RaisesOnDelete:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    interrupts._seen = None  # no signal came: a KeyboardInterrupt from elsewhere is not ours to hide
    RaisesOnDelete(KeyboardInterrupt())
    assert "KeyboardInterrupt" in capsys.readouterr().err
    interrupts._seen = True
    RaisesOnDelete(KeyboardInterrupt())  # dropped at once: its __del__'s exception is "unraisable"
    assert capsys.readouterr().err == ""
    RaisesOnDelete(ValueError("kept"))
    assert "ValueError: kept" in capsys.readouterr().err


def _wait_until_train_py_runs(p: subprocess.Popen, deadline_s: float = 60.0) -> None:
    """Return once train.py's first line has run in process ``p`` (or ``p`` has ended).

    Timed from the process's start instead, a signal on a loaded machine (CI's two workers
    compiling) landed in Python's own start-up, before train.py could do anything about it
    (exit -2, as for any Python program). That line blocks SIGINT and SIGTERM until JAX's import
    begins under a handler for both; Python alone never handles SIGTERM. So either one seen in
    /proc/PID/status means train.py runs, from its first line to its end.
    """
    status = Path(f"/proc/{p.pid}/status")
    if not status.exists():  # not Linux: time from the start, as before
        return
    blocked_or_caught = (1 << (signal.SIGINT - 1), 1 << (signal.SIGTERM - 1))
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < deadline_s:
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # ended between poll() and the read
            return
        if int(fields["SigBlk"], 16) & blocked_or_caught[0] or int(fields["SigCgt"], 16) & blocked_or_caught[1]:
            return
        time.sleep(0.002)
    assert p.poll() is not None, f"train.py did not start within {deadline_s} s"


@pytest.mark.parametrize("sig, after_s", [("SIGINT", 0.15), ("SIGINT", 0.7), ("SIGINT", 1.5), ("SIGINT", 3.0),
                                          ("SIGTERM", 0.7), ("SIGTERM", 3.0)])
def test_ctrl_c_or_sigterm_early_in_train_py_exits_130_or_143_with_one_message(prepared_data_dir, tmp_path, sig, after_s):
    # Times from train.py's first line (see _wait_until_train_py_runs): 0.15 s: the restart for
    # huge pages, numpy and jaxlib importing (a KeyboardInterrupt inside jaxlib's initialisation
    # aborts the process: exit 134); 0.7 s: JAX's import (a Ctrl-C used to be a 34-line trace,
    # or swallowed by JAX's gc callback so that the run trained to the end); 1.5 and 3 s:
    # Flax/Orbax imports, loading, compiling. SIGTERM (kill, a scheduler) alike: exit 143,
    # "terminated" (it used to end the process with no message).
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--data-dir", str(prepared_data_dir), "--offline", "--epochs", "50", "--resize", "28",
         "--train-limit", "512", "--test-limit", "256", "--output", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    _wait_until_train_py_runs(p)
    time.sleep(after_s)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    assert p.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert {"SIGINT": "interrupted", "SIGTERM": "terminated"}[sig] in err.strip().splitlines()[-1]


def test_deferred_holds_a_ctrl_c_until_its_end(interrupts_installed):
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)  # inside an import of jaxlib this would abort the process
            reached = True
    assert reached and interrupts.seen()


@pytest.mark.parametrize("first, second, code", [("SIGINT", "SIGINT", 130), ("SIGTERM", "SIGINT", 130), ("SIGINT", "SIGTERM", 143)])
def test_a_second_signal_while_the_first_waits_stops_at_once(first, second, code):
    # A checkpoint that never finishes (a stuck disk, a host that never answers) held the
    # first signal forever; the second one ends the process, with one line.
    script = (
        "import signal, time\nfrom resnet_jax import interrupts\ninterrupts.install()\n"
        f"with interrupts.deferred():\n    signal.raise_signal(signal.{first})\n"
        f"    signal.raise_signal(signal.{second})\n    time.sleep(60)\nprint('not reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    word = "terminated" if first == "SIGTERM" else "interrupted"
    assert r.returncode == code and r.stdout == "" and r.stderr.splitlines() == [
        f"train.py: {word} again: stopped at once; a checkpoint being written may be left incomplete "
        "(the earlier ones are kept)"], r.stderr


def _fake_state():
    import types

    import jax
    import numpy as np

    from resnet_jax import ResNet18, init_variables

    v = init_variables(ResNet18(), jax.random.key(0), 28)
    return types.SimpleNamespace(params=v["params"], batch_stats=v["batch_stats"], ema_params=None,
                                 step=np.int32(3))


def test_a_ctrl_c_during_the_export_waits_for_the_whole_file_then_ends_the_run(interrupts_installed, monkeypatch, tmp_path):
    # Raised inside torch.save, it broke the zip writer (a 43-line traceback), or was lost (exit 0).
    from resnet_jax import cli, convert
    from resnet_jax.config import Config

    real, lines = convert.save_torch_checkpoint, []

    def save_with_a_signal(path, variables, steps, **kwargs):
        signal.raise_signal(signal.SIGINT)
        real(path, variables, steps, **kwargs)

    monkeypatch.setattr(convert, "save_torch_checkpoint", save_with_a_signal)
    with pytest.raises(KeyboardInterrupt):
        cli._export_torch(Config(export_torch=str(tmp_path / "m.pt")), _fake_state(), lines.append)
    assert lines == [f"exported the final weights as a PyTorch state_dict to {tmp_path / 'm.pt'}"]
    assert (tmp_path / "m.pt").is_file() and convert.load_torch_checkpoint(tmp_path / "m.pt")[1] == 3


def test_an_export_onto_a_full_disk_is_one_line_naming_the_error(monkeypatch, tmp_path):
    # torch.save reports a full disk as a RuntimeError around the OSError: it was a traceback.
    import errno

    from resnet_jax import cli, convert
    from resnet_jax.config import Config
    from resnet_jax.errors import UserError

    def full(path, variables, steps, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25855680 vs 25855576")

    monkeypatch.setattr(convert, "save_torch_checkpoint", full)
    with pytest.raises(UserError, match=r"^--export-torch .*m.pt: not written: No space left on device$"):
        cli._export_torch(Config(export_torch=str(tmp_path / "m.pt")), _fake_state(), print)
    # A run's export, after its training: the line says the checkpoints are kept, and how to export them.
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^--export-torch .*m.pt: not written: No space left on device; the run's "
                       rf"checkpoints are kept: export them with --resume --output {re.escape(str(run))} --export-torch ANOTHER.pt$"):
        cli._export_torch(Config(export_torch=str(tmp_path / "m.pt"), output=str(run)), _fake_state(), print)


def test_an_export_file_written_by_another_program_during_the_run_is_not_replaced(tmp_path):
    # Two runs started with one --export-torch both found no file there; the later one's export
    # silently replaced the earlier run's model (exit 0, and both results.json listed it).
    from resnet_jax import cli, rundir
    from resnet_jax.config import Config
    from resnet_jax.errors import UserError

    target = tmp_path / "m.pt"
    config = Config(export_torch=str(target), output=str(tmp_path / "run"))
    rundir.check_torch_paths(config)  # at the start: no file there
    target.write_bytes(b"the other run's model")  # meanwhile
    with pytest.raises(UserError, match=r"^--export-torch .*m.pt: not written: another program wrote that file since "
                                        r"this run started .*--resume --output .*run --export-torch ANOTHER.pt$"):
        cli._export_torch(config, _fake_state(), print)
    assert target.read_bytes() == b"the other run's model"
    target.unlink()  # gone again: nothing to keep, the export goes ahead
    cli._export_torch(Config(export_torch=str(target)), _fake_state(), print)
    assert target.stat().st_size > 1000



def test_an_export_file_written_by_another_program_during_the_export_is_not_replaced(tmp_path, monkeypatch):
    # After the export's last look (check_export_unchanged) and before its rename: the window that
    # the test above leaves. The rename names the file only if none is there, in one step.
    import torch

    from resnet_jax import cli, rundir
    from resnet_jax.config import Config
    from resnet_jax.errors import UserError

    target = tmp_path / "m.pt"
    config = Config(export_torch=str(target), output=str(tmp_path / "run"))
    rundir.check_torch_paths(config)  # at the start: no file there
    real_save = torch.save

    def save_then_another_run_finishes(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        target.write_bytes(b"the other run's model")

    monkeypatch.setattr(torch, "save", save_then_another_run_finishes)
    with pytest.raises(UserError, match=r"^--export-torch .*m.pt: not written: another program wrote that file since "
                                        r"this run started .*--resume --output .*run --export-torch ANOTHER.pt$"):
        cli._export_torch(config, _fake_state(), print)
    assert target.read_bytes() == b"the other run's model" and sorted(tmp_path.iterdir()) == [target]

def test_a_dangling_symbolic_link_at_the_export_is_replaced_as_before_not_called_another_programs_file(tmp_path):
    # The link was there at the start, and no file behind it: check_torch_paths let the run train,
    # and the export (a hard link, refused where any name is) then said that another program wrote
    # that file since the run started, after the whole training.
    from resnet_jax import cli, convert, rundir
    from resnet_jax.config import Config

    target = tmp_path / "m.pt"
    target.symlink_to(tmp_path / "nowhere.pt")
    config = Config(export_torch=str(target))
    rundir.check_torch_paths(config)
    cli._export_torch(config, _fake_state(), print)
    assert not target.is_symlink() and convert.load_torch_checkpoint(target)[1] == 3


def test_a_file_written_behind_a_dangling_link_during_the_run_is_another_programs(tmp_path):
    from resnet_jax import cli, rundir
    from resnet_jax.config import Config
    from resnet_jax.errors import UserError

    target, behind = tmp_path / "m.pt", tmp_path / "behind.pt"
    target.symlink_to(behind)
    config = Config(export_torch=str(target))
    rundir.check_torch_paths(config)
    behind.write_bytes(b"the other run's model")  # meanwhile, through the link
    with pytest.raises(UserError, match="another program wrote that file since this run started"):
        cli._export_torch(config, _fake_state(), print)
    assert target.is_symlink() and behind.read_bytes() == b"the other run's model"


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_after_the_run_is_one_line_not_a_silent_exit(sig, code):
    # After main() returned (the export written, say), the KeyboardInterrupt came in Python's
    # shutdown, where it is swallowed: exit 130 with no word of why.
    script = (
        "import signal, sys\nfrom resnet_jax import interrupts\ninterrupts.install()\nprint('done')\n"
        f"interrupts.exiting()\nsignal.raise_signal(signal.{sig})\nsys.exit(0)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    word = "terminated" if sig == "SIGTERM" else "interrupted"
    assert r.returncode == code and r.stdout == "done\n" and r.stderr.splitlines() == [f"train.py: {word} while exiting"], r


def test_train_py_turns_a_signal_after_main_into_one_line():
    # The wiring of the test above: train.py itself calls interrupts.exiting() once main() is
    # back. Here main() does nothing and the signal comes from an exit handler, as late as one can.
    script = (
        "import atexit, os, runpy, signal, sys, time\nimport resnet_jax.cli as cli\n"
        "def late():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n"
        "cli.main = lambda: (atexit.register(late), 0)[1]\n"
        f"sys.argv = ['train.py']\nrunpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "RESNET_JAX_HUGE_PAGES": "0"})
    assert r.returncode == 143 and r.stderr.splitlines()[-1:] == ["train.py: terminated while exiting"], r


def test_a_signal_held_through_the_restart_is_one_line_once_train_py_listens(tmp_path):
    # train.py blocks SIGINT and SIGTERM from its first line to its handlers, so that one sent
    # during the restart for huge pages (the interpreter's start-up again) waits instead of
    # being a traceback or a silent death. Here the signal is already pending, blocked, when
    # train.py starts (execve keeps both): it must come through, once train.py listens.
    script = (
        "import os, signal, sys\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        f"os.execv(sys.executable, [sys.executable, {str(REPO / 'train.py')!r}, '--data-dir', {str(tmp_path)!r}, '--offline'])\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 130 and r.stderr.splitlines() == ["train.py: interrupted"], r


def test_a_ctrl_c_and_a_sigterm_held_together_are_one_signal_not_a_second_in_a_wait():
    # Both pending at the unblock used to print "interrupted again: stopped at once; a checkpoint
    # being written may be left incomplete" at start-up, where no checkpoint is written.
    script = (
        "import os, signal\nfrom resnet_jax import interrupts\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})\n"
        "os.kill(os.getpid(), signal.SIGINT)\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "interrupts.defer()\ninterrupts.release_held()\n"
        "print(interrupts.word(), interrupts.exit_code(), signal.getsignal(signal.SIGINT) is interrupts._record)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout == "interrupted 130 True\n" and r.stderr == "", r


@pytest.mark.parametrize("launcher", ["nothing", "ignores SIGINT, blocks SIGTERM"])
def test_train_py_handles_both_signals_whatever_its_launcher_left_them(launcher, monkeypatch):
    # A script's background `python train.py &` starts with Ctrl-C ignored (a non-interactive
    # shell's rule), and `kill -INT $pid` must still stop it; a blocked mask inherited from a
    # launcher is lifted. Through the restart for huge pages too, which runs where it would.
    from resnet_jax import hugepages

    setup = "" if launcher == "nothing" else (
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n")
    inner = (
        "import os, runpy, signal, sys\nimport resnet_jax.cli as cli\nfrom resnet_jax import hugepages, interrupts\n"
        "def main():\n"
        "    print([signal.getsignal(s) is interrupts._handler for s in (signal.SIGINT, signal.SIGTERM)],\n"
        "          sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, ())), hugepages.active())\n"
        "    return 0\n"
        "cli.main = main\n"
        f"sys.argv = ['train.py']\nrunpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n"
    )
    script = f"import os, signal, sys\n{setup}os.execv(sys.executable, [sys.executable, '-c', {inner!r}])\n"
    for name in ("GLIBC_TUNABLES", hugepages.OPT_OUT):
        monkeypatch.delenv(name, raising=False)
    restarts = hugepages.wanted()  # in the environment the child gets
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout == f"[True, True] [] {restarts}\n", r


def test_kill_int_stops_a_train_py_that_a_script_started_in_the_background(tmp_path):
    # bash -c '... &': the background command starts with Ctrl-C ignored. Whenever the signal
    # lands (held at start-up, or in main), the run stops with 130, not after main's 20 s.
    # The signal is sent a second after train.py starts (the file "started" appears): a signal
    # during this script's own imports, with Ctrl-C still ignored, is lost before train.py runs
    # (as it would be for any program), and those take over 2 s with some versions of JAX.
    inner = (
        "import pathlib, runpy, sys, time\nimport resnet_jax.cli as cli\n"
        "def main():\n    try:\n        time.sleep(20)\n    except KeyboardInterrupt:\n        return 130\n    return 0\n"
        "cli.main = main\n"
        f"sys.argv = ['train.py']\npathlib.Path({str(tmp_path / 'started')!r}).touch()\n"
        f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n"
    )
    script = (f'{sys.executable} -c "$INNER" & pid=$!; until [ -e {tmp_path / "started"} ] || ! kill -0 $pid 2>/dev/null; do sleep 0.05; done; '
              'sleep 1; kill -INT $pid; wait $pid; echo rc=$?')
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "INNER": inner})
    assert r.stdout.strip() == "rc=130" and time.monotonic() - t0 < 15, r
