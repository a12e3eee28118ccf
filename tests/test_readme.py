"""README's Python examples, run as written: a reader copies them, so they must run and say what is true.

Each ```python block of README.md is executed verbatim (the comments that state a value are
checked against what the code gives). The one change: the fit example's last line opens a
train.py run ("runs/r18"), which the test does not start; it opens the folder that the
Checkpoints example right after it writes instead.
"""

import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_the_blocks_this_file_runs():
    # A block added, removed or reordered: update the tests below (each runs one or two by index).
    blocks = readme_blocks()
    assert len(blocks) == 4
    assert "ResNet18(num_classes=10" in blocks[0]
    assert "training.fit(" in blocks[1]
    assert "checkpoint.Checkpoints(" in blocks[2]
    assert "torch_to_flax(" in blocks[3]


def test_the_modules_example():
    code = readme_blocks()[0]
    ns = {}
    exec(code, ns)
    # The counts its comment states, and the shapes it describes.
    stated = re.search(r"# (\d+), (\d+)", code)
    assert (ns["count_params"](ns["variables"]["params"]), ns["count_params"](ns["variables"]["batch_stats"])) == (
        int(stated[1]), int(stated[2]))
    assert set(ns["variables"]) == {"params", "batch_stats"}
    assert ns["logits"].shape == (8, 10)
    assert set(ns["updates"]) == {"batch_stats"}


def test_the_pytorch_weights_example(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(REPO)  # "in a clone": it imports tests/torch_reference.py
    monkeypatch.setattr(sys, "path", list(sys.path))  # the example's sys.path.insert, undone after
    ns = {}
    exec(readme_blocks()[3], ns)
    with torch.no_grad():
        ref = ns["net"](ns["x"]).numpy()
    np.testing.assert_allclose(np.asarray(ns["logits"]), ref, atol=1e-5, rtol=0)
    # The round trip restored every tensor, and strict loading accepted PyTorch's keys.
    for key, value in ns["sd"].items():
        assert np.array_equal(ns["net"].state_dict()[key].numpy(), value.numpy()), key


def test_the_fit_and_checkpoints_examples(prepared_data_dir, tmp_path, monkeypatch):
    fit, save = readme_blocks()[1], readme_blocks()[2]
    opens_a_train_py_run = 'ckpt = load_for_inference("runs/r18")'
    assert fit.count(opens_a_train_py_run) == 1
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared_data_dir))  # data.load's default, TFDS's own
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(fit.replace(opens_a_train_py_run, ""), ns)
    result, config = ns["result"], ns["config"]
    assert len(result.history) == config.epochs == 1
    assert result.final["test_acc"] == result.history[-1]["test_acc"]
    assert ns["metrics"]["count"] == config.test_limit
    assert np.asarray(ns["metrics"]["confusion"]).sum() == config.test_limit

    # "after each epoch of your loop": the loop's epoch and history.
    ns.update(state=result.state, epoch=1, history=result.history)
    exec(save, ns)
    exec(opens_a_train_py_run.replace("runs/r18", "runs/mine"), ns)
    ckpt = ns["ckpt"]
    assert ckpt.config == config
    for a, b in zip(jax.tree.leaves(ckpt.state.params), jax.tree.leaves(result.state.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
