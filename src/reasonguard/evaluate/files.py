"""Reading prediction (JSONL) and benchmark (JSON) files with errors that name file, line and field.

A bad row raises `UserError` at once, or, where the command offers it (`evaluate
--skip-bad-rows`), is counted by `BadRows` and left out (the report prints the count: nothing is
dropped silently).

Example:
    >>> from reasonguard.evaluate.files import BadRows, read_jsonl
    >>> rows = read_jsonl("preds/AegisSafetyTest/generated_predictions.jsonl", BadRows(skip=False))
    >>> rows[0][0], sorted(rows[0][1])  # (line number, row)
    (1, ['label', 'predict', 'prompt'])
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError, where
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE


class BadRows:
    """Raises on the first bad row, or (skip=True) records it and lets the caller skip it.

    Args:
        skip: record bad rows instead of raising.
        hint: added to the raised message, e.g. how to skip such rows (only where the command
            has such an option).
    """

    def __init__(self, skip: bool, hint: str | None = None) -> None:
        self.skip = skip
        self.hint = hint
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if not self.skip:
            raise UserError(message if self.hint is None else f"{message} ({self.hint})")
        self.messages.append(message)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if not data.strip():
        raise UserError(f"{path}: empty file (no rows)")
    return data


def _utf8_error(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return f"{where(path, line)}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"


def _lines(path: Path, data: bytes, bad: BadRows) -> list[tuple[int, str | None]]:
    """(line number, text or None when undecodable) for every line of a UTF-8 file."""
    try:
        # Split on "\n" only: JSON strings may hold raw U+2028 etc., which `splitlines` would cut.
        return list(enumerate(data.decode("utf-8-sig").split("\n"), start=1))
    except UnicodeDecodeError as exc:
        if not bad.skip:
            raise UserError(_utf8_error(path, data, exc)) from None
    out: list[tuple[int, str | None]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            out.append((number, raw.decode("utf-8-sig")))
        except UnicodeDecodeError as exc:
            bad.add(f"{where(path, number)}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})")
            out.append((number, None))
    return out


def read_jsonl(
    path: str | os.PathLike[str], bad: BadRows
) -> list[tuple[int, dict[str, Any] | None]]:
    """Read a JSONL file into (line number, row) pairs; a skipped bad line gives row None.

    Blank lines carry no row and are ignored. Row order is kept (predictions are matched to
    benchmark rows by position).

    Raises:
        UserError: unreadable or empty file; a malformed, non-object or non-UTF-8 line unless
            `bad.skip`.
    """
    path = Path(path)
    data = _read_bytes(path)
    rows: list[tuple[int, dict[str, Any] | None]] = []
    for number, text in _lines(path, data, bad):
        if text is None:
            rows.append((number, None))
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            bad.add(f"{where(path, number)}: malformed JSON ({exc.msg} at column {exc.colno})")
            rows.append((number, None))
            continue
        if not isinstance(row, dict):
            bad.add(f"{where(path, number)}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, None))
            continue
        rows.append((number, row))
    return rows


def read_json_rows(path: str | os.PathLike[str]) -> list[Any]:
    """Read a benchmark file: one JSON array of row objects.

    Raises:
        UserError: unreadable, empty, non-UTF-8 or malformed file, or not a non-empty array.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(_utf8_error(path, data, exc)) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where(path, exc.lineno)}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a non-empty JSON array of rows")
    return rows


def find_predictions(pred_dir: Path) -> tuple[dict[str, Path], list[dict[str, str]]]:
    """Map each benchmark with a prediction folder to its predictions file.

    Returns:
        (benchmark name -> predictions path, missing benchmarks as {"benchmark", "reason"}).

    Raises:
        UserError: no such folder, a sub-folder that names no known benchmark, or no
            benchmark folder at all.
    """
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: predictions folder not found")
    found: dict[str, Path] = {}
    missing: list[dict[str, str]] = []
    unknown: list[str] = []
    for entry in sorted(pred_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith((".", "_")):
            continue  # metrics.json, report.md, hidden folders
        if entry.name not in BENCHMARKS:
            unknown.append(entry.name)
        elif (entry / PREDICTIONS_FILE).is_file():
            found[entry.name] = entry / PREDICTIONS_FILE
        else:
            missing.append({"benchmark": entry.name, "reason": f"no {PREDICTIONS_FILE} in folder"})
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
            for name in unknown
            for close in [difflib.get_close_matches(name, list(BENCHMARKS), n=1)]
        ]
        raise UserError(
            f"{pred_dir}: unknown benchmark folder {', '.join(hints)}; "
            f"known names: {', '.join(BENCHMARKS)}"
        )
    if not found and not missing:
        raise UserError(
            f"{pred_dir}: no benchmark folders (expected <Benchmark>/{PREDICTIONS_FILE}, "
            "or the *.jsonl files `generate --data` writes)"
        )
    reported = {m["benchmark"] for m in missing}
    missing += [
        {"benchmark": name, "reason": "no predictions"}
        for name in BENCHMARKS
        if name not in found and name not in reported
    ]
    return found, missing
