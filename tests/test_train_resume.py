"""Resume after SIGKILL: the real CLI in a subprocess, killed after its first checkpoint, rerun
with the same command, ends with the same weights as an uninterrupted run (tolerance 1e-6)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_train_support import cli_env, tiny_config, write_yaml_config

pytestmark = pytest.mark.slow


def _command(config_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reasonguard",
        "train",
        "sft",
        "--config",
        str(config_path),
        *overrides,
    ]


def _run(config_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        _command(config_path, *overrides),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigkilled_run_resumes_to_the_same_final_weights(tmp_path: Path) -> None:
    # 16 train rows, 4 per step, 3 epochs: 12 steps, a checkpoint every 3, LoRA dropout on (so
    # the RNG state must be restored too), an eval every 6 steps.
    config = tiny_config(
        tmp_path,
        rows=20,
        num_train_epochs=3,
        eval_steps=6,
        save_steps=3,
        save_total_limit=2,
        lora_dropout=0.1,
        logging_steps=2,
    )
    path = write_yaml_config(tmp_path / "resume.yaml", config)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    _run(path, f"output_dir={straight}")

    proc = subprocess.Popen(
        _command(path, f"output_dir={killed}"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        # Complete checkpoints only: transformers writes trainer_state.json last.
        while not list(killed.glob("checkpoint-*/trainer_state.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # this process only, by its pid
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "final").exists()
    status = json.loads((killed / "status.json").read_text())
    assert status["state"] == "running"  # a SIGKILLed process writes nothing more

    resumed = _run(path, f"output_dir={killed}")
    assert "resuming from" in resumed.stdout
    info = json.loads((killed / "training_info.json").read_text())
    assert info["outcome"] == "finished" and info["resumed_from"]
    resumed_step = int(Path(info["resumed_from"][0]).name.split("-")[1])
    assert 0 < resumed_step < info["plan"]["total_steps"] == 12

    expected = load_file(straight / "final/adapter_model.safetensors")
    got = load_file(killed / "final/adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    # The metrics log holds each step once, as if the run had never stopped.
    steps = [
        e["step"]
        for e in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
        if "train_loss" in e
    ]
    assert steps == sorted(set(steps))
