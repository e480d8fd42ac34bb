"""`reasonguard runs status RUN_DIR`: a live run's progress from another terminal."""

from __future__ import annotations

import json
import os
from pathlib import Path

from reasonguard.train.monitor import base_status, format_duration, write_status


def test_status_of_a_live_run(tmp_path: Path, cli) -> None:
    status = base_status(tmp_path, "sft")  # this process: alive
    status.update(
        state="running",
        step=120,
        total_steps=300,
        epoch=1.2,
        train_loss=0.8123,
        eval_loss=0.85,
        best_eval_loss=0.84,
        tokens_per_second=2345.6,
        elapsed_seconds=600,
        eta_seconds=900,
        checkpoints=["checkpoint-100"],
        gpu_memory={
            "allocated_gib": 10.0,
            "reserved_gib": 12.0,
            "max_allocated_gib": 11.5,
            "max_reserved_gib": 13.0,
            "total_gib": 80.0,
        },
        warnings=["eval loss has not improved for 3 evaluations"],
    )
    write_status(tmp_path, status)
    code, out, _ = cli("runs", "status", tmp_path)
    assert code == 0
    for text in (
        "state        running",
        "120/300",
        "epoch 1.20",
        "0.8123",
        "0.8500",
        "2,346 tokens/s",
        "ETA 15m00s",
        "checkpoint-100",
        "10.0 GiB allocated (11.5 GiB peak), 12.0 GiB reserved (13.0 GiB peak), 80.0 GiB total",
        "not improved for 3 evaluations",
    ):
        assert text in out, text
    code, out, _ = cli("runs", "status", tmp_path, "--json")
    assert json.loads(out)["step"] == 120


def test_status_says_when_the_process_is_gone(tmp_path: Path, cli) -> None:
    status = base_status(tmp_path, "sft")
    status.update(state="running", step=5, total_steps=10, pid=2**22 + 12345)  # no such process
    write_status(tmp_path, status)
    code, out, _ = cli("runs", "status", tmp_path)
    assert code == 0 and "process" in out and "is gone" in out and "resume" in out
    assert os.getpid() != status["pid"]


def test_status_of_a_folder_that_is_not_a_run(tmp_path: Path, cli) -> None:
    code, _, err = cli("runs", "status", tmp_path)
    assert code == 2 and "no status.json" in err


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 5, 65, 3725, 90000)] == [
        "?",
        "5s",
        "1m05s",
        "1h02m",
        "1d01h",
    ]
