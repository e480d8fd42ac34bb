"""The summary of a mining run: rows per source, task and status, per-file counts, the pairs
kept after de-duplication (`build_summary`, written as `pairs.summary.json` beside the pairs,
`summary_path`), and its plain-text table (`format_summary`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.hsdpo.hard import STATUSES, TASK_ORDER

MAX_LISTED = 20  # invalid rows quoted in the summary (all are counted)


def summary_path(out: str | os.PathLike[str]) -> Path:
    """Where the summary of a pair file goes: `pairs.jsonl` -> `pairs.summary.json`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json")


def empty_counts() -> dict[str, dict[str, int]]:
    return {task: dict.fromkeys(STATUSES, 0) for task in TASK_ORDER}


def build_summary(
    mined: Sequence[Any],
    pairs: Sequence[Mapping[str, Any]],
    duplicates: int,
    out: Path,
    max_norm: float,
) -> dict[str, Any]:
    """The summary of a mining run (written beside the pairs) from each file's `MinedFile`."""
    by_source: dict[str, dict[str, dict[str, int]]] = {}
    for m in mined:
        for source, per_task in m.counts.items():
            total = by_source.setdefault(source, empty_counts())
            for task, statuses in per_task.items():
                for status, n in statuses.items():
                    total[task][status] += n
    pairs_by_source: dict[str, dict[str, int]] = {}
    for pair in pairs:
        per_task = pairs_by_source.setdefault(pair["source"], dict.fromkeys(TASK_ORDER, 0))
        per_task[pair["task"]] += 1
    invalid = [text for m in mined for text in m.invalid]
    return {
        "output": str(out),
        "max_norm": max_norm,
        "pairs": len(pairs),
        "pairs_before_dedup": sum(len(m.pairs) for m in mined),
        "duplicates_dropped": duplicates,
        "invalid_rows": len(invalid),
        "files": [
            {
                "path": str(m.path),
                "rows": m.rows,
                "invalid_rows": len(m.invalid),
                "samples_per_row": m.samples_per_row,
                "outputs": m.outputs,
                "outputs_missing_an_answer": m.ignored_outputs,
                "pairs": len(m.pairs),
                "raw_weight_min": min(m.raw_weights, default=None),
                "raw_weight_max": max(m.raw_weights, default=None),
            }
            for m in mined
        ],
        "by_source": by_source,
        "pairs_by_source": pairs_by_source,
        "invalid_examples": invalid[:MAX_LISTED],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text table: rows per source and task by status."""
    files = summary["files"]
    rows = sum(f["rows"] for f in files)
    outputs = sum(f["outputs"] for f in files)
    ignored = sum(f["outputs_missing_an_answer"] for f in files)
    lines = [
        f"Hard-sample mining: {len(files)} file(s), {rows} rows "
        f"({summary['invalid_rows']} invalid, skipped), {outputs} outputs "
        f"({ignored} missing an answer, ignored)"
    ]
    header = ["source", "task", *STATUSES]
    table = [
        [source if i == 0 else "", task, *(str(statuses[s]) for s in STATUSES)]
        for source, per_task in summary["by_source"].items()
        for i, (task, statuses) in enumerate(per_task.items())
    ]
    widths = [max(len(r[c]) for r in [header, *table]) for c in range(len(header))]
    for r in [header, *table]:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(r[2:], widths[2:], strict=True)]
        lines.append("  " + "  ".join(cells))
    lines.append(
        f"pairs: {summary['pairs']} ({summary['pairs_before_dedup']} mined, "
        f"{summary['duplicates_dropped']} duplicate inputs dropped)"
    )
    return "\n".join(lines)
