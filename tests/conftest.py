"""Shared test fixtures.

`shared_dir` is the project's `shared/` folder (benchmarks, released predictions, paper tables),
read from `$REASONGUARD_SHARED` or found beside the checkout. Tests never copy its files into the
repository. When it is missing, tests that need it fail under CI and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder; fails under CI (never silently skips) when it is absent."""
    env = os.environ.get("REASONGUARD_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    if (path / "data").is_dir():
        return path
    message = f"shared data not found at {path} (set REASONGUARD_SHARED)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(f"{message}; under CI this fails instead")


def guard_output(request: str, completion: str = "None", response: str = "None") -> str:
    """A model output in the GuardReasoner layout with the given answers."""
    return (
        "# Task 1\n\n## Reasoning Step 1\nSome reasoning.\n\n---\n\n"
        f"Answers: \nRequest: {request}\nCompletion: {completion}\nResponse: {response}"
    )


class EvalCase:
    """A temporary benchmark folder and predictions folder, written row by row by a test."""

    def __init__(self, root: Path) -> None:
        self.preds = root / "preds"
        self.bench = root / "bench"
        self.out = root / "out"
        self.preds.mkdir()
        self.bench.mkdir()

    def benchmark(self, stem: str, rows: list[dict] | str | bytes) -> Path:
        """Write `bench/<stem>.json` (rows as a JSON array, or raw text/bytes)."""
        return _write(self.bench / f"{stem}.json", rows, json_lines=False)

    def predictions(self, name: str, rows: list[dict] | str | bytes) -> Path:
        """Write `preds/<name>/generated_predictions.jsonl` (rows as JSONL, or raw text/bytes)."""
        folder = self.preds / name
        folder.mkdir(exist_ok=True)
        return _write(folder / "generated_predictions.jsonl", rows, json_lines=True)


def _write(path: Path, rows: list[dict] | str | bytes, json_lines: bool) -> Path:
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    elif isinstance(rows, str):
        path.write_text(rows, encoding="utf-8")
    elif json_lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture
def eval_case(tmp_path: Path) -> EvalCase:
    return EvalCase(tmp_path)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `reasonguard ARGS...` in-process; return (exit code, stdout, stderr)."""
    from reasonguard.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
