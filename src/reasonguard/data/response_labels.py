"""Rows whose response labels disagree with their response, and what training does with them.

A guard record labels the AI response (`Completion:` refusal/compliance, `Response:`
harmful/unharmful) exactly when its input has one. The released GuardReasonerTrain breaks this
rule in both directions a data file can: WildGuardTrainR rows whose response is `None` (no
response) yet answer `Completion: refusal` / `Response: unharmful` (labels without a response),
and, in other data, a response with a `None` label (a response without labels). `format`
decides both (`response_label_mismatch`); this module finds the rows, names them, and applies
the training setting `labels_without_response`:

- `keep` (the default): train on the rows as published, as the GuardReasoner paper did;
- `none`: set the `Completion:` and `Response:` answers of rows with no response to `None`
  (`format.without_response_labels`); their reasoning text is kept as written.

A response without labels is reported only: there is no label to restore.

Example:
    >>> from reasonguard.data.response_labels import find_mismatch
    >>> from reasonguard.format import render_input, render_target
    >>> row = {"input": render_input("Hi"), "output": render_target("ok", "unharmful", "refusal", None)}
    >>> find_mismatch(row)
    ('labels_without_response', {'refusal': 'refusal'})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reasonguard.format import (
    TASK_KEY,
    parse_labels,
    response_label_mismatch,
    split_input,
    without_response_labels,
)

LABELS_WITHOUT_RESPONSE = "labels_without_response"
RESPONSE_WITHOUT_LABELS = "response_without_labels"
KINDS = (LABELS_WITHOUT_RESPONSE, RESPONSE_WITHOUT_LABELS)
SETTINGS = ("keep", "none")  # the values of the training config key `labels_without_response`
WHAT = {
    LABELS_WITHOUT_RESPONSE: "response labels but no response (AI assistant: None)",
    RESPONSE_WITHOUT_LABELS: "a response but a None response label",
}


@dataclass(frozen=True)
class LabelMismatch:
    """One row whose response labels disagree with its response.

    Attributes:
        split: the row's split.
        row: its 0-based index within the split (as `InvalidRow.row`).
        kind: `labels_without_response` or `response_without_labels`.
        labels: the disagreeing labels as written, by task (`refusal`, `response`).
        place: `FILE:LINE` or `FILE row N (1-based)` when known.
    """

    split: str
    row: int
    kind: str
    labels: dict[str, str | None]
    place: str | None = None

    @property
    def location(self) -> str:
        return self.place or f"split {self.split!r} row {self.row + 1} (1-based)"

    def describe(self) -> str:
        split = f"split {self.split!r}: " if self.place else ""
        answers = ", ".join(f"{TASK_KEY[t]}: {label}" for t, label in self.labels.items())
        return f"{self.location}: {split}{answers}"

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "location": self.location}


def find_mismatch(record: Mapping[str, Any]) -> tuple[str, dict[str, str | None]] | None:
    """(kind, the disagreeing labels by task) of a valid record, or None when they agree."""
    tasks = response_label_mismatch(record["input"], record["output"])
    if not tasks:
        return None
    labels = parse_labels(record["output"])
    kind = RESPONSE_WITHOUT_LABELS if split_input(record["input"])[1] else LABELS_WITHOUT_RESPONSE
    return kind, {task: labels[task] for task in tasks}


def summary(mismatches: Sequence[LabelMismatch], max_examples: int = 20) -> dict[str, Any]:
    """Counts by kind, with the first rows of each kind listed (for JSON reports)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        rows = [m for m in mismatches if m.kind == kind]
        out[kind] = {"rows": len(rows), "examples": [m.to_dict() for m in rows[:max_examples]]}
    return out


def apply_setting(
    triples: Sequence[tuple[str, int, dict]], mismatches: Sequence[LabelMismatch], setting: str
) -> tuple[list[tuple[str, int, dict]], dict[str, Any]]:
    """The training rows under `labels_without_response: setting`, and what it did.

    Args:
        triples: `(split, row, record)` of the rows a run uses (row as in `LabelMismatch`).
        mismatches: the validation report's `label_mismatches`.
        setting: `keep` or `none`.

    Returns:
        New triples (the changed records are new dicts), and `{setting, rows, set_to_none,
        response_without_labels}`: the used rows with labels but no response, how many of them
        now answer None, and the used rows with a response but a None label (left as they are).
    """
    if setting not in SETTINGS:
        raise ValueError(f"labels_without_response must be one of {SETTINGS}, got {setting!r}")
    kinds = {(m.split, m.row): m.kind for m in mismatches}
    out, counts = [], dict.fromkeys(KINDS, 0)
    for split, row, record in triples:
        kind = kinds.get((split, row))
        if kind is not None:
            counts[kind] += 1
        if kind == LABELS_WITHOUT_RESPONSE and setting == "none":
            record = {**record, "output": without_response_labels(record["output"])}
        out.append((split, row, record))
    rows = counts[LABELS_WITHOUT_RESPONSE]
    return out, {
        "setting": setting,
        "rows": rows,
        "set_to_none": rows if setting == "none" else 0,
        RESPONSE_WITHOUT_LABELS: counts[RESPONSE_WITHOUT_LABELS],
    }
