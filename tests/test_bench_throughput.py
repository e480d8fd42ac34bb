"""bench/train_throughput.py end to end on the tiny random Llama: every setup and both commands
produce numbers, and the numbers agree with each other where they must. The whole commands run
one round each (every command is a child process that starts Python and loads a model); the
mean over several rounds is checked on the script's own function."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench_module():
    spec = importlib.util.spec_from_file_location(
        "train_throughput", REPO / "bench/train_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_throughput_bench_measures_all_three_setups(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        str(REPO / "bench/train_throughput.py"),
        "--model=tiny-llama",
        "--dataset=samples",
        "--rows-per-step=2",
        "--warmup-steps=1",
        "--steps=1",
        "--command-steps=2",
        "--command-rounds=1",
        "--max-length=1024",
        f"--work-dir={tmp_path / 'work'}",
        f"--json={out}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())

    step = result["step"]
    for name in ("A", "T", "R"):
        s = step[name]
        assert s["steps"] == 1
        assert s["tokens"] > 0 and s["seconds"] > 0 and s["tokens_per_second"] > 0, name
    # A and R train the same rows in every step; R and T compute no padding, A does.
    assert step["A"]["tokens"] == step["R"]["tokens"]
    assert step["R"]["computed_tokens"] == step["R"]["tokens"]
    assert step["T"]["computed_tokens"] == step["T"]["tokens"]
    assert step["A"]["computed_tokens"] > step["A"]["tokens"]
    assert step["A"]["gradient_checkpointing"] is True
    assert step["R"]["attention"] != step["T"]["attention"] == "sdpa"  # per-sample vs plain
    assert step["ratio_R_T"] > 0 and step["ratio_R_A"] > 0

    command = result["command"]
    for name in ("T", "R"):
        c = command[name]
        assert c["steps_completed"] >= 2, name
        (one,) = c["rounds"]
        assert one["tokens"] == sum(s["tokens"] for s in one["per_step"]) == c["tokens"] > 0
        assert c["command_seconds"] > c["setup_and_train_seconds"] > c["train_seconds"] > 0
        assert c["tokens_per_second_every_step"] > 0
        assert c["tokens_per_second_first_step_left_out"] > 0
    assert command["R"]["steps_completed"] == 2
    for key in ("every_step", "first_step_left_out"):
        assert command[f"ratio_R_T_{key}"] > 0
    assert command["command_seconds_T_over_R"] > 0
    assert (tmp_path / "work/r-command-0/final/adapter_model.safetensors").is_file()
    assert (tmp_path / "work/t-command/final/adapter_model.safetensors").is_file()
    assert "| R |" in done.stdout and "R/T" in done.stdout


def test_command_rounds_are_averaged_number_by_number() -> None:
    averaged = bench_module().averaged
    rounds = [
        {"command": "x", "steps_completed": 2, "seconds": 1.0, "ok": True, "per_step": [1]},
        {"command": "x", "steps_completed": 2, "seconds": 3.0, "ok": True, "per_step": [2]},
    ]
    got = averaged(rounds)
    # Numbers averaged (equal ones kept as they are), other values from the first round, every
    # round kept whole; the first round's steps are not passed off as the mean's.
    assert got == {
        "command": "x",
        "ok": True,
        "steps_completed": 2,
        "seconds": 2.0,
        "rounds": rounds,
    }
