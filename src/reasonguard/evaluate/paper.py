"""The published F1 scores of the GuardReasoner paper's Tables 1-3, shipped as package data.

`paper_tables.json` is keyed by our result names (`HarmBenchPrompt`, not the paper's "HarmBench"),
so a paper row lines up with a run column by column. Row names match case-insensitively and
ignore repeated spaces (`"guardreasoner 1b"` is `"GuardReasoner 1B"`).

Example:
    >>> from reasonguard.evaluate.paper import paper_row, paper_row_name
    >>> paper_row("GuardReasoner 1B")["prompt"]["f1"]["AegisSafetyTest"]
    89.34
    >>> paper_row_name("guardreasoner 1b")
    'GuardReasoner 1B'
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError

_TABLES = Path(__file__).with_name("paper_tables.json")


@cache
def _models() -> dict[str, Any]:
    return json.loads(_TABLES.read_text(encoding="utf-8"))["models"]


def paper_rows() -> list[str]:
    """The model names of the paper's tables, in table order."""
    return list(_models())


def _key(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def paper_row_name(name: str) -> str:
    """The table's spelling of a row name given in any case (`"guardreasoner 1b"`).

    Raises:
        UserError: no row of that name; the message suggests the closest names and lists them all.
    """
    models = _models()
    by_key = {_key(row): row for row in models}
    found = by_key.get(_key(name))
    if found is not None:
        return found
    key = _key(name)
    scores = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in by_key}
    best = max(scores.values())
    close = [by_key[k] for k, score in scores.items() if score >= max(best, 0.6)]
    quoted = [repr(row) for row in close]
    hint = ""
    if quoted:
        listed = ", ".join(quoted[:-1]) + " or " if len(quoted) > 1 else ""
        hint = f" did you mean {listed}{quoted[-1]}?"
    raise UserError(f"no paper row {name!r};{hint} choose from: {', '.join(models)}")


def paper_row(name: str) -> dict[str, Any]:
    """One model's published scores: {task: {"f1": {benchmark: F1 | None}, "weighted_f1"}}.

    `name` matches a row case-insensitively (see `paper_row_name`).

    Raises:
        UserError: no row of that name (the message suggests the closest and lists them all).
    """
    return _models()[paper_row_name(name)]
