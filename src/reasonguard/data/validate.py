"""Check guard training records before any model sees them.

Where a message points to a record: `FILE:LINE` (1-based file line) in a JSON-lines file;
`FILE row N (1-based)` in a JSON-array or parquet file; `split 'S' row N (1-based)` otherwise (a
hub dataset). `load_located` loads a source with these places and, unlike `load_source`, turns a
JSON-lines line that is not a JSON object into an invalid row, so `--skip-invalid` skips and
counts it like any other. (`InvalidRow.row` stays the 0-based index in the split, for code.)

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

Example:
    >>> from reasonguard.data.sources import load_source
    >>> from reasonguard.data.validate import validate_records
    >>> records, report = validate_records(load_source("samples"), source="samples")
    >>> report.num_invalid
    0
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    for split, records in records_by_split.items():
        report.rows[split] = len(records)
        kept = valid.setdefault(split, [])
        for row, record in enumerate(records):
            problem = check_record(record)
            if problem is None:
                kept.append(_with_instruction(record))
                continue
            if places is None:
                places = _places_of(source, records_by_split)
            where = places.get(split)
            place = where[row] if where is not None and len(where) == len(records) else None
            bad = InvalidRow(split, row, *problem, place=place)
            if not skip_invalid:
                prefix = f"{source}: " if source and place is None else ""
                raise UserError(
                    f"{prefix}invalid record: {bad.describe()}. Fix the data, or pass "
                    "--skip-invalid to drop invalid rows (they are counted in the report)"
                )
            report.invalid.append(bad)
    return valid, report


class Unreadable:
    """A JSON-lines line that is not JSON: `load_located` keeps it as a row that fails
    `check_record`, so that it is reported (or skipped and counted) like any invalid row."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"Unreadable({self.message!r})"


def load_located(
    source: str, splits: Sequence[str] | None = None
) -> tuple[dict[str, list[Any]], dict[str, list[str | None]]]:
    """Load a source as `load_source` does, with the place of every record.

    A local file or folder is read here: JSON lines line by line (a line that is not JSON
    becomes an `Unreadable` row and a non-object line stays as it is, both invalid for
    `validate_records`), JSON arrays and parquet files row by row. A hub dataset is loaded by
    `load_source`, without places.

    Returns:
        `({split: [record, ...]}, {split: [place or None, ...]})`; records are new dicts (the
        instruction filled in when absent) except the invalid rows.

    Raises:
        UserError: as `load_source`: a missing or unreadable file, an unknown split.
    """
    from reasonguard.data import sources

    path = _local_path(source)
    if path is None:
        records = sources.load_source(source, splits)
        return records, {split: [None] * len(rows) for split, rows in records.items()}
    by_split: dict[str, list[tuple[Any, str | None]]] = {}
    if path.is_dir():
        for file in sources.split_files(path):
            rows = _read_located(file)
            if isinstance(rows, dict):
                raise UserError(
                    f"{file}: a split file must hold a list of records, not {{split: ...}}"
                )
            by_split[file.stem] = rows
    else:
        if path.suffix.lower() not in sources.FILE_SUFFIXES:
            return sources.load_source(source, splits), {}  # its own "unsupported" error
        rows = _read_located(path)
        if isinstance(rows, dict):
            by_split = {split: [(row, None) for row in items] for split, items in rows.items()}
        else:
            for (row, place), split in zip(rows, _row_splits(rows, path.stem), strict=True):
                by_split.setdefault(split, []).append((row, place))
            if not by_split:
                raise UserError(f"{path}: no records")
    selected = sources._select(by_split, splits, source)
    records = {split: [_plain(row) for row, _ in rows] for split, rows in selected.items()}
    places = {split: [place for _, place in rows] for split, rows in selected.items()}
    return records, places


def _row_splits(rows: Sequence[tuple[Any, str]], stem: str) -> list[str]:
    """The split of each row of one file: its `split` field, else the file stem. A row that is
    not an object (a line that is not JSON, say) has no field: it joins the split of the row
    before it (the next one at the top of the file), so it is counted where it sits."""
    own = []
    for row, _ in rows:
        if isinstance(row, Mapping):
            split = row.get("split")
            own.append(split if isinstance(split, str) and split else stem)
        else:
            own.append(None)
    known = [split for split in own if split is not None]
    current = known[0] if known else stem
    out = []
    for split in own:
        current = split or current
        out.append(current)
    return out


def _local_path(source: str) -> Path | None:
    from reasonguard.data import sources

    if str(source) == sources.SAMPLES:
        return sources.samples_path()
    path = Path(str(source)).expanduser()
    return path if str(source) and path.exists() else None


def _plain(row: Any) -> Any:
    """A new plain dict with the instruction filled in (as `load_source` gives); invalid rows
    are kept as they are for `check_record` to report."""
    if not isinstance(row, Mapping):
        return row
    record = dict(row)
    if record.get("instruction") is None:
        record["instruction"] = INSTRUCTION
    return record


def _read_located(path: Path) -> list[tuple[Any, str]] | dict[str, list[Any]]:
    """(row, place) per row of one local file, or `{split: [rows]}` for such a JSON file."""
    from reasonguard.data import sources

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(row, f"{path} row {i} (1-based)") for i, row in enumerate(_parquet(path), 1)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from exc
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # `datasets` writes JSON lines under a .json name: read it as such
        else:
            if isinstance(data, list):
                return [(row, f"{path} row {i} (1-based)") for i, row in enumerate(data, 1)]
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                return data
            raise UserError(
                f"{path}: expected a JSON list of records or an object {{split: [records]}}"
            )
        rows = _json_lines(text, path)
        if not any(not isinstance(row, Unreadable) for row, _ in rows):
            # Not JSON lines either: report the file as the loader does.
            return sources._read_rows(path)  # raises its "invalid JSON" error
        return rows
    return _json_lines(text, path)


def _parquet(path: Path) -> list[Any]:
    from reasonguard.data import sources

    return sources._read_parquet(path)


def _json_lines(text: str, path: Path) -> list[tuple[Any, str]]:
    """(row, `FILE:LINE`) per non-blank line; a line that is not JSON gives an `Unreadable`.

    Lines end at a newline only, as editors count them (JSON strings may hold a raw U+2028).
    """
    rows: list[tuple[Any, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            row = Unreadable(f"invalid JSON ({exc.msg} at column {exc.colno})")
        rows.append((row, f"{path}:{number}"))
    return rows


def _places_of(
    source: str, records_by_split: Mapping[str, Sequence[Any]]
) -> dict[str, list[str | None]]:
    """The places of records loaded from a local `source` by `load_source` (no places for a
    hub dataset, or when the file no longer holds the same rows)."""
    if _local_path(source) is None:
        return {}
    try:
        _, places = load_located(source, list(records_by_split))
    except UserError:
        return {}
    return places


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
