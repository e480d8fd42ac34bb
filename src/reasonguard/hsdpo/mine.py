"""Hard-sample mining: preference pairs from k sampled outputs per prompt (k >= 2).

Input: the training-data generation files of `reasonguard generate --data SOURCE --samples K`,
JSON lines `{"instruction", "input", "output", "source", "samples": [K strings]}`. The true
labels are parsed from `output` by `format.parse_output`, the same parser that reads the samples,
so a sample is judged by exactly the rules that score the model.

Per row:

1. Each sampled output must carry all three answers (`Request:`, `Completion:`, `Response:`; the
   word None counts as an answer, so prompt-only outputs are kept). An output missing any of them
   is ignored.
2. The tasks are tried in the order prompt (the request), response, refusal; response and
   refusal only when the input holds a real AI response and that task's true label is not None.
   A task is hard when the kept outputs are mixed: at least one right and one wrong.
3. The first hard task makes the row's only pair: chosen = the longest right output, rejected =
   the longest wrong one (length in characters; between equally long outputs the earlier sample
   wins, so a rerun picks the same pair), raw weight = #wrong - #right among the kept outputs.

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

Example:
    >>> from reasonguard.hsdpo.mine import scale_weights
    >>> scale_weights([-2, 0, 2], max_norm=0.2)
    [0.8, 1.0, 1.2]
    >>> mine_files(["gen/WildGuardTrainR.jsonl", "gen/AegisTrainR.jsonl"], "pairs.jsonl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonguard.data.validate import check_record
from reasonguard.errors import UserError, where
from reasonguard.format import (
    INSTRUCTION,
    TASKS,
    answer_values,
    parse_labels,
    parse_output,
    split_input,
)

# The order tasks are tried in, spelled out rather than taken from TASKS so a reordering there
# cannot silently change which pair a row gives.
TASK_ORDER = ("prompt", "response", "refusal")
HARD, ALL_RIGHT, ALL_WRONG, UNPARSEABLE = "hard", "all_right", "all_wrong", "unparseable"
STATUSES = (HARD, ALL_RIGHT, ALL_WRONG, UNPARSEABLE)
DEFAULT_MAX_NORM = 0.2
MAX_LISTED = 20  # invalid rows quoted in the summary (all are counted)
_SKIP_HINT = "pass --skip-invalid to skip invalid rows (they are counted in the summary)"


@dataclass(frozen=True)
class Selection:
    """What mining made of one row.

    Attributes:
        statuses: status per task the row reached, in `TASK_ORDER`.
        task: the task of the row's pair, None when it gave none.
        chosen: the longest right output of that task (None without a pair).
        rejected: the longest wrong output of that task (None without a pair).
        raw_weight: #wrong - #right among the kept outputs for that task (None without a pair).
        ignored: sampled outputs ignored for a missing answer.
    """

    statuses: Mapping[str, str]
    task: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    raw_weight: int | None = None
    ignored: int = 0


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
# One row


def output_labels(text: str) -> dict[str, str | None] | None:
    """The three labels of one sampled output by task name, or None when an answer is missing.

    `parse_output` already flags a missing or invalid request; a missing `Completion:` or
    `Response:` line is not a parsing error for it (prompt-only answers may omit them), but
    mining needs all three, so `answer_values` checks that each task has a valid answer line.
    """
    verdict = parse_output(text)
    if verdict.is_parsing_error:
        return None
    if not all(any(valid for _, valid in answer_values(text, task)) for task in TASKS):
        return None
    return {task: verdict.label(task) for task in TASKS}


def select_hard(
    true_labels: Mapping[str, str | None], has_response: bool, samples: Sequence[str]
) -> Selection:
    """Pick the row's pair, if any, by the rules of the module docstring.

    Args:
        true_labels: the row's labels by task name (`format.parse_labels(output)`).
        has_response: whether the input holds a real AI response (not the literal None).
        samples: the K sampled outputs, in generation order.

    Returns:
        The selection; `task` is None when no task was hard.
    """
    kept = [(text, labels) for text in samples if (labels := output_labels(text)) is not None]
    ignored = len(samples) - len(kept)
    if not kept:
        return Selection({TASK_ORDER[0]: UNPARSEABLE}, ignored=ignored)
    statuses: dict[str, str] = {}
    for task in TASK_ORDER:
        truth = true_labels.get(task)
        if truth is None or (task != "prompt" and not has_response):
            continue
        right = [text for text, labels in kept if labels[task] == truth]
        wrong = [text for text, labels in kept if labels[task] != truth]
        if not wrong:
            statuses[task] = ALL_RIGHT
        elif not right:
            statuses[task] = ALL_WRONG
        else:
            statuses[task] = HARD
            return Selection(
                statuses,
                task=task,
                chosen=_longest(right),
                rejected=_longest(wrong),
                raw_weight=len(wrong) - len(right),
                ignored=ignored,
            )
    return Selection(statuses, ignored=ignored)


def _longest(texts: Sequence[str]) -> str:
    # `max` returns the first of equal maxima: the earliest sample wins a tie.
    return max(texts, key=len)


def scale_weights(raw: Sequence[float], max_norm: float = DEFAULT_MAX_NORM) -> list[float]:
    """Min-max scale raw weights to [1 - max_norm, 1 + max_norm].

    w = 1 + m (2 (r - min) / (max - min) - 1), which is 1 - m at the minimum and 1 + m at the
    maximum; when every raw weight is equal (one pair, or all equally hard) there is nothing to
    rank and every weight is 1.0, with no division by zero.

    >>> scale_weights([3, 3])
    [1.0, 1.0]
    """
    check_max_norm(max_norm)
    if not raw:
        return []
    low, high = min(raw), max(raw)
    if high == low:
        return [1.0] * len(raw)
    return [1.0 + max_norm * (2.0 * (r - low) / (high - low) - 1.0) for r in raw]


def check_max_norm(max_norm: float) -> float:
    """Return `max_norm` if it keeps every weight >= 0, else raise `UserError`."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float):
        raise UserError(f"max_norm: expected a number in [0, 1], got {type(max_norm).__name__}")
    if not (math.isfinite(max_norm) and 0.0 <= max_norm <= 1.0):
        raise UserError(
            f"max_norm: expected a number in [0, 1] (weights span [1 - max_norm, 1 + max_norm] "
            f"and must stay >= 0), got {max_norm}"
        )
    return max_norm


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
        per_task = result.counts.setdefault(item.source, _empty_counts())
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


def _empty_counts() -> dict[str, dict[str, int]]:
    return {task: dict.fromkeys(STATUSES, 0) for task in TASK_ORDER}


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


def summary_path(out: str | os.PathLike[str]) -> Path:
    """Where the summary of a pair file goes: `pairs.jsonl` -> `pairs.summary.json`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json")


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
    summary = _summary(mined, pairs, duplicates, out, max_norm)
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


def _summary(
    mined: Sequence[MinedFile],
    pairs: Sequence[Mapping[str, Any]],
    duplicates: int,
    out: Path,
    max_norm: float,
) -> dict[str, Any]:
    by_source: dict[str, dict[str, dict[str, int]]] = {}
    for m in mined:
        for source, per_task in m.counts.items():
            total = by_source.setdefault(source, _empty_counts())
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
