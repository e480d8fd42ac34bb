"""Helpers for the classifier tests: a small MiniLM config and a teacher's predictions folder.

Kept in a `test_*` module (collected, but it holds no tests) so the classifier test files can
`from test_classifier_support import ...`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import guard_output
from reasonguard.format import INSTRUCTION, render_input


def small_config(tmp_path: Path, **overrides: Any) -> Any:
    """All-MiniLM-L6-v2 on the first 10 sample rows of each split (35 train, 4 held out), 64
    tokens, 9 steps."""
    from reasonguard.classifier.config import ClassifierConfig

    settings: dict[str, Any] = {
        "model_name_or_path": "minilm",
        "dataset": "samples",
        "max_samples": 10,
        "max_length": 64,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 12,
        "learning_rate": 2e-4,
        "warmup_steps": 0,
        "logging_steps": 1,
        "report_to": "none",
        "save_total_limit": 1,
        "output_dir": str(tmp_path / "run"),
    }
    settings.update(overrides)
    return ClassifierConfig(**settings)


def prediction_row(
    prompt: str,
    response: str | None,
    request: str,
    completion: str = "None",
    answer: str = "None",
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of `<Benchmark>/generated_predictions.jsonl` as `generate` writes it."""
    row: dict[str, Any] = {
        "prompt": f"{INSTRUCTION}\n{render_input(prompt, response)}",
        "label": "unharmful",  # the benchmark's label: never what a student should learn
        "predict": guard_output(request, completion, answer),
        "truncated": False,
        "num_tokens": 50,
    }
    if scores is not None:
        row["scores"] = scores
    return row


def write_predictions(folder: Path, benchmark: str, rows: list[dict[str, Any]] | str) -> Path:
    """Write `folder/<benchmark>/generated_predictions.jsonl` (rows as JSONL, or raw text)."""
    path = folder / benchmark / "generated_predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def write_yaml(path: Path, config: Any) -> Path:
    from reasonguard.train.config import save_config

    return save_config(config, path)
