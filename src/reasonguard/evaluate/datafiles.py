"""Score `generate --data` outputs: labelled records in the training format with the model's text.

`generate --data SOURCE` (and the demo's held-out step) writes one `<split>.jsonl` per split,
each row the record (`instruction`, `input`, `output`: the true answer) plus the model's
`samples` and `samples_truncated`. `evaluate PATH` scores such a file, or a folder of them,
per task with `reasonguard.evaluate.dataset` (the first sample of each row; a row may instead
carry a single `predict` string and an optional boolean `truncated`).

Example:
    >>> from reasonguard.evaluate.datafiles import score_data_outputs
    >>> m = score_data_outputs("runs/demo/generations")
    >>> m["tasks"]["prompt"]["f1"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError, where
from reasonguard.evaluate.files import BadRows, read_jsonl
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE
from reasonguard.format import parse_labels


def data_output_files(path: str | os.PathLike[str]) -> list[Path] | None:
    """The `generate --data` output files `path` names, or None when it is a benchmark folder.

    A file is taken as it is; a folder holding `*.jsonl` files and no sub-folder (other than
    hidden or `_`-prefixed state folders) is a folder of such outputs.

    Raises:
        UserError: `path` is one benchmark's `generated_predictions.jsonl` (its folder's parent
            is what `evaluate` scores).
    """
    path = Path(path)
    if path.is_file():
        if path.name == PREDICTIONS_FILE and path.parent.name in BENCHMARKS:
            raise UserError(
                f"{path}: one benchmark's predictions; give the folder that holds the "
                f"<Benchmark>/ folders: reasonguard evaluate {path.parent.parent}"
            )
        return [path]
    if not path.is_dir():
        return None
    folders = [e for e in path.iterdir() if e.is_dir() and not e.name.startswith((".", "_"))]
    files = sorted(path.glob("*.jsonl"))
    return files if files and not folders else None


def _scored_row(row: dict[str, Any], place: str, bad: BadRows) -> dict[str, Any] | None:
    """{"output", "predict", "truncated"} of one output row, or None when it is bad."""
    output = row.get("output")
    if not isinstance(output, str):
        bad.add(
            f"{place}: field 'output': missing or not a string (the record's true answer, "
            "which `generate --data` copies from its input)"
        )
        return None
    if parse_labels(output)["prompt"] is None:
        bad.add(f"{place}: field 'output': no 'Request:' answer line (the true labels)")
        return None
    if "samples" in row:
        samples, flags = row["samples"], row.get("samples_truncated") or [False]
        if not (isinstance(samples, list) and samples and isinstance(samples[0], str)):
            bad.add(f"{place}: field 'samples': expected a non-empty list of strings")
            return None
        return {"output": output, "predict": samples[0], "truncated": bool(flags[0])}
    if isinstance(row.get("predict"), str):
        return {
            "output": output,
            "predict": row["predict"],
            "truncated": bool(row.get("truncated")),
        }
    bad.add(f"{place}: no model output (expected 'samples' from `generate --data`, or 'predict')")
    return None


def read_data_outputs(
    files: list[Path], skip_bad_rows: bool = False, limit: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The scorable rows of `generate --data` output files, and the bad-row messages skipped.

    Raises:
        UserError: a bad file or row (naming file:line and field) unless `skip_bad_rows`.
    """
    bad = BadRows(skip_bad_rows, hint="or pass --skip-bad-rows to skip and count such rows")
    rows: list[dict[str, Any]] = []
    for path in files:
        for number, row in read_jsonl(path, bad)[:limit]:
            if row is not None:
                scored = _scored_row(row, where(path, number), bad)
                if scored is not None:
                    rows.append(scored)
    if not rows:
        raise UserError(f"{', '.join(map(str, files))}: no row to score")
    return rows, bad.messages


def score_data_outputs(
    path: str | os.PathLike[str],
    protocol: str = "strict",
    skip_bad_rows: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Per-task metrics of a `generate --data` output file or folder (`evaluate_dataset`'s).

    Raises:
        UserError: `path` is not such a file or folder, or holds bad rows (see above).
    """
    from reasonguard.evaluate.dataset import evaluate_dataset

    files = data_output_files(path)
    if files is None:
        raise UserError(f"{path}: not a `generate --data` output file or folder of them")
    rows, skipped = read_data_outputs(files, skip_bad_rows, limit)
    metrics = evaluate_dataset(rows, name=str(path), protocol=protocol)
    metrics["files"] = [str(f) for f in files]
    metrics["skipped_rows"] = len(skipped)
    metrics["skipped_examples"] = skipped[:5]
    return metrics
