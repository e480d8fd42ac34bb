"""Hard-sample mining: preference pairs from k sampled outputs per prompt (k >= 2).

Input: the training-data generation files of `reasonguard generate --data SOURCE --samples K`,
JSON lines `{"instruction", "input", "output", "source", "samples": [K strings]}`. The true
labels are parsed from `output` by `format.parse_output`, the same parser that reads the samples,
so a sample is judged by exactly the rules that score the model.

Per row, the rules of `hsdpo.hard` (`select_hard`): outputs missing an answer are ignored; the
tasks are tried in the order prompt, response, refusal; the first hard one (right and wrong
outputs mixed) makes the row's only pair, chosen the longest right output, rejected the longest
wrong one, raw weight #wrong - #right. Those names are importable from here too.

Per file the raw weights are min-max scaled to [1 - max_norm, 1 + max_norm] (all equal: 1.0).
The files are then merged in the order given and de-duplicated on `input`: the first file wins
(the pipeline lists each source's preferred model first).

Output: pair rows `{"instruction", "input", "chosen", "rejected", "sample_weight", "task",
"source"}` (what `train.dpo.pairs` reads; `task` is a `format.TASKS` name), and a summary beside
them (`pairs.jsonl` -> `pairs.summary.json`). The summary counts, per source and task, the rows
that reached that task with each status: `hard` (the pair was made there), `all_right`,
`all_wrong`; a row whose outputs are all ignored is `unparseable` at the prompt task and goes no
further. So a row is counted once per task it reached, and the `hard` counts add up to the pairs
before de-duplication. Both files are written atomically (a temporary file, then a rename), the
pairs last, so an existing pair file is always complete.

A bad generation row (invalid JSON, a missing or mistyped field, a K other than the rest of its
file) raises `UserError` naming the file, line and field; with `skip_invalid` it is skipped and
counted in the summary instead. A file of one sample per prompt (K = 1, `generate` without
`--samples`) raises `UserError` whatever `skip_invalid` says: one output cannot disagree with
itself, so it can never give a pair.

The summary is built and printed by `hsdpo.summary`.

Example:
    >>> from reasonguard.hsdpo.mine import mine_files
    >>> mine_files(["gen/WildGuardTrainR.jsonl", "gen/AegisTrainR.jsonl"], "pairs.jsonl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonguard.data.validate import check_record
from reasonguard.errors import UserError, where
from reasonguard.format import INSTRUCTION, parse_labels, split_input
from reasonguard.hsdpo.hard import (
    ALL_RIGHT,
    ALL_WRONG,
    DEFAULT_MAX_NORM,
    HARD,
    STATUSES,
    TASK_ORDER,
    UNPARSEABLE,
    Selection,
    check_max_norm,
    output_labels,
    scale_weights,
    select_hard,
)
from reasonguard.hsdpo.summary import (
    MAX_LISTED,
    build_summary,
    empty_counts,
    format_summary,
    summary_path,
)

__all__ = [
    "ALL_RIGHT",
    "ALL_WRONG",
    "DEFAULT_MAX_NORM",
    "HARD",
    "MAX_LISTED",
    "STATUSES",
    "TASK_ORDER",
    "UNPARSEABLE",
    "MinedFile",
    "Selection",
    "check_generation_row",
    "check_max_norm",
    "format_summary",
    "merge_pairs",
    "mine_file",
    "mine_files",
    "output_labels",
    "scale_weights",
    "select_hard",
    "summary_path",
]

_SKIP_HINT = "pass --skip-invalid to skip invalid rows (they are counted in the summary)"


@dataclass
class MinedFile:
    """The pairs of one generation file (weights scaled within the file) and its counts."""

    path: Path
    pairs: list[dict[str, Any]]
    counts: dict[str, dict[str, dict[str, int]]]
    """source -> task -> status -> rows."""
    rows: int
    invalid: list[str] = field(default_factory=list)
    samples_per_row: int | None = None
    outputs: int = 0
    ignored_outputs: int = 0
    raw_weights: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# One file


def check_generation_row(row: Any) -> tuple[str, str] | None:
    """The first problem of one generation row as `(field, message)`, or None when valid.

    `instruction`, `input` and `output` follow the training-data rules (`data.validate`);
    `source` must be a non-empty string and `samples` a non-empty list of strings.
    """
    problem = check_record(row)
    if problem is not None:
        return problem
    source = row.get("source")
    if source is None:
        return "source", "missing (required)"
    if not isinstance(source, str) or not source.strip():
        return "source", f"expected a non-empty string, got {source!r}"
    samples = row.get("samples")
    if samples is None:
        return "samples", "missing (required)"
    if not isinstance(samples, list):
        return "samples", f"expected a list of K sampled outputs, got {type(samples).__name__}"
    if not samples:
        return "samples", "empty list (expected K >= 1 sampled outputs)"
    for i, sample in enumerate(samples):
        if not isinstance(sample, str):
            return "samples", f"item {i} is {type(sample).__name__}, expected a string"
    return None


@dataclass
class _Row:
    line: int
    k: int
    source: str
    selection: Selection
    instruction: str | None  # kept for rows with a pair only (files can be large)
    input: str | None


def mine_file(
    path: str | os.PathLike[str],
    max_norm: float = DEFAULT_MAX_NORM,
    skip_invalid: bool = False,
) -> MinedFile:
    """Mine one generation file; its pairs carry weights scaled within the file.

    The file is streamed; only rows that give a pair keep their text.

    Raises:
        UserError: unreadable or empty file, a bad `max_norm`, a file of K = 1 generations (no
            pair is possible), or (unless `skip_invalid`) the first invalid row, named as
            `FILE:LINE: field 'NAME': problem`. A row whose K differs from the file's most
            common K is reported after the file has been read.
    """
    check_max_norm(max_norm)
    path = Path(path)
    invalid: list[tuple[int, str]] = []

    def reject(line: int, name: str, message: str) -> None:
        text = f"{where(path, line, name)}: {message}"
        if not skip_invalid:
            raise UserError(f"{text}. Fix the file, or {_SKIP_HINT}")
        invalid.append((line, text))

    mined: list[_Row] = []
    rows = 0
    for line, row, problem in _read_rows(path):
        rows += 1
        problem = problem or check_generation_row(row)
        if problem is not None:
            reject(line, *problem)
            continue
        response = split_input(row["input"])[1]
        selection = select_hard(
            parse_labels(row["output"]),
            has_response=response is not None and bool(response.strip()),
            samples=row["samples"],
        )
        hard = selection.task is not None
        mined.append(
            _Row(
                line,
                len(row["samples"]),
                row["source"],
                selection,
                (row.get("instruction") or INSTRUCTION) if hard else None,
                row["input"] if hard else None,
            )
        )
    if rows == 0:
        raise UserError(f"{path}: empty file (no rows)")

    k = _common_k(mined)
    if k == 1:
        rows_k1 = "every row has" if all(item.k == 1 for item in mined) else "most rows have"
        raise UserError(
            f"{path}: {rows_k1} 1 sampled output (k = 1), and k = 1 cannot give preference "
            "pairs: mining needs at least 2 samples per prompt, so that right and wrong outputs "
            "of the same prompt can be paired. Generate with --samples 4 --temperature 0.7 "
            "(reasonguard generate --model M --data SOURCE --samples 4 --temperature 0.7 "
            "--out DIR)"
        )
    kept = []
    for item in mined:
        if item.k == k:
            kept.append(item)
        else:
            reject(
                item.line,
                "samples",
                f"{item.k} sampled outputs where the other rows of this file have {k} "
                "(every row needs the same K)",
            )

    result = MinedFile(
        path=path,
        pairs=[],
        counts={},
        rows=rows,
        invalid=[text for _, text in sorted(invalid)],
        samples_per_row=k,
    )
    hard_rows = []
    for item in kept:
        per_task = result.counts.setdefault(item.source, empty_counts())
        for task, status in item.selection.statuses.items():
            per_task[task][status] += 1
        result.outputs += item.k
        result.ignored_outputs += item.selection.ignored
        if item.selection.task is not None:
            hard_rows.append(item)
    result.raw_weights = [item.selection.raw_weight for item in hard_rows]
    weights = scale_weights(result.raw_weights, max_norm)
    for item, weight in zip(hard_rows, weights, strict=True):
        s = item.selection
        result.pairs.append(
            {
                "instruction": item.instruction,
                "input": item.input,
                "chosen": s.chosen,
                "rejected": s.rejected,
                "sample_weight": weight,
                "task": s.task,
                "source": item.source,
            }
        )
    return result


def _read_rows(path: Path) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    """(line number, parsed row, problem) for each non-blank line, streamed.

    Split on b"\\n" only: JSON strings may hold raw U+2028 and the like, which text-mode line
    iteration would cut.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, ("record", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield number, None, ("record", f"malformed JSON ({exc.msg} at column {exc.colno})")


def _common_k(rows: Sequence[_Row]) -> int | None:
    """The most common K of a file; between equally common ones, the one seen first."""
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.k] = counts.get(row.k, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


# --------------------------------------------------------------------------------------------
# Several files


def merge_pairs(pair_lists: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[list[dict], int]:
    """Concatenate pair lists in order, keeping the first pair of each `input`.

    Returns:
        (merged pairs as new dicts, number of duplicates dropped).
    """
    seen: set[str] = set()
    merged: list[dict] = []
    duplicates = 0
    for pairs in pair_lists:
        for pair in pairs:
            if pair["input"] in seen:
                duplicates += 1
                continue
            seen.add(pair["input"])
            merged.append(dict(pair))
    return merged, duplicates


def mine_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    max_norm: float = DEFAULT_MAX_NORM,
    skip_invalid: bool = False,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Mine generation files, merge and de-duplicate their pairs, write pairs and summary.

    Args:
        paths: generation files, in priority order (the first file wins a duplicate input).
        out: the pair file to write (JSON lines); the summary goes to `summary_path(out)`.
        max_norm: weights span [1 - max_norm, 1 + max_norm] within each file.
        skip_invalid: skip and count invalid rows instead of stopping at the first.
        log: where the summary table and the closing line go.

    Returns:
        The summary written to `summary_path(out)`.

    Raises:
        UserError: no file given, the output would overwrite an input, a bad file or row (see
            `mine_file`), or the output cannot be written.
    """
    check_max_norm(max_norm)
    if not paths:
        raise UserError("no generation file given")
    out = Path(out)
    summary_file = summary_path(out)
    targets = {out.resolve(), summary_file.resolve()}
    for path in paths:
        if Path(path).resolve() in targets:
            raise UserError(f"{path}: is also an output of this run; choose another --out")
    mined = [mine_file(path, max_norm, skip_invalid) for path in paths]
    pairs, duplicates = merge_pairs([m.pairs for m in mined])
    summary = build_summary(mined, pairs, duplicates, out, max_norm)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(summary_file, [json.dumps(summary, indent=2, ensure_ascii=False) + "\n"])
        _write_atomic(out, (json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the pairs ({exc.strerror})") from None
    log(format_summary(summary))
    if not pairs:
        log("warning: no hard samples: every row's outputs agreed on each task it reached")
    log(f"wrote {len(pairs)} pairs to {out} and the summary to {summary_file}")
    return summary


def _write_atomic(path: Path, chunks: Any) -> None:
    """Write text chunks to a temporary file beside `path`, then rename it into place, so a
    reader (or the pipeline's "is this stage done" check) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
