"""`reasonguard evaluate --model`: generate on the benchmarks, then score, in one resumable
command (tiny random Llama on the first rows of two real benchmark files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reasonguard.cli import main
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE

NAMES = ("AegisSafetyTest", "HarmBenchResponse")  # a prompt task and a response task
ROWS = 3


@pytest.fixture
def bench_dir(shared_dir: Path, tmp_path: Path) -> Path:
    """The first rows of two real benchmark files, in a temporary folder."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for name in NAMES:
        filename = BENCHMARKS[name].filename
        rows = json.loads((shared_dir / "data" / "benchmarks" / filename).read_text())
        (folder / filename).write_text(json.dumps(rows[:ROWS]))
    return folder


@pytest.fixture
def keep_threads():
    """`--threads` sets torch's process-wide thread count; restore it for later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _evaluate(bench: Path, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate", "--model", "tiny-llama", "--benchmarks", ",".join(NAMES),
        "--benchmark-dir", str(bench), "--out", str(out), "--max-new-tokens", "4",
        "--batch-size", "2", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def test_generates_scores_and_resumes(
    bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], keep_threads: None
) -> None:
    out = tmp_path / "eval"
    assert main(_evaluate(bench_dir, out)) == 0
    assert torch.get_num_threads() == 1  # --threads reached torch
    first = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions", "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "tiny-llama"
    assert metrics["predictions"] == str(out / "predictions")
    pairs = {(r["benchmark"], r["task"]): r for r in metrics["benchmarks"]}
    assert set(pairs) == {("AegisSafetyTest", "prompt"), ("HarmBenchResponse", "response")}
    assert all(r["n"] == ROWS for r in pairs.values())
    # Random weights write no answers: every row is a parse failure, counted, never dropped.
    assert all(r["parse_failures"] == ROWS for r in pairs.values())
    assert "score_metrics" not in pairs["AegisSafetyTest", "prompt"]  # no --scores
    assert (out / "report.md").read_text() == first.out

    files = {name: out / "predictions" / name / PREDICTIONS_FILE for name in NAMES}
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    assert all(len(path.read_text().splitlines()) == ROWS for path in files.values())
    # The same command again: nothing is regenerated, the scores are the same.
    assert main(_evaluate(bench_dir, out)) == 0
    again = capsys.readouterr()
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == stamps
    for name in NAMES:
        assert f"{name}: all {ROWS} rows already generated" in again.err
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_limit_scores_the_first_rows_and_scores_option(
    bench_dir: Path, tmp_path: Path, keep_threads: None
) -> None:
    out = tmp_path / "eval"
    assert main(_evaluate(bench_dir, out, "--limit", "2", "--scores")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["n"] for r in metrics["benchmarks"]} == {2}
    assert "only the first 2 rows" in metrics["notes"][0]
    # Rows carry scores (None here: random weights write no answer line to score).
    path = out / "predictions" / "HarmBenchResponse" / PREDICTIONS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(
        set(r["scores"]) == {"prompt_harmfulness", "response_refusal", "response_harmfulness"}
        for r in rows
    )
    score = next(r for r in metrics["benchmarks"] if r["task"] == "response")["score_metrics"]
    assert (score["rows"], score["no_score"], score["auprc"]) == (0, 2, None)
    assert "## Scores" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give PRED_DIR (score existing predictions) or --model M"),
        (["preds", "--model", "tiny-llama"], "give PRED_DIR"),
        (["preds", "--benchmarks", "all", "--scores"], "--benchmarks, --scores: only with --model"),
    ],
)
def test_user_errors(
    args: list[str], message: str, bench_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--benchmark-dir", str(bench_dir)] if "--model" in args else []
    assert main(["evaluate", *args, *extra]) == 2
    assert message in capsys.readouterr().err
