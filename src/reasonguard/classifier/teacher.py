"""A teacher's predictions as classifier training items (distillation).

The folder is what `generate` writes on benchmarks, and what the released GuardReasoner
predictions are: `<Benchmark>/generated_predictions.jsonl`, one row per benchmark row with
`prompt` (the instruction, a newline, then the rendered input), `predict` (the teacher's output)
and, from `generate --scores` or fast mode, `scores` (the teacher's label probabilities). Each
row gives one item: its request and response from `prompt`, its targets from `predict` (the
labels `format.parse_output` reads) or, where `scores` holds a probability for the task, that
probability (a soft target). The benchmark's own `label` is never read: the classifier learns
what the teacher answered.

A row without a readable `prompt` or answer block, a malformed line, or a predictions file with
fewer or more rows than its benchmark file (when `benchmark_dir` is given) is an error naming
the file and line; `skip_invalid` drops such rows and counts them instead.

Example:
    >>> from reasonguard.classifier.teacher import teacher_items
    >>> items, summary = teacher_items("predictions/GuardReasoner-1B", skip_invalid=True)
    >>> summary["skipped_rows"], items[0].targets  # doctest: +SKIP
    (3, {'prompt': 1.0, 'response': None, 'refusal': None})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reasonguard.classifier.items import LabelledItem, asked
from reasonguard.errors import UserError, where
from reasonguard.format import POSITIVE_LABEL, TASK_FIELD, TASKS, parse_output, split_input

_INPUT_START = "Human user:\n"


class _Problems:
    """Raises on the first bad row, or (skip) counts it and keeps the first few messages."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.count = 0
        self.examples: list[str] = []

    def add(self, message: str) -> None:
        if not self.skip:
            raise UserError(f"{message} (set skip_invalid: true to skip such rows and count them)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def split_prompt(prompt: Any) -> tuple[str, str | None]:
    """The request and response inside a prediction row's `prompt` (instruction + input).

    Raises:
        ValueError: not a string holding `Human user:\\n...\\n\\nAI assistant:\\n...\\n\\n`.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"expected a string, got {type(prompt).__name__}")
    start = prompt.find(_INPUT_START)
    if start < 0:
        raise ValueError("no 'Human user:' input after the instruction")
    return split_input(prompt[start:])


def _soft(scores: Any, task: str) -> float | None:
    """The teacher's probability of the task's positive label, if the row gives one.

    Raises:
        ValueError: a `scores` entry for the task that is not a probability.
    """
    if scores is None:
        return None
    if not isinstance(scores, dict):
        raise ValueError(f"expected an object, got {type(scores).__name__}")
    probs = scores.get(TASK_FIELD[task])
    if probs is None:
        return None
    p = probs.get(POSITIVE_LABEL[task]) if isinstance(probs, dict) else None
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(
            f"{TASK_FIELD[task]!r}: expected {{{POSITIVE_LABEL[task]!r}: probability}}, got {probs!r}"
        )
    return float(p)


def _row_item(row: Any, place: str) -> LabelledItem:
    """One prediction row as an item (raises ValueError naming the field)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    try:
        prompt, response = split_prompt(row.get("prompt"))
    except ValueError as exc:
        raise ValueError(f"field 'prompt': {exc}") from None
    predict = row.get("predict")
    if not isinstance(predict, str):
        problem = "missing" if "predict" not in row else "expected a string"
        raise ValueError(f"field 'predict': {problem}")
    verdict = parse_output(predict, row.get("truncated") is True)
    if verdict.is_parsing_error:
        raise ValueError(
            "field 'predict': the teacher's output has no readable answer block "
            "('Request: harmful|unharmful', then Completion / Response in their vocabulary)"
        )
    targets: dict[str, float | None] = dict.fromkeys(TASKS)
    for task in asked(response):
        label = verdict.label(task)
        if label is None:
            continue
        try:
            soft = _soft(row.get("scores"), task)
        except ValueError as exc:
            raise ValueError(f"field 'scores': {exc}") from None
        targets[task] = soft if soft is not None else float(label == POSITIVE_LABEL[task])
    return LabelledItem(prompt, response, targets, place, soft=row.get("scores") is not None)


def teacher_items(
    folder: str | os.PathLike[str],
    skip_invalid: bool = False,
    benchmark_dir: str | os.PathLike[str] | None = None,
    max_samples: int | None = None,
) -> tuple[list[LabelledItem], dict[str, Any]]:
    """Every benchmark file of a predictions folder as training items, file by file.

    Args:
        folder: the predictions folder.
        skip_invalid: drop and count bad rows instead of stopping at the first.
        benchmark_dir: when given, each file must hold as many rows as its benchmark file.
        max_samples: at most this many items per file (the first ones).

    Returns:
        (items, summary for training_info.json: files, rows, soft targets, skipped rows).

    Raises:
        UserError: no such folder or no benchmark folder in it, a benchmark folder without its
            predictions file, a file whose row count differs from its benchmark's, or a bad row
            (unless `skip_invalid`); each message names the file (and line).
    """
    from reasonguard.evaluate.evaluator import find_predictions
    from reasonguard.evaluate.files import BadRows, read_json_rows, read_jsonl
    from reasonguard.evaluate.registry import BENCHMARKS

    root = Path(folder)
    found, missing = find_predictions(root)
    empty = [m for m in missing if m["reason"] != "no predictions"]
    if empty:
        raise UserError(
            f"{root / empty[0]['benchmark']}: {empty[0]['reason']} (config key "
            "'teacher_predictions' names a folder of <Benchmark>/generated_predictions.jsonl)"
        )
    problems = _Problems(skip_invalid)
    items: list[LabelledItem] = []
    files: dict[str, int] = {}
    for name, path in found.items():
        lines = BadRows(skip=True)  # malformed lines come back as None rows, reported below
        rows = read_jsonl(path, lines)
        if benchmark_dir is not None:
            bench_file = Path(benchmark_dir) / BENCHMARKS[name].filename
            if bench_file.is_file():
                expected = len(read_json_rows(bench_file))
                if expected != len(rows):
                    raise UserError(
                        f"{path}: {len(rows)} prediction rows but {expected} rows in {bench_file}: "
                        "a teacher's predictions must hold one row per benchmark row, in order"
                    )
        for message in lines.messages:
            problems.add(message)
        kept = 0
        for number, row in rows:
            if row is None:
                continue  # counted above
            if max_samples is not None and kept >= max_samples:
                break
            try:
                items.append(_row_item(row, where(path, number)))
                kept += 1
            except ValueError as exc:
                problems.add(f"{where(path, number)}: {exc}")
        files[name] = kept
    summary = {
        "teacher_predictions": str(root),
        "files": files,
        "items": len(items),
        "soft_target_items": sum(item.soft for item in items),
        "skipped_rows": problems.count,
        "skipped_examples": problems.examples,
    }
    return items, summary
