"""`reasonguard generate --data-parallel N` on the tiny random Llama: two worker processes write
the same files as one process (greedy benchmarks; sampled training data with 2 samples), a run
whose whole process group is SIGKILLed mid-way resumes to the same files, and a worker's error
reaches the user with its shard number."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonguard.cli import main
from reasonguard.format import INSTRUCTION, render_input
from reasonguard.generation.parallel import shard_ranges

PRED = "generated_predictions.jsonl"
# Batch size 1: windows of 4 rows, so 16 rows make 4 windows, 2 per worker.
BENCH_ARGS = ["--benchmarks", "all", "--batch-size", "1", "--max-new-tokens", "8"]


def test_shard_ranges_cover_the_rows_on_window_boundaries() -> None:
    for done, total, window, shards in [(0, 16, 4, 2), (5, 30, 4, 3), (0, 3, 4, 2), (9, 9, 4, 2)]:
        ranges = shard_ranges(done, total, window, shards)
        assert len(ranges) == shards
        spans = [r for r in ranges if r is not None]
        rows = [i for first, stop in spans for i in range(first, stop)]
        assert rows == list(range(done, total))  # contiguous, in order, each row once
        assert all(first % window == 0 for first, _ in spans[1:])
        assert all(stop % window == 0 for _, stop in spans[:-1])
    assert shard_ranges(0, 16, 4, 2) == [(0, 8), (8, 16)]
    assert shard_ranges(5, 30, 4, 3) == [(5, 16), (16, 24), (24, 30)]
    assert shard_ranges(0, 3, 4, 2) == [(0, 3), None]  # one window: one worker


def _generate(bench: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model", "tiny-llama", "--benchmark-dir", str(bench), "--out", str(out),
        "--no-progress", *BENCH_ARGS, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A benchmark folder (16 + 3 rows) and its one-process outputs."""
    root = tmp_path_factory.mktemp("dp")
    folder = root / "benchmarks"
    folder.mkdir()
    prompts = [
        {
            "instruction": INSTRUCTION,
            "input": render_input(f"Question {i}: " + "how do plants grow? " * (i % 5 + 1)),
            "output": "harmful" if i % 3 == 0 else "unharmful",
        }
        for i in range(16)
    ]
    responses = [
        {
            "instruction": INSTRUCTION,
            "input": render_input(f"Request {i}", "Sure. " * (i + 1)),
            "output": "unharmful",
        }
        for i in range(3)
    ]
    (folder / "0_1_AegisSafetyTest.json").write_text(json.dumps(prompts))
    (folder / "0_5_harmbench_response.json").write_text(json.dumps(responses))
    reference = root / "one-process"
    assert main(_generate(folder, reference)) == 0
    return folder, reference


def _same_outputs(out: Path, reference: Path) -> None:
    for name in ("AegisSafetyTest", "HarmBenchResponse"):
        expected = (reference / name / PRED).read_text()
        assert (out / name / PRED).read_text() == expected, name
    # The shards are merged and gone: the folder is what one process leaves.
    assert sorted(p.name for p in out.iterdir()) == [
        "AegisSafetyTest",
        "HarmBenchResponse",
        "_generate",
    ]
    assert sorted(p.name for p in (out / "_generate").iterdir()) == [
        "cost",
        "lock",
        "manifest.json",
    ]
    # The workers' timing is summed into the run's: no row is counted twice (rows a killed
    # worker wrote after its last timing update are not counted).
    from reasonguard.generation.run import read_cost

    for name in ("AegisSafetyTest", "HarmBenchResponse"):
        rows = len((out / name / PRED).read_text().splitlines())
        cost = read_cost(out, f"{name}/{PRED}")
        assert 0 < cost["rows"] <= rows and cost["seconds"] > 0


@pytest.mark.slow
def test_two_workers_write_what_one_process_writes(
    bench: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, reference = bench
    out = tmp_path / "dp"
    assert main(_generate(folder, out, "--data-parallel", "2")) == 0
    _same_outputs(out, reference)
    from reasonguard.generation.run import read_cost

    for name, rows in (("AegisSafetyTest", 16), ("HarmBenchResponse", 3)):
        assert read_cost(out, f"{name}/{PRED}")["rows"] == rows  # each row counted once
    # A rerun finds everything done and starts no worker.
    assert main(_generate(folder, out, "--data-parallel", "2")) == 0
    _same_outputs(out, reference)


@pytest.mark.slow
def test_sampled_training_data_with_two_workers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    records = [{"input": render_input(f"Question {i}: " + "why? " * i)} for i in range(10)]
    (data / "AegisTrainR.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["generate", "--model", "tiny-llama", "--data", str(data), "--samples", "2"]
    args += ["--temperature", "0.7", "--top-p", "0.95", "--max-new-tokens", "6", "--no-progress"]
    args += ["--batch-size", "2"]  # windows of 8 rows: workers get rows 0-7 and 8-9
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    assert main([*args, "--out", str(two), "--data-parallel", "2"]) == 0
    expected = (one / "AegisTrainR.jsonl").read_text()
    rows = [json.loads(line) for line in expected.splitlines()]
    assert [r["input"] for r in rows] == [r["input"] for r in records]
    assert all(len(r["samples"]) == 2 for r in rows)
    assert len({s for r in rows for s in r["samples"]}) > 10  # sampled, not one text repeated
    assert (two / "AegisTrainR.jsonl").read_text() == expected


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_outputs(bench: tuple[Path, Path], tmp_path: Path) -> None:
    folder, reference = bench
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "reasonguard", *_generate(folder, out, "--data-parallel", "2")]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the parent and both workers
    )
    shards = out / "_generate" / "shards"
    deadline = time.monotonic() + 120
    written: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        files = sorted(shards.glob(f"*/AegisSafetyTest/{PRED}"))
        written = [f.read_bytes().count(b"\n") for f in files]
        if len(written) == 2 and min(written) >= 1:
            break  # both workers have written rows
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(written) == 2 and min(written) >= 1 and sum(written) < 16, written
    assert (out / "AegisSafetyTest" / PRED).read_text() == ""  # nothing merged yet
    # A worker killed inside its timing update leaves the half-written file beside it; where
    # its shard is not redone (finished, or of another plan) nothing overwrites it. The kill
    # lands there only sometimes: make it certain, as the resumed run must clean it too.
    from reasonguard.generation.jobs import cost_path

    timing = cost_path(shards / "900-1000", f"AegisSafetyTest/{PRED}")
    timing.parent.mkdir(parents=True, exist_ok=True)
    timing.with_name(timing.name + ".tmp").write_text('{"seconds": 1.')
    assert main(_generate(folder, out, "--data-parallel", "2")) == 0
    _same_outputs(out, reference)


@pytest.mark.slow
def test_worker_errors_name_the_shard(
    bench: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = bench
    broken = tmp_path / "adapter"  # a LoRA folder that does not say which base model it needs
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    args = _generate(folder, tmp_path / "o", "--data-parallel", "2")
    args[args.index("tiny-llama")] = str(broken)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: data-parallel shard" in err
    assert "a LoRA adapter without a recorded base model" in err
    assert main(_generate(folder, tmp_path / "o", "--data-parallel", "0")) == 2
    assert "--data-parallel must be at least 1" in capsys.readouterr().err
