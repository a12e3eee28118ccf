"""README's Python examples and train.py commands: a reader copies them, so they must work as shown.

Each ```python block of README.md is executed verbatim (the comments that state a value are
checked against what the code gives). The one change: the fit example's last line opens a
train.py run ("runs/r18"), which the test does not start; it opens the folder that the
Checkpoints example right after it writes instead. Each ``python train.py ...`` command README
shows is parsed and checked as train.py does before any work (none is run).
"""

import re
import shlex
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


def readme_train_py_commands() -> list[list[str]]:
    """The arguments of every ``python train.py ...`` command README shows, in code spans and code blocks."""
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(), flags=re.S)  # the Python examples
    lines = text.splitlines()
    blocks = [line for line in lines if line.startswith("    ")]  # Markdown's indented code
    prose = "\n".join(line for line in lines if not line.startswith("    "))
    code = blocks + re.findall(r"`([^`]+)`", prose)  # and code spans, which may wrap a line
    commands = []
    for snippet in code:
        for rest in re.findall(r"python train\.py([^|&#]*)", snippet.replace("\n", " ")):
            commands.append(shlex.split(rest))
    return commands


def test_every_train_py_command_in_readme_is_accepted():
    # Parsed and checked as train.py does before any work (flags, values, the flags' rules, the
    # launch settings): a flag renamed or a rule added would otherwise leave README stale.
    from resnet_jax.config import ConfigError

    found = readme_train_py_commands()
    assert len(found) >= 20 and ["predict", "runs/r18", "shirt.png", "boot.jpg", "--top-k", "3"] in found
    for argv in found:
        try:
            parse_as_train_py_does(argv)
        except (SystemExit, ConfigError) as err:
            pytest.fail(f"README's `python train.py {shlex.join(argv)}` is refused: {err!r} (see the captured stderr)")


def parse_as_train_py_does(argv: list[str]) -> None:
    from resnet_jax import cli, commands, processes

    if argv == ["--help"]:
        with pytest.raises(SystemExit) as exited:
            cli.build_parser().parse_args(argv)
        assert exited.value.code == 0
    elif argv and argv[0] in ("evaluate", "predict"):
        parser = commands.build_evaluate_parser() if argv[0] == "evaluate" else commands.build_predict_parser()
        parser.parse_args(argv[1:])
    else:
        args = cli.build_parser().parse_args(argv)
        cli.config_from_args(args)
        processes.settings_from_args(args)
