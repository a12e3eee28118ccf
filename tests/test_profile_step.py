"""benchmarks/profile_step.py: a traced epoch and its kernel table."""

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step  # noqa: E402


def test_busy_time_is_the_union_of_the_kernels_intervals():
    assert profile_step._busy_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert profile_step._busy_us([]) == 0


def _trace(path: Path, events: list[dict]) -> Path:
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_a_gpu_trace_is_read_from_the_device_process_only(tmp_path):
    # The shape of jax.profiler's Perfetto trace: process names in metadata events, kernels as X events.
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
    kernels = [
        {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 60, "name": "sm90_xmma_fprop_implicit_gemm_bf16"},
        {"ph": "X", "pid": 2, "tid": 8, "ts": 50, "dur": 20, "name": "loop_add_fusion_2"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 100, "dur": 20, "name": "loop_add_fusion_13"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 999, "name": "host work, not counted"},
    ]
    md = profile_step.summarize(_trace(tmp_path / "t.json.gz", meta + kernels))
    assert "Events from: /device:GPU:0." in md
    assert "Window: 0.1 ms" in md and "**75.0%**" in md  # busy 0-70 and 100-120: 90 of 120 us
    assert "| convolution | 0.1 | 60.0% |" in md and "| XLA fusion | 0.0 | 40.0% |" in md
    assert "| `loop_add_fusion` | 2 | 0.04 | 40.0% |" in md  # instances added up
    assert "host work" not in md


def test_an_epoch_is_traced_and_tabulated(tmp_path):
    out = tmp_path / "prof"
    assert profile_step.main(["--out", str(out), "--resize", "17", "--batch", "8", "--train-examples", "32",
                              "--eval-examples", "16", "--dtype", "float32"]) == 0
    md = (out / "profile.md").read_text()
    assert "Traced: epoch 2 of 2 (32 images at batch 8, 17x17, float32; then evaluation on 16)" in md
    assert "| kind | ms | share of kernel time |" in md and "Window: " in md
    with gzip.open(out / "trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--out", "x", "--resize", "3"], "--resize must be an integer in [17, 512]"),
    (["--out", "x", "--train-examples", "4", "--batch", "8"], "--train-examples must hold at least one --batch"),
    ([], "the following arguments are required: --out"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_step.main(argv)
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("benchmarks/profile_step.py: error: ") and message in line
