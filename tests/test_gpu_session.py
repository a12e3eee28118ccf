"""benchmarks/gpu_session.py without a GPU: its tables, its time budget, its cut-offs, its files."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_session  # noqa: E402


def _epoch(epoch, acc, wall):
    return {"epoch": epoch, "test_acc": acc, "wall_s": wall}


def test_the_table_gives_the_first_epoch_at_each_goal_on_fits_clock():
    history = [_epoch(1, 0.91, 10.0), _epoch(2, 0.945, 14.5), _epoch(3, 0.951, 19.0), _epoch(4, 0.949, 23.5)]
    done = {"name": "best", "status": "ok", "process_wall_s": 31.0,
            "result": {"epochs": 4, "test_acc": 0.949, "train_acc": 0.96, "wall_time_s": 24.0, "compile_s": 6.5,
                       "history": history}}
    skipped = {"name": "d2l-seed2", "status": "skipped", "why": "5 s of the budget left, 40 s needed"}
    lines = gpu_session.runs_table([done, skipped]).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    # 0.93 and 0.94 first reached at epoch 2, 0.95 at epoch 3; 0.955 never.
    assert lines[2] == ("| best | ok | 4 | 0.9490 | 0.9600 | ep 2, 14.5 s | ep 2, 14.5 s | ep 3, 19.0 s | - "
                        "| 6.5 | 24.0 | 31.0 |")
    assert lines[3].startswith("| d2l-seed2 | skipped |")


def _data(tmp_path):
    cache = tmp_path / "data" / gpu_session.NPZ
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")  # only its presence is checked before the steps
    return tmp_path / "data"


def test_an_exhausted_budget_skips_every_run_and_says_so(tmp_path):
    out = tmp_path / "out"
    assert gpu_session.main(["--data", str(_data(tmp_path)), "--out", str(out), "--budget", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["runs.jsonl", "session.log", "summary.md"]
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    # best twice (a first run, a cached one), the bf16 recipe three ways (cold, cached, autotuning
    # off), the profile, bench three times (with PyTorch, then JAX alone at K=47 and without the
    # mask), every sweep variant, three d2l seeds, the two further benches: each skipped.
    assert len(runs) == 2 + 3 + 1 + 3 + len(gpu_session.SWEEP) + 3 + 2
    assert {r["status"] for r in runs} == {"skipped"}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU session") and "jax" in summary and "no run finished" in summary


def test_a_run_past_its_cap_is_killed_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_session.LIMITS, "best", (0, 1))
    out = tmp_path / "out"
    out.mkdir()
    session = gpu_session.Session(out, budget=60, dry_run=True, data=tmp_path)
    t0 = time.monotonic()
    rec = session.run("best", "sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    assert time.monotonic() - t0 < 20
    assert rec["status"] == "cut off after 1 s" and "result" not in rec
    assert "started" in (out / "session.log").read_text()
    assert json.loads((out / "runs.jsonl").read_text())["status"] == rec["status"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "best,tune"], "unknown step(s) 'tune'"),
    (["--steps", ""], "unknown step(s) ''"),
    (["--data", "/nonexistent"], "no array cache at /nonexistent/"),
    (["--budget", "-5"], "--budget must be a number of seconds >= 0, got -5.0"),
    (["--budget", "nan"], "--budget must be a number of seconds >= 0, got nan"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    base = {"--data": str(_data(tmp_path)), "--out": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_:
        gpu_session.main([a for kv in base.items() for a in kv])
    [line] = capsys.readouterr().err.strip().splitlines()  # one line, not argparse's usage block first
    assert exit_.value.code == 2 and message in line
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as exit_:
        gpu_session.main(["--data", str(_data(tmp_path)), "--out", str(tmp_path / "f")])
    assert exit_.value.code == 2 and f"--out {tmp_path / 'f'} is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("machine, expected", [(None, "--xla_gpu_autotune_level=0"),
                                               ("--xla_gpu_enable_triton_gemm=false",
                                                "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0")])
def test_the_autotuning_row_keeps_the_machines_xla_flags(tmp_path, monkeypatch, machine, expected):
    # Autotuning must be the one difference from the cold row: the machine's own XLA_FLAGS stay.
    if machine is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", machine)
    session = gpu_session.Session(tmp_path, budget=60, dry_run=True, data=tmp_path)
    envs = []
    monkeypatch.setattr(session, "run", lambda step, name, argv, env=None: envs.append(env) or {"name": name, "status": "ok"})
    session.recipe()
    assert envs == [None, None, {"XLA_FLAGS": expected}]
