"""Errors that carry a user-facing message; the CLI prints them and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (file, row, field, config key): reported without a traceback."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location prefix such as `preds.jsonl:12: field 'predict'`."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field {field!r}"
    return text
