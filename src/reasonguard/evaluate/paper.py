"""The published F1 scores of the GuardReasoner paper's Tables 1-3, shipped as package data.

`paper_tables.json` is keyed by our result names (`HarmBenchPrompt`, not the paper's "HarmBench"),
so a paper row lines up with a run column by column.

Example:
    >>> from reasonguard.evaluate.paper import paper_row
    >>> paper_row("GuardReasoner 1B")["prompt"]["f1"]["AegisSafetyTest"]
    89.34
"""

from __future__ import annotations

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


def paper_row(name: str) -> dict[str, Any]:
    """One model's published scores: {task: {"f1": {benchmark: F1 | None}, "weighted_f1"}}.

    Raises:
        UserError: no row of that name (the message lists them all).
    """
    models = _models()
    if name not in models:
        raise UserError(f"no paper row {name!r}; choose from: {', '.join(models)}")
    return models[name]
