"""bench/train_throughput.py end to end on the tiny random Llama: every setup and both commands
produce numbers, and the numbers agree with each other where they must."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
        "--command-rounds=2",
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
        assert len(c["rounds"]) == 2, name
        for one in c["rounds"]:  # the same rows in both rounds
            assert one["tokens"] == sum(s["tokens"] for s in one["per_step"]) == c["tokens"] > 0
        assert c["command_seconds"] > c["setup_and_train_seconds"] > c["train_seconds"] > 0
        assert c["tokens_per_second_every_step"] > 0
        assert c["tokens_per_second_first_step_left_out"] > 0
    assert command["R"]["steps_completed"] == 2
    assert (tmp_path / "work/r-command-1/final/adapter_model.safetensors").is_file()
    assert (tmp_path / "work/t-command/final/adapter_model.safetensors").is_file()
    assert "| R |" in done.stdout and "R/T" in done.stdout
