"""benchmarks/bench.py at toy size: the report's structure, finite positive numbers, the FLOP count, bad flags."""

import json
import math
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench  # noqa: E402

from resnet_jax.config import Config  # noqa: E402


def test_counted_flops_reproduce_the_hand_count_at_96_and_follow_the_feature_maps():
    train, evaluation = bench.counted_gflop(96)
    assert round(train, 3) == 1.897 and round(evaluation, 3) == 0.637
    # 28x28 maps shrink with ceil-rounding (14, 7, 4, 2, 1): more than (28/96)^2 of the 96x96 count.
    train28, _ = bench.counted_gflop(28)
    assert train28 > 1.2 * train * (28 / 96) ** 2


def test_peak_host_memory_in_bytes_on_linux_and_macos_and_none_without_resource(monkeypatch):
    # bench.py imported resource at its top, and did not start on Windows; macOS reports bytes, not KiB.
    class Usage:
        ru_maxrss = 5

    class Resource:
        RUSAGE_SELF = 0

        @staticmethod
        def getrusage(who):
            return Usage

    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (
        real_open("/nonexistent/status") if path == "/proc/self/status" else real_open(path, *a, **k)))
    monkeypatch.setitem(sys.modules, "resource", Resource)
    monkeypatch.setattr(sys, "platform", "linux")
    assert bench._peak_rss_bytes() == 5 * 1024
    monkeypatch.setattr(sys, "platform", "darwin")
    assert bench._peak_rss_bytes() == 5
    monkeypatch.setitem(sys.modules, "resource", None)
    assert bench._peak_rss_bytes() is None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's VmHWM")
def test_a_spawned_process_reads_its_own_peak_not_its_parents():
    # ru_maxrss carries the parent's peak over into a spawned process (fork, then exec): the
    # chapter's row gave the JAX process's peak as its own.
    import multiprocessing

    import numpy as np

    ballast = np.ones(300 * 2**20, np.uint8)  # 300 MiB more than the child will ever touch
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(bench._peak_rss_bytes)
    assert ballast[-1] == 1 and child < bench._peak_rss_bytes() - 250 * 2**20


def test_peaks_known_for_datacenter_gpus_only():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.5
    assert bench.peak_tflops("NVIDIA H200", "float32") == 494.5
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert bench.peak_tflops("cpu", "float32") is None


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_toy_run_writes_json_and_markdown(tmp_path, capsys):
    # --steps 2: two steps per dispatch, so JAX runs fit's device loop (train_chunk) as on GPU.
    argv = ["--batch", "4", "--resize", "17", "--repeats", "1", "--steps", "2", "--train-examples", "8",
            "--eval-examples", "8", "--torch-workers", "0", "--torch-threads", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    env = report["environment"]
    assert env["command"].endswith("bench.py " + " ".join(argv))
    assert env["versions"]["jax"] and env["versions"]["flax"] and env["versions"]["optax"] and env["versions"]["pillow"]
    # The commit measured (this checkout is a git clone; "+ uncommitted changes" while one edits it).
    assert env["code"].split()[0] == subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                    text=True, cwd=BENCHMARKS.parent).stdout.strip()
    assert env["env"].get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES")
    assert "synthetic" in report["data"]

    impls = [r["impl"] for r in report["rows"]]
    expected = ["jax", "torch_tuned", "torch_chapter"] if bench.torch_available() else ["jax"]
    assert impls == expected
    for row in report["rows"]:
        assert (row["resize"], row["batch"], row["dtype"], row["steps_per_repeat"]) == (17, 4, "float32", 2)
        for key in ("train_images_per_s", "eval_images_per_s", "step_ms_median", "train_tflops", "eval_tflops",
                    "counted_gflop_per_train_image", "counted_gflop_per_eval_image", "peak_rss_bytes"):
            assert _positive(row[key]), (row["impl"], key, row[key])
        assert math.isfinite(row["step_ms_spread"]) and row["step_ms_spread"] >= 0
        assert row["environment"] == env
        assert row["mfu"] is None and row["peak_device_bytes"] is None  # CPU: no known peak, no device stats
    jax_row = report["rows"][0]
    assert _positive(jax_row["compile_s"]) and _positive(jax_row["xla_gflop_per_train_image"])

    md = (tmp_path / "bench.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(report["rows"])  # header + one line per row
    assert f"`{env['command']}`" in md and "JAX " + env["versions"]["jax"] in md
    assert md in capsys.readouterr().out


def test_rounds_interleave_and_pool(tmp_path, capsys):
    argv = ["--batch", "4", "--resize", "17", "--repeats", "2", "--rounds", "2", "--train-examples", "8",
            "--eval-examples", "8", "--torch-workers", "0", "--torch-threads", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "(round " in line]
    if bench.torch_available():  # each round starts one implementation later
        assert said == ["JAX 17x17 float32 (round 1/2) ...", "PyTorch tuned 17x17 float32 (round 1/2) ...",
                        "PyTorch chapter's loop 17x17 (round 1/2) ...", "PyTorch tuned 17x17 float32 (round 2/2) ...",
                        "PyTorch chapter's loop 17x17 (round 2/2) ...", "JAX 17x17 float32 (round 2/2) ..."]
    report = json.loads((tmp_path / "bench.json").read_text())
    expected = ["jax", "torch_tuned", "torch_chapter"] if bench.torch_available() else ["jax"]
    assert [r["impl"] for r in report["rows"]] == expected  # one row per implementation, not per round
    for row in report["rows"]:
        assert row["rounds"] == 2 and len(row["step_ms_all"]) == 4 and len(row["eval_s_all"]) == 4
        assert row["step_ms_median"] == statistics.median(row["step_ms_all"])
        assert row["train_images_per_s"] == row["batch"] / (row["step_ms_median"] / 1000)
    assert "pooled over 2 interleaved rounds" in (tmp_path / "bench.md").read_text()


def test_xla_counts_the_program_before_optimisation_first():
    # On a GPU the compiled program's convolutions are cuDNN calls that XLA does not count: the
    # H200's bench recorded 0.021 GFLOP per training image from it, against 1.897 counted.
    class Stage:
        def __init__(self, flops):
            self.flops = flops

        def cost_analysis(self):
            return {"flops": self.flops}

    assert bench._xla_flops(Stage(1.5e9), Stage(2e7)) == 1.5e9
    assert bench._xla_flops(Stage(0.0), Stage(2e7)) == 2e7  # a backend without a count for the lowered one


@pytest.mark.skipif(not bench.torch_available(), reason="needs torch")
def test_the_tuned_loop_leaves_cudnn_autotuning_as_it_found_it():
    # It turns cuDNN's autotuning on for itself; the chapter's loop, measured after it in the same
    # process, ran with it too on the H200 (2026-12-04), which its readers never do.
    import torch

    train, test = bench.synthetic_splits(8, 8)
    assert torch.backends.cudnn.benchmark is False
    bench.bench_torch_tuned(train, test, 17, 4, "float32", 1, 1, compile_model=False)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.skipif(not bench.torch_available(), reason="needs torch")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_the_chapters_loop_starts_its_workers_from_a_process_without_jax(monkeypatch, start_method):
    # Its DataLoader forked its workers from the process that runs JAX's threads, and JAX warned
    # at every fork that it "will likely lead to a deadlock". Where workers are spawned (macOS,
    # Windows, Python 3.14's forkserver) the dataset is pickled to them, and its transform was a
    # closure, which does not pickle.
    import jax

    jax.devices()  # JAX's threads running here, as in a run
    monkeypatch.setattr(bench.multiprocessing, "get_start_method", lambda: start_method)
    train, test = bench.synthetic_splits(8, 8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with bench.ChapterProcess(torch_threads=1) as chapter:
            row = chapter.measure(train, test, 17, 4, 1, 1, workers=1)
    assert row["impl"] == "torch_chapter"
    assert row["notes"].startswith(f"1 DataLoader workers, started by {start_method}; 1 torch threads")
    assert all(t > 0 for t in row["step_ms_all"])
    assert not [w for w in seen if "fork" in str(w.message)]


@pytest.mark.skipif(not bench.torch_available() or sys.platform == "win32", reason="needs torch, POSIX signals")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_the_chapters_process_ends_with_the_benchmark(how):
    # Killed alone (SIGKILL, the OOM killer), the benchmark left the chapter's process measuring
    # on, an orphan; given Ctrl-C alone, it waited for that measurement to end before it did.
    import signal
    import time

    # SIGINT as Python sets it where nothing ignores it: a pytest started as a background job of
    # a non-interactive shell ignores SIGINT, its children inherit that, and this test then timed
    # out with the benchmark and its chapter process left measuring for as long as nobody looked.
    # (Set by the script: a preexec_fn would make subprocess fork, which JAX warns about.)
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "sys.path.insert(0, sys.argv[1]); import bench\n"
              "train, test = bench.synthetic_splits(64, 8)\n"
              "with bench.ChapterProcess(1) as chapter:\n"
              "    print(chapter._process.pid, flush=True)\n"
              "    chapter.measure(train, test, 17, 4, 1000, 1000, workers=0)\n")
    bench_run = subprocess.Popen([sys.executable, "-c", script, str(BENCHMARKS)], stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.DEVNULL)
    child = None
    try:
        child = int(bench_run.stdout.readline())
        time.sleep(3)  # measuring by now
        bench_run.send_signal(getattr(signal, how))
        bench_run.wait(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                child = None  # gone: its pid is not ours to signal any more
                return
            time.sleep(0.2)
        pytest.fail(f"the chapter's process outlived the benchmark ({how}) by 10 s")
    finally:  # whatever failed, nothing is left measuring beside the tests that follow
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        bench_run.kill()  # a no-op once it has been waited for
        bench_run.wait()
        bench_run.stdout.close()


@pytest.mark.skipif(not bench.torch_available(), reason="needs torch: the rounds of one implementation alone do not interleave")
def test_a_run_cut_off_in_its_second_round_keeps_its_first_round_whole(tmp_path, monkeypatch):
    # It saved the tuned and chapter rows pooled over two rounds beside JAX's of one, under
    # "pooled over 2 interleaved rounds", and compared them.
    calls, real = [], bench.bench_jax

    def jax_then_cut_off(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # round 2 runs it last: the others have their second round by then
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_jax", jax_then_cut_off)
    argv = ["--batch", "4", "--resize", "17", "--repeats", "1", "--rounds", "2", "--train-examples", "8",
            "--eval-examples", "8", "--torch-workers", "0", "--torch-threads", "1", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is False
    assert [r["impl"] for r in report["rows"]] == ["jax", "torch_tuned", "torch_chapter"]
    assert all(len(r["step_ms_all"]) == 1 and "rounds" not in r for r in report["rows"])
    assert "interleaved rounds" not in (tmp_path / "bench.md").read_text()


def test_full_recipe_times_fit_end_to_end():
    train, test = bench.synthetic_splits(8, 8)
    result = bench.bench_full_recipe(Config(epochs=1, batch_size=4, resize=17), train, test)
    assert result["epochs"] == 1 and result["train_examples"] == 8
    assert result["wall_s"] >= result["train_time_s"] + result["compile_s"] > 0
    assert 0 <= result["test_acc"] <= 1
    report = {"environment": bench.environment(["benchmarks/bench.py", "--full-recipe"]), "rows": [], "notes": [],
              "data": "synthetic uint8 noise", "full_recipe": result}
    md = bench.markdown(report)
    assert f"**{result['wall_s']:.1f} s** wall, compile included" in md and "chance level" in md
    assert sorted(result["compile_s_by_program"]) == ["eval_test", "shuffle", "train"]  # 8 = 2 x 4: no last batch
    assert "Its compile, program by program (trace, lower and compile): shuffle " in md


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--resize", "16"], 2, "--resize must be an integer in [17, 512]"),
        (["--batch", "0"], 2, "--batch must be a positive integer"),
        (["--data", "/nonexistent/cache.npz", "--resize", "17"], 1, "--data /nonexistent/cache.npz: No such file"),
        (["--data", "{tmp}/one.npy", "--resize", "17"], 1, "one.npy holds a single array (.npy); expected a resnet_jax array cache"),
        (["--data", "{tmp}/notes.txt", "--resize", "17"], 1, "notes.txt is not an .npy or .npz file"),
        (["--data", "{tmp}/other.npz", "--resize", "17"], 1, "other.npz is not a readable resnet_jax array cache"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(argv, code, message, capsys, tmp_path):
    import numpy as np

    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "notes.txt").write_text("not an array")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert bench.main(argv + ["--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_chapter_transform_is_resize_then_to_tensor():
    """The chapter's per-item transform equals resnet_jax's preprocess, bit for bit."""
    import numpy as np

    # In CI (test extras installed) a missing torch fails here rather than skipping.
    torch = __import__("torch") if os.environ.get("CI") else pytest.importorskip("torch")
    from PIL import Image

    from resnet_jax.data import preprocess

    images, _ = bench.synthetic_splits(2, 1)
    image = images.images[0]
    x = bench.chapter_transform(96)(Image.fromarray(image[..., 0]))
    assert isinstance(x, torch.Tensor) and x.shape == (1, 96, 96) and x.dtype == torch.float32
    ours = np.asarray(preprocess(image[None], 96))[0, ..., 0]
    np.testing.assert_array_equal(x[0].numpy(), ours)


def test_bench_never_imports_tensorflow():
    """GPU machines may have neither TensorFlow nor TFDS: the benchmark must not need them."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import bench; "
        "bench.synthetic_splits(4, 4); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_run_cut_off_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """A time limit (the GPU session's caps) can kill the run mid-way: what was measured is on disk."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the kill that the process would not survive

    monkeypatch.setattr(bench, "bench_torch_tuned", killed)
    monkeypatch.setattr(bench, "torch_available", lambda: True)
    argv = ["--batch", "4", "--resize", "17", "--repeats", "1", "--train-examples", "8", "--eval-examples", "8",
            "--torch-threads", "1", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is False and [r["impl"] for r in report["rows"]] == ["jax"]
    assert (tmp_path / "bench.md").read_text().startswith("**Partial")

    monkeypatch.setattr(bench, "torch_available", lambda: False)
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is True and not (tmp_path / "bench.md").read_text().startswith("**Partial")


def test_the_benchmark_times_the_masked_program_that_fit_runs(tmp_path):
    # 10 = 2 x 4 + 2: fit's epoch ends on a smaller batch, so its device loop (K = 2) masks every
    # step; the benchmark must time that program, and say so.
    argv = ["--batch", "4", "--resize", "17", "--repeats", "1", "--steps", "2", "--train-examples", "10",
            "--eval-examples", "8", "--no-torch", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    [row] = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert "masked" in row["notes"] and _positive(row["train_images_per_s"])


@pytest.mark.parametrize("script, argv, message", [
    ("cpu_step.py", ["--batch", "0"], "--batch must be a positive integer, got 0"),
    ("cpu_step.py", ["--impls", "foo"], "argument --impls: invalid choice: 'foo'"),
    ("cpu_conv.py", ["--resize", "3"], "--resize must be an integer in [17, 512]"),
    ("cpu_loop.py", ["--batch", "8"], "unrecognized arguments: --batch 8"),
    ("cpu_maxpool.py", ["--fast"], "unrecognized arguments: --fast"),
    ("cpu_mask.py", ["--rounds", "0"], "--rounds must be a positive integer, got 0"),
    ("cpu_mask.py", ["--resize", "8"], "--resize must be"),
    ("tpu_aot.py", ["--topology"], "argument --topology: expected at least one argument"),
])
def test_the_small_benchmark_scripts_refuse_bad_flags_in_one_line(script, argv, message):
    # Before any measuring: cpu_loop.py and cpu_maxpool.py used to ignore their arguments and
    # run, cpu_step.py and cpu_conv.py to fail with a traceback (or time an empty batch).
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)})
    assert r.returncode == 2 and r.stdout == "", r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"benchmarks/{script}: error: ") and message in line, line


# As on the GPU machine, where nothing is installed: `resnet_jax` is found only on a path that
# the script itself puts on sys.path (there, `python3 benchmarks/bench.py` failed at its first
# import until the scripts did so).
_NOT_INSTALLED = r'''
import importlib.machinery, runpy, sys
n_initial = len(sys.path)

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name != "resnet_jax":
            return None
        added = sys.path[: len(sys.path) - n_initial]  # the scripts insert at the front
        spec = importlib.machinery.PathFinder.find_spec(name, added)
        if spec is None:
            raise ModuleNotFoundError("No module named 'resnet_jax'", name=name)
        return spec

sys.meta_path.insert(0, NotInstalled())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.parametrize("script", ["bench.py", "cpu_conv.py", "cpu_loop.py", "cpu_mask.py", "cpu_maxpool.py",
                                    "cpu_step.py", "profile_step.py", "tpu_aot.py"])
def test_the_benchmark_scripts_run_from_a_checkout_with_nothing_installed(script, tmp_path):
    r = subprocess.run([sys.executable, "-c", _NOT_INSTALLED, str(BENCHMARKS / script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_the_tuned_pytorch_passes_its_compile_mode_and_names_it(monkeypatch):
    # torch.compile itself takes about a minute on 2 CPU cores: here it is recorded, not run.
    # In CI (test extras installed) a missing torch fails here rather than skipping.
    torch = __import__("torch") if os.environ.get("CI") else pytest.importorskip("torch")
    modes = []

    def fake_compile(fn, mode=None):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    train, test = bench.synthetic_splits(16, 8)
    row = bench.bench_torch_tuned(train, test, 17, 4, "float32", 1, 1, compile_model=True,
                                  eval_batch=8, compile_mode="reduce-overhead")
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the training and the evaluation forward
    assert row["label"] == "PyTorch, tuned (reduce-overhead)" and "torch.compile (mode reduce-overhead)" in row["notes"]
    row = bench.bench_torch_tuned(train, test, 17, 4, "float32", 1, 1, compile_model=True, eval_batch=8)
    assert modes[2:] == ["default", "default"] and row["label"] == "PyTorch, tuned"
