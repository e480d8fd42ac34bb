"""Describe a guard dataset: rows, label distribution per task, and token lengths.

Token lengths are measured with the model's real tokenizer through `encode_records`, exactly as
training will tokenize (same prompt format, same end-of-turn token), in chunks so the whole
GuardReasonerTrain (~127K rows, ~73M tokens) takes about a minute on two CPU cores.

Example:
    >>> from reasonguard.data.sources import load_source
    >>> from reasonguard.data.stats import dataset_stats
    >>> from reasonguard.models import load_tokenizer
    >>> stats = dataset_stats(load_source("samples"), load_tokenizer("llama3-tokenizer"))
    >>> stats["tokens"]["auto_max_length"]  # Experiment 19's rule: p95 clamped to [1024, 2048]
    1024
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from reasonguard.data.tokenize import encode_records
from reasonguard.format import (
    NO_RESPONSE,
    RESPONSE_TASKS,
    TASK_LABELS,
    TASKS,
    parse_output,
    response_label_mismatch,
    split_input,
)

PERCENTILES = (50, 95, 99)
INVALID = "invalid"  # label bucket for outputs whose answer block does not parse
CHUNK_SIZE = 1024  # rows per tokenizer call: big enough to batch, small enough to bound memory


def auto_max_length(p95: float, low: int = 1024, high: int = 2048) -> int:
    """Experiment 19's rule: the 95th percentile of token lengths, clamped to [low, high].

    Examples:
        >>> auto_max_length(930.2), auto_max_length(1500.1), auto_max_length(4000)
        (1024, 1501, 2048)
    """
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    # Round up: a max length below p95 would truncate more than 5% of rows.
    return int(min(high, max(low, math.ceil(p95))))


def dataset_stats(
    records_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer: Any | None = None,
    prompt_format: str = "raw",
    max_length: int | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = False,
) -> dict[str, Any]:
    """Statistics of validated records (see `validate_records`).

    Args:
        records_by_split: `{split: [record, ...]}` with `input` and `output` in each record.
        tokenizer: a Hugging Face tokenizer; without one, token statistics are left out.
        prompt_format: `raw`, `chat` or `chat-user`, as training will use.
        max_length: count the rows this length would truncate; the auto max length when None.
        chunk_size: rows tokenized per call.
        progress: show a progress bar (stderr) while tokenizing.

    Returns:
        A JSON-ready dict: `rows` and `prompt_only_rows` per split, `total_rows`, `labels`
        (`total` and `by_split`, each `{task: {label: count}}`, `None` meaning no label),
        `response_labels` (per response task: `rows_with_response`, `labelled`, and the rows
        where they disagree, `labelled_without_response` and `response_without_label`, so that
        labelled = rows_with_response - response_without_label + labelled_without_response), and
        `tokens` (None without a tokenizer): `sequence` / `prompt` / `completion` summaries
        (mean, p50, p95, p99, max, total), `auto_max_length`, `max_length` and its
        `max_length_source` (`given` or `auto`), `truncated_rows`, `truncated_fraction` and
        `truncated_tokens` (tokens cut off those rows).
    """
    rows = {split: len(records) for split, records in records_by_split.items()}
    by_split = {split: _label_counts(records) for split, records in records_by_split.items()}
    total = _empty_counts()
    for counts in by_split.values():
        for task in TASKS:
            for label, n in counts[task].items():
                total[task][label] = total[task].get(label, 0) + n
    stats: dict[str, Any] = {
        "rows": rows,
        "total_rows": sum(rows.values()),
        "prompt_only_rows": {
            split: sum(_response(r) is None for r in records)
            for split, records in records_by_split.items()
        },
        "labels": {"total": total, "by_split": by_split},
        "response_labels": _response_label_counts(records_by_split, total),
        "tokens": None,
    }
    if tokenizer is not None:
        stats["tokens"] = token_stats(
            [r for records in records_by_split.values() for r in records],
            tokenizer,
            prompt_format,
            max_length,
            chunk_size,
            progress,
        )
    return stats


def token_stats(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    prompt_format: str = "raw",
    max_length: int | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = False,
) -> dict[str, Any]:
    """Token-length statistics over all records (see `dataset_stats` for the keys)."""
    import numpy as np

    prompt_lengths: list[int] = []
    completion_lengths: list[int] = []
    bar = _progress(len(records), progress)
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        for example in encode_records(chunk, tokenizer, prompt_format, None):
            prompt_lengths.append(example["num_prompt_tokens"])
            completion_lengths.append(example["num_completion_tokens"])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    prompt = np.asarray(prompt_lengths, dtype=np.int64)
    completion = np.asarray(completion_lengths, dtype=np.int64)
    sequence = prompt + completion
    summary = {
        "sequence": _summary(sequence),
        "prompt": _summary(prompt),
        "completion": _summary(completion),
    }
    auto = auto_max_length(summary["sequence"]["p95"]) if len(sequence) else None
    limit = max_length if max_length is not None else auto
    over = sequence[sequence > limit] if limit is not None else sequence[:0]
    return {
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "prompt_format": prompt_format,
        **summary,
        "auto_max_length": auto,
        "max_length": limit,
        "max_length_source": "given" if max_length is not None else "auto",
        "truncated_rows": int(len(over)),
        "truncated_fraction": float(len(over) / len(sequence)) if len(sequence) else 0.0,
        "truncated_tokens": int((over - limit).sum()) if len(over) else 0,
    }


def _summary(lengths: Any) -> dict[str, float | int | None]:
    """Mean, percentiles (numpy's linear interpolation), max and total of a length array."""
    import numpy as np

    if len(lengths) == 0:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None, "total": 0}
    return {
        "mean": float(lengths.mean()),
        **{f"p{q}": float(np.percentile(lengths, q)) for q in PERCENTILES},
        "max": int(lengths.max()),
        "total": int(lengths.sum()),
    }


def _empty_counts() -> dict[str, dict[str, int]]:
    # Every vocabulary label (and None) is listed, even at zero, so tables line up.
    return {task: {**dict.fromkeys(TASK_LABELS[task], 0), NO_RESPONSE: 0} for task in TASKS}


def _label_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    counts = _empty_counts()
    for record in records:
        verdict = parse_output(record.get("output", ""))
        for task in TASKS:
            label = INVALID if verdict.is_parsing_error else verdict.label(task) or NO_RESPONSE
            counts[task][label] = counts[task].get(label, 0) + 1
    return counts


def _response_label_counts(
    records_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
    total: dict[str, dict[str, int]],
) -> dict[str, dict[str, int]]:
    records = [r for rows in records_by_split.values() for r in rows]
    with_response = sum(_response(r) is not None for r in records)
    out = {
        task: {
            "rows_with_response": with_response,
            "labelled": sum(total[task].get(label, 0) for label in TASK_LABELS[task]),
            "labelled_without_response": 0,
            "response_without_label": 0,
        }
        for task in RESPONSE_TASKS
    }
    for record in records:
        key = "labelled_without_response" if _response(record) is None else "response_without_label"
        for task in response_label_mismatch(record["input"], record["output"]):
            out[task][key] += 1
    return out


def _response(record: Mapping[str, Any]) -> str | None:
    try:
        return split_input(record.get("input", ""))[1]
    except ValueError:
        return None


def _progress(total: int, enabled: bool) -> Any | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tokenizing", unit="row")
