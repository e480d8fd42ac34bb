"""Reading TRUE labels from benchmark rows, strictly.

Model outputs are parsed leniently by `reasonguard.format.parse_output`; reference labels are not
model text, so anything outside the label vocabulary is an error here rather than a guess.
A label is either a bare word (`"harmful"`) or the task's line of an answer block
(`"Answers: \\nRequest: None\\nCompletion: None\\nResponse: harmful"`). `None` means "no label":
the row is not scored for that task.

Example:
    >>> from reasonguard.evaluate.labels import read_label
    >>> read_label("Answers: \\nRequest: None\\nCompletion: None\\nResponse: harmful", "response")
    'harmful'
    >>> read_label("refusal", "refusal") is None, read_label("None", "prompt") is None
    (False, True)
"""

from __future__ import annotations

import re
from typing import Any

from reasonguard.evaluate.files import BadRows
from reasonguard.evaluate.registry import Benchmark
from reasonguard.format import NO_RESPONSE, TASK_KEY, TASK_LABELS

_NO_LABEL = ("", NO_RESPONSE.lower(), "null")
_LINE_RE = {
    task: re.compile(rf"^[ \t]*{key}[ \t]*:[ \t]*(?P<value>[^\n]*?)[ \t\r]*$", re.I | re.M)
    for task, key in TASK_KEY.items()
}


def _word(value: str, task: str) -> str | None:
    word = value.strip().lower()
    if word in TASK_LABELS[task]:
        return word
    if word in _NO_LABEL:
        return None
    expected = ", ".join((*TASK_LABELS[task], NO_RESPONSE))
    raise ValueError(f"unknown label {value.strip()[:60]!r} for task {task} (expected {expected})")


def read_label(value: object, task: str, bare: bool = True) -> str | None:
    """The true label of `task` in `value`, or None when the row has none.

    Args:
        value: a bare label, an answer block, or JSON null.
        task: one of `reasonguard.format.TASKS`.
        bare: accept a bare label word. Pass False for multi-task benchmarks, where one bare word
            cannot say which task it labels.

    Raises:
        ValueError: a value that is neither a known label, `None`, nor an answer block with a
            known label for the task.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a label string, got {type(value).__name__}")
    matches = _LINE_RE[task].findall(value)
    if matches:
        return _word(matches[-1], task)
    if bare or value.strip().lower() in _NO_LABEL:
        return _word(value, task)
    raise ValueError(f"no '{TASK_KEY[task]}:' line for task {task} in {value.strip()[:60]!r}")


def true_labels(
    bench: Benchmark, row: Any, place: str, field: str | None, bad: BadRows
) -> dict[str, str | None] | None:
    """The true label per task of one row, or None when the row is bad (and skipped).

    Args:
        place: where the row is, for messages (`file:line` or `file row N`).
        field: the field holding every task's label (`label` of a prediction row), or None to
            read the benchmark's own label source.
    """
    if not isinstance(row, dict):
        bad.add(f"{place}: expected a JSON object, got {type(row).__name__}")
        return None
    labels: dict[str, str | None] = {}
    for task in bench.tasks:
        key = field or bench.label_columns.get(task, "output")
        if key not in row:
            bad.add(f"{place}: missing key {key!r}")
            return None
        try:
            # A bare word labels a task only where that is unambiguous: a single-task file, or
            # a column that holds this task's label alone.
            bare = len(bench.tasks) == 1 or key == bench.label_columns.get(task)
            labels[task] = read_label(row[key], task, bare=bare)
        except ValueError as exc:
            hint = ""
            if field and bench.label_columns:
                hint = f" ({bench.name} labels live in the benchmark file; pass --benchmark-dir)"
            bad.add(f"{place}: field {key!r}: {exc}{hint}")
            return None
    return labels
