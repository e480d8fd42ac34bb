"""Check guard training records before any model sees them.

Where a message points to a record: `FILE:LINE` (1-based file line) in a JSON-lines file;
`FILE row N (1-based)` in a JSON-array or parquet file; `split 'S' row N (1-based)` otherwise (a
hub dataset). `data.located.load_located` loads a source with these places and, unlike
`load_source`, turns a JSON-lines line that is not a JSON object into an invalid row, so
`--skip-invalid` skips and counts it like any other. (`InvalidRow.row` stays the 0-based index in the split, for code.)

Rules, per record:

- `input`: a non-empty string in the `Human user:\\n...\\n\\nAI assistant:\\n...\\n\\n` layout
  (`format.split_input`); the response may be the literal `None`.
- `output`: a non-empty string whose answer block parses (`format.parse_output`): the `Request:`
  label is required and must be harmful/unharmful; `Completion:` / `Response:`, when present,
  must be in their vocabulary or `None`.
- `instruction`: optional. Absent, null or empty means the GuardReasoner instruction (the
  returned copy carries it explicitly); present, it must be a string.

The first invalid row raises a `UserError` naming the source, split, row and field; with
`skip_invalid=True` invalid rows are dropped and counted in the report instead, never silently.
Valid rows whose response labels disagree with their response (labels with no response, or a
response with a None label: `data.response_labels`) stay valid and are listed in the report's
`label_mismatches`, with their places.

Example:
    >>> from reasonguard.data.sources import load_source
    >>> from reasonguard.data.validate import validate_records
    >>> records, report = validate_records(load_source("samples"), source="samples")
    >>> report.num_invalid
    0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reasonguard.data.located import Unreadable, places_of
from reasonguard.data.response_labels import LabelMismatch, find_mismatch, summary
from reasonguard.errors import UserError
from reasonguard.format import (
    INSTRUCTION,
    TASK_KEY,
    TASK_LABELS,
    TASKS,
    answer_values,
    parse_output,
    split_input,
)

# What a valid answer block looks like, quoted in error messages.
_ANSWER_BLOCK_HINT = (
    "an answer block 'Answers: \\nRequest: harmful|unharmful\\n"
    "Completion: refusal|compliance|None\\nResponse: harmful|unharmful|None'"
)
_INPUT_HINT = "'Human user:\\n<prompt>\\n\\nAI assistant:\\n<response or None>\\n\\n'"


@dataclass(frozen=True)
class InvalidRow:
    """One invalid record: where it is and what is wrong with it.

    Attributes:
        split: the split the record belongs to.
        row: its 0-based index within the split (for code, like `dataset[split][row]`).
        field: the offending field (`input`, `output`, `instruction`, or `record`).
        message: what was found and what was expected.
        place: where a person finds it (`data.jsonl:12`, `data.json row 3 (1-based)`), when
            known; else `location` says `split 'S' row N (1-based)`.
    """

    split: str
    row: int
    field: str
    message: str
    place: str | None = None

    @property
    def location(self) -> str:
        return self.place or f"split {self.split!r} row {self.row + 1} (1-based)"

    def describe(self) -> str:
        # A row that is not an object (a line that is not JSON) has no split of its own: its
        # file:line says where it is, and naming the split counted for it would blame that split.
        split = f"split {self.split!r}: " if self.place and self.field != "record" else ""
        return f"{self.location}: {split}field {self.field!r}: {self.message}"


@dataclass
class ValidationReport:
    """Rows checked per split and the invalid rows found (all of them when skipping)."""

    rows: dict[str, int]
    invalid: list[InvalidRow] = field(default_factory=list)
    source: str = ""
    label_mismatches: list[LabelMismatch] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def num_invalid(self) -> int:
        return len(self.invalid)

    @property
    def num_valid(self) -> int:
        return self.num_rows - self.num_invalid

    def invalid_by_split(self) -> dict[str, int]:
        counts = dict.fromkeys(self.rows, 0)
        for bad in self.invalid:
            counts[bad.split] = counts.get(bad.split, 0) + 1
        return counts

    def to_dict(self, max_examples: int = 20) -> dict[str, Any]:
        """A JSON-ready summary (for `training_info.json`), with the first invalid rows listed.

        Args:
            max_examples: how many invalid rows to list in full (all are counted).
        """
        return {
            "source": self.source,
            "rows": dict(self.rows),
            "num_rows": self.num_rows,
            "num_invalid": self.num_invalid,
            "invalid_by_split": self.invalid_by_split(),
            "invalid_examples": [
                {**vars(bad), "location": bad.location} for bad in self.invalid[:max_examples]
            ],
            "response_labels": summary(self.label_mismatches, max_examples),
        }


def validate_records(
    records_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
    skip_invalid: bool = False,
    source: str = "",
    places: Mapping[str, Sequence[str | None]] | None = None,
) -> tuple[dict[str, list[dict]], ValidationReport]:
    """Check every record and return the valid ones (as new dicts) with a report.

    Args:
        records_by_split: `{split: [record, ...]}`, e.g. from `load_located` or `load_source`.
            Not modified.
        skip_invalid: drop invalid rows and list them in the report instead of raising.
        source: the source name, quoted in error messages.
        places: `{split: [place per record]}` from `load_located`. When None and `source` is a
            local file or folder, the places are worked out from it once a row is invalid.

    Returns:
        `({split: [valid record copies]}, report)`. Each copy has an explicit `instruction`.

    Raises:
        UserError: on the first invalid row, unless `skip_invalid`; the message names the
            file and 1-based line (or the 1-based row), the split, the field and what was
            expected.
    """
    valid: dict[str, list[dict]] = {}
    report = ValidationReport(rows={}, source=source)
    known = places

    def place_of(split: str, row: int) -> str | None:
        nonlocal known
        if known is None:  # worked out only once a row needs naming
            known = places_of(source, records_by_split)
        where = known.get(split)
        fits = where is not None and len(where) == len(records_by_split[split])
        return where[row] if fits else None

    for split, records in records_by_split.items():
        report.rows[split] = len(records)
        kept = valid.setdefault(split, [])
        for row, record in enumerate(records):
            problem = check_record(record)
            if problem is None:
                kept.append(_with_instruction(record))
                mismatch = find_mismatch(record)
                if mismatch is not None:
                    report.label_mismatches.append(
                        LabelMismatch(split, row, *mismatch, place=place_of(split, row))
                    )
                continue
            place = place_of(split, row)
            bad = InvalidRow(split, row, *problem, place=place)
            if not skip_invalid:
                prefix = f"{source}: " if source and place is None else ""
                raise UserError(
                    f"{prefix}invalid record: {bad.describe()}. Fix the data, or pass "
                    "--skip-invalid to drop invalid rows (they are counted in the report)"
                )
            report.invalid.append(bad)
    return valid, report


def check_record(record: Any) -> tuple[str, str] | None:
    """The first problem of one record as `(field, message)`, or None when it is valid."""
    if isinstance(record, Unreadable):
        return "record", record.message
    if not isinstance(record, Mapping):
        return "record", f"expected an object with input/output, got {type(record).__name__}"
    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        return "instruction", f"expected a string, got {type(instruction).__name__}"
    problem = check_texts(record, ("input", "output"))
    if problem:
        return problem
    return _check_output(record["output"])


def check_texts(record: Mapping[str, Any], names: Sequence[str]) -> tuple[str, str] | None:
    """The first problem as `(field, message)` among required non-empty string fields `names`
    (which include `input`), then the guard layout of `input`; None when all are fine."""
    for name in names:
        problem = _check_text(record, name)
        if problem:
            return name, problem
    try:
        split_input(record["input"])
    except ValueError:
        return "input", f"not in the guard input layout {_INPUT_HINT}"
    return None


def _check_text(record: Mapping[str, Any], name: str) -> str | None:
    if name not in record or record[name] is None:
        return "missing (required)"
    value = record[name]
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "empty (expected a non-empty string)"
    return None


def _check_output(output: str) -> tuple[str, str] | None:
    verdict = parse_output(output)
    if not verdict.is_parsing_error:
        return None
    for task in TASKS:
        found = answer_values(output, task)
        values = [value for value, _ in found]
        if task == "prompt" and not values:
            return "output", f"no answer block: expected {_ANSWER_BLOCK_HINT}"
        if values and not any(valid for _, valid in found):
            labels = "|".join(TASK_LABELS[task])
            return "output", (
                f"{TASK_KEY[task]} label {values[-1]!r} is not in the vocabulary (expected "
                f"{labels}" + (")" if task == "prompt" else " or None)")
            )
    # Only the request line is left: present with a null value ("Request: None").
    return "output", f"the request label is required, got None: expected {_ANSWER_BLOCK_HINT}"


def _with_instruction(record: Mapping[str, Any]) -> dict:
    copy = dict(record)
    if not copy.get("instruction"):
        copy["instruction"] = INSTRUCTION
    return copy
