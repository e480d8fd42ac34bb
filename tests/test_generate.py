"""`reasonguard generate` end to end on the tiny random Llama: layouts, order, flags, and resuming
after a partial write or a SIGKILL mid-run (exactly one row per input, same rows as a clean run)."""

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
from reasonguard.format import INSTRUCTION, render_input, render_target

PRED = "generated_predictions.jsonl"


def _prompt_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": INSTRUCTION,
            "input": render_input(f"Question {i}: " + "how do plants grow? " * (i % 5 + 1)),
            "output": "harmful" if i % 3 == 0 else "unharmful",
        }
        for i in range(n)
    ]


def _response_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": INSTRUCTION,
            "input": render_input(f"Request {i}", "Sure. " * (i + 1)),
            "output": "unharmful",
        }
        for i in range(n)
    ]


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "0_1_AegisSafetyTest.json").write_text(json.dumps(_prompt_rows(7)))
    (folder / "0_5_harmbench_response.json").write_text(json.dumps(_response_rows(3)))
    return folder


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _generate(bench: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model", "tiny-llama", "--benchmark-dir", str(bench), "--out", str(out),
        "--no-progress", "--max-new-tokens", "6", *extra,
    ]  # fmt: skip


def test_benchmarks_official_layout(bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds"
    assert main(_generate(bench_dir, out, "--benchmarks", "all", "--batch-size", "3")) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "AegisSafetyTest",
        "HarmBenchResponse",
        "_generate",
    ]
    rows = _rows(out / "AegisSafetyTest" / PRED)
    source = _prompt_rows(7)
    assert [r["prompt"] for r in rows] == [f"{s['instruction']}\n{s['input']}" for s in source]
    assert [r["label"] for r in rows] == [s["output"] for s in source]
    for r in rows:
        assert set(r) == {"prompt", "label", "predict", "truncated", "num_tokens"}
        assert isinstance(r["predict"], str) and r["num_tokens"] <= 6
        assert r["truncated"] == (r["num_tokens"] == 6)
    assert len(_rows(out / "HarmBenchResponse" / PRED)) == 3
    # The evaluator reads the folder as it is (the `_generate` state folder is skipped).
    from reasonguard.evaluate.evaluator import evaluate_predictions

    metrics = evaluate_predictions(out, bench_dir, protocol="strict")
    assert metrics is not None


def test_samples_limit_and_extending_the_limit(bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds"
    args = _generate(bench_dir, out, "--benchmarks", "AegisSafetyTest", "--samples", "2")
    args += ["--temperature", "0.8", "--top-p", "0.9"]
    assert main([*args, "--limit", "3"]) == 0
    rows = _rows(out / "AegisSafetyTest" / PRED)
    assert len(rows) == 3
    assert all(len(r["samples"]) == 2 and r["predict"] == r["samples"][0] for r in rows)
    assert main([*args, "--limit", "5"]) == 0
    extended = _rows(out / "AegisSafetyTest" / PRED)
    assert len(extended) == 5 and extended[:3] == rows


def test_training_data_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    records = [
        {
            "input": render_input(f"Question {i}"),
            "output": render_target("R.", "unharmful", None, None),
        }
        for i in range(4)
    ]
    (data / "AegisTrainR.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "ToxicChatTrainR.json").write_text(json.dumps(records[:2]))
    out = tmp_path / "samples"
    args = ["generate", "--model", "tiny-llama", "--data", str(data), "--splits", "ToxicChatTrainR"]
    args += ["--out", str(out), "--samples", "3", "--temperature", "0.7", "--top-p", "0.95"]
    assert main([*args, "--max-new-tokens", "4", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ToxicChatTrainR.jsonl", "_generate"]
    rows = _rows(out / "ToxicChatTrainR.jsonl")
    assert [r["input"] for r in rows] == [r["input"] for r in records[:2]]
    for row, record in zip(rows, records, strict=False):
        assert row["instruction"] == INSTRUCTION and row["output"] == record["output"]
        assert row["source"] == "ToxicChatTrainR"
        assert len(row["samples"]) == 3 and len(row["samples_truncated"]) == 3


def test_resume_after_a_partial_write(bench_dir: Path, tmp_path: Path) -> None:
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    args = ["--benchmarks", "AegisSafetyTest", "--batch-size", "2"]
    assert main(_generate(bench_dir, clean, *args)) == 0
    expected = (clean / "AegisSafetyTest" / PRED).read_text()
    assert main(_generate(bench_dir, broken, *args, "--limit", "1")) == 0  # manifest + 1 row
    lines = expected.splitlines(keepends=True)
    # Five complete rows (the middle of the second window of 4) and half of the sixth.
    (broken / "AegisSafetyTest" / PRED).write_text("".join(lines[:5]) + lines[5][:40])
    assert main(_generate(bench_dir, broken, *args)) == 0
    assert (broken / "AegisSafetyTest" / PRED).read_text() == expected


@pytest.mark.slow  # a generation run in a child process, killed and rerun
def test_resume_after_sigkill(bench_dir: Path, tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["--benchmarks", "AegisSafetyTest", "--batch-size", "1", "--max-new-tokens", "40"]
    assert main(_generate(bench_dir, clean, *args)) == 0
    expected = (clean / "AegisSafetyTest" / PRED).read_text()
    target = killed / "AegisSafetyTest" / PRED
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reasonguard", *_generate(bench_dir, killed, *args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if target.exists() and target.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = target.read_text().count("\n")
    assert 2 <= written < 7, "the run must be killed mid-way"
    assert main(_generate(bench_dir, killed, *args)) == 0
    assert target.read_text() == expected


def test_rerun_with_other_settings_is_refused(
    bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "preds"
    assert main(_generate(bench_dir, out, "--benchmarks", "AegisSafetyTest", "--limit", "1")) == 0
    code = main(_generate(bench_dir, out, "--benchmarks", "AegisSafetyTest", "--seed", "3"))
    assert code == 2
    assert "seed: 0 -> 3" in capsys.readouterr().err


def test_user_errors(bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o")
    assert main(_generate(bench_dir, Path(out), "--benchmarks", "AegisSafetyTst")) == 2
    assert "did you mean AegisSafetyTest" in capsys.readouterr().err
    assert main(_generate(bench_dir, Path(out), "--benchmarks", "ToxicChat")) == 2
    assert "benchmark file not found" in capsys.readouterr().err
    args = _generate(bench_dir, Path(out), "--benchmarks", "all", "--samples", "2")
    assert main(args) == 2
    assert "--temperature > 0" in capsys.readouterr().err
