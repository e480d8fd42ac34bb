"""Reading a local guard data source with the place of every record, for messages that point
to it (`load_located`): `FILE:LINE` (1-based) in a JSON-lines file, `FILE row N (1-based)` in a
JSON-array or parquet file; a hub dataset is loaded without places.

Unlike `data.sources.load_source`, a JSON-lines line that is not JSON becomes an `Unreadable`
row instead of an error, so validation (`data.validate`) reports it, or skips and counts it,
like any other invalid row.

Example:
    >>> from reasonguard.data.located import load_located
    >>> records, places = load_located("samples")
    >>> next(iter(places.values()))[0].endswith(":1")
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import INSTRUCTION


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


def places_of(
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
