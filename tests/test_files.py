"""resnet_jax.files: a file is replaced whole or not at all."""

import json

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
