"""Ctrl-C is never lost, and never a traceback: resnet_jax/interrupts.py and train.py's use of it."""

import os
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

    interrupts._seen = True
    RaisesOnDelete(KeyboardInterrupt())  # dropped at once: its __del__'s exception is "unraisable"
    assert capsys.readouterr().err == ""
    RaisesOnDelete(ValueError("kept"))
    assert "ValueError: kept" in capsys.readouterr().err


@pytest.mark.parametrize("sig, after_s", [("SIGINT", 0.15), ("SIGINT", 0.7), ("SIGINT", 1.5), ("SIGINT", 3.0),
                                          ("SIGTERM", 0.7), ("SIGTERM", 3.0)])
def test_ctrl_c_or_sigterm_early_in_train_py_exits_130_or_143_with_one_message(prepared_data_dir, tmp_path, sig, after_s):
    # 0.15 s: numpy and jaxlib importing (a KeyboardInterrupt inside jaxlib's initialisation
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
