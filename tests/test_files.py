"""resnet_jax.files: a file is replaced whole or not at all."""

import json
import os
import stat

import pytest

from resnet_jax import files


def test_a_complete_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "r.json").write_text("old")
    files.write_json(tmp_path / "r.json", {"acc": 0.9})
    assert json.loads((tmp_path / "r.json").read_text()) == {"acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"good")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(tmp_path / "w.bin") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt  # Ctrl-C mid-write
    assert (tmp_path / "w.bin").read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_a_written_file_has_the_mode_open_would_give(tmp_path):
    # mkstemp's files are private (0600): results.json and curves.png would be unreadable to others.
    files.write_json(tmp_path / "r.json", {})
    (tmp_path / "plain").write_text("")
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_a_target_that_is_not_a_regular_file_is_refused_not_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # stands for /dev/null or /dev/full, which a rename (as root) would replace
    with pytest.raises(OSError, match="not a regular file"):
        with files.atomic_write(fifo) as f:
            f.write(b"x")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(tmp_path.iterdir()) == [fifo]
