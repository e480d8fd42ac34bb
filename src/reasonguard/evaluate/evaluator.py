"""Score a folder of benchmark predictions: per benchmark-task pair, per task, overall.

Predictions use the official layout `PRED_DIR/<Benchmark>/generated_predictions.jsonl`, one row
`{"prompt", "label", "predict"}` per benchmark row, in benchmark order (an optional boolean
`truncated` marks outputs that hit the token limit). True labels come from the benchmark file when
a benchmark folder is given and holds it, else from each row's `label` field.

Rows written by `generate --scores` also carry `scores` (`{"prompt_harmfulness": {"harmful": p,
...}, ...}`). A benchmark whose rows have them gets, per task, `score_metrics`: AUPRC (average
precision of the positive label's probability) and a threshold sweep. Rows without a probability
for the task (no answer line) are left out of those and counted.

Every benchmark also gets its `cost`: generated tokens per item (`num_tokens`), wall seconds of
generation per item (from the timing file `generate` keeps in `PRED_DIR/_generate/cost/`), the share of items a cascade escalated to reasoning (`escalated`) and the run's
mode (`reasoning`, `fast` or `cascade`, from the rows' `mode` and `escalated` fields); the run's
`cost` pools every benchmark.

Example:
    >>> from reasonguard.evaluate.evaluator import evaluate_predictions
    >>> m = evaluate_predictions("preds/", benchmark_dir="benchmarks/", protocol="official")
    >>> round(m["tasks"]["prompt"]["weighted_f1"], 2), m["overall_f1"] is not None
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError, where
from reasonguard.evaluate.cost import CostTally
from reasonguard.evaluate.files import BadRows, find_predictions, read_json_rows, read_jsonl
from reasonguard.evaluate.labels import true_labels
from reasonguard.evaluate.metrics import (
    Confusion,
    average_precision,
    best_threshold,
    threshold_sweep,
    weighted_average,
)
from reasonguard.evaluate.protocols import PROTOCOLS, Protocol
from reasonguard.evaluate.registry import (
    BENCHMARKS,
    TASK_ORDER,
    Benchmark,
    all_pairs,
)
from reasonguard.format import POSITIVE_LABEL, TASK_FIELD, TASKS

SCHEMA_VERSION = 1
_MAX_EXAMPLES = 5  # bad-row messages kept per benchmark for the report


@dataclass
class _Tally:
    """Running counts for one benchmark-task pair."""

    confusion: Confusion = Confusion()
    n: int = 0
    parse_failures: int = 0
    dropped: int = 0
    double_counted: int = 0
    unlabelled: int = 0
    scored: list[tuple[float, bool]] = field(default_factory=list)  # (P(positive), is positive)
    unscored: int = 0


def _score_benchmark(
    bench: Benchmark,
    pred_path: Path,
    benchmark_dir: Path | None,
    protocol: Protocol,
    skip_bad_rows: bool,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Score one prediction file on every task of its benchmark: (pair results, notes)."""
    bad = BadRows(skip_bad_rows, hint="use --skip-bad-rows to skip such rows and count them")
    preds = read_jsonl(pred_path, bad)[:limit]
    bench_file = benchmark_dir / bench.filename if benchmark_dir else None
    notes: list[str] = []
    if bench_file is not None and bench_file.is_file():
        reference = read_json_rows(bench_file)[:limit]
        if len(reference) != len(preds):
            raise UserError(
                f"{pred_path}: {len(preds)} prediction rows but {len(reference)} rows in "
                f"{bench_file}{'' if limit is None else f' (first {limit})'}; predictions must "
                "hold one row per benchmark row, in order"
            )
        truth = [
            true_labels(bench, row, f"{bench_file} row {i}", None, bad)
            for i, row in enumerate(reference, start=1)
        ]
        labels_from = str(bench_file)
    else:
        truth = [
            None if row is None else true_labels(bench, row, where(pred_path, n), "label", bad)
            for n, row in preds
        ]
        labels_from = "label field of the predictions"
        if bench_file is not None:
            notes.append(
                f"{bench.name}: {bench.filename} not in {benchmark_dir}; true labels read from "
                "the `label` field of the predictions"
            )

    tallies = {task: _Tally() for task in bench.tasks}
    skipped = truncated = 0
    with_scores = False
    cost = CostTally()
    for (number, row), labels in zip(preds, truth, strict=True):
        if row is not None:
            cost.add(row)
        if row is None or labels is None:
            skipped += 1
            continue
        predict = row.get("predict")
        if not isinstance(predict, str):
            problem = "missing key 'predict'" if "predict" not in row else "expected a string"
            bad.add(f"{where(pred_path, number)}: field 'predict': {problem}")
            skipped += 1
            continue
        predicted, was_truncated = protocol.read(predict, bench.tasks, row.get("truncated") is True)
        truncated += was_truncated
        with_scores = with_scores or "scores" in row
        for task in bench.tasks:
            _tally(tallies[task], labels[task], predicted[task], task, protocol)
            if labels[task] is not None:
                _tally_score(tallies[task], labels[task], row.get("scores"), task)

    results = [
        _pair_result(bench, task, tally, skipped, truncated, labels_from)
        for task, tally in tallies.items()
    ]
    if with_scores:
        for result, tally in zip(results, tallies.values(), strict=True):
            result["score_metrics"] = _score_metrics(tally)
    cost.add_timing(pred_path)
    for result in results:
        result["cost"] = cost.to_dict()
        result["_cost_tally"] = cost
    if bad.messages:
        notes.append(f"{bench.name}: skipped {skipped} bad rows, e.g. {bad.messages[0]}")
        for result in results:
            result["bad_rows"] = bad.messages[:_MAX_EXAMPLES]
    return results, notes


def _tally(
    tally: _Tally, true: str | None, predicted: str | None, task: str, protocol: Protocol
) -> None:
    if true is None:
        tally.unlabelled += 1
        return
    positive = POSITIVE_LABEL[task]
    tally.n += 1
    if predicted is not None:
        tally.confusion = tally.confusion.add(true == positive, predicted == positive)
        return
    tally.parse_failures += 1
    copies = protocol.failure_copies(true)
    tally.dropped += copies == 0
    tally.double_counted += copies > 1
    if copies:
        # A failure counts as the wrong answer: the opposite of the true label.
        tally.confusion = tally.confusion.add(true == positive, true != positive, copies)


def _tally_score(tally: _Tally, true: str, scores: Any, task: str) -> None:
    """Record the probability the row gives the task's positive label, if it gives one."""
    positive = POSITIVE_LABEL[task]
    probs = scores.get(TASK_FIELD[task]) if isinstance(scores, dict) else None
    p = probs.get(positive) if isinstance(probs, dict) else None
    if isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0:
        tally.scored.append((float(p), true == positive))
    else:
        tally.unscored += 1


def _score_metrics(t: _Tally) -> dict[str, Any]:
    sweep = threshold_sweep(t.scored)
    return {
        "auprc": average_precision(t.scored),
        "rows": len(t.scored),
        "positives": sum(1 for _, positive in t.scored if positive),
        "no_score": t.unscored,
        "sweep": sweep,
        "best": best_threshold(sweep) if t.scored else None,
    }


def _pair_result(
    bench: Benchmark, task: str, t: _Tally, skipped: int, truncated: int, labels_from: str
) -> dict[str, Any]:
    c = t.confusion
    return {
        "benchmark": bench.name,
        "task": task,
        "f1": c.f1,
        "precision": c.precision,
        "recall": c.recall,
        "accuracy": c.accuracy,
        "n": t.n,
        "parse_failures": t.parse_failures,
        "parse_failure_rate": 100.0 * t.parse_failures / t.n if t.n else 0.0,
        "confusion": c.to_dict(),
        "scored": c.total,
        "dropped": t.dropped,
        "double_counted": t.double_counted,
        "unlabelled": t.unlabelled,
        "skipped_rows": skipped,
        "truncated": truncated,
        "weight": bench.weights[task],
        "labels_from": labels_from,
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task weighted F1 and pooled accuracy, and the overall scores, from pair results.

    Returns:
        {"tasks": {task: {"weighted_f1", "accuracy", "benchmarks", "missing", "weights"}},
        "overall_f1", "overall_tasks", "overall_accuracy"}. Averages cover the benchmarks
        present; `overall_f1` is the mean of the task averages present; `overall_accuracy` pools
        every scored row of every pair (sample-weighted accuracy).
    """
    tasks: dict[str, Any] = {}
    for task in TASKS:
        present = {r["benchmark"]: r for r in results if r["task"] == task}
        names = [name for name in TASK_ORDER[task] if name in present]
        scored = sum(present[n]["scored"] for n in names)
        correct = sum(present[n]["confusion"]["tp"] + present[n]["confusion"]["tn"] for n in names)
        tasks[task] = {
            "weighted_f1": weighted_average(
                (present[n]["f1"], present[n]["weight"]) for n in names
            ),
            "accuracy": 100.0 * correct / scored if scored else None,
            "benchmarks": names,
            "missing": [name for name in TASK_ORDER[task] if name not in present],
            "weights": {n: present[n]["weight"] for n in names},
        }
    done = [task for task in TASKS if tasks[task]["weighted_f1"] is not None]
    scored = sum(r["scored"] for r in results)
    correct = sum(r["confusion"]["tp"] + r["confusion"]["tn"] for r in results)
    return {
        "tasks": tasks,
        "overall_f1": sum(tasks[t]["weighted_f1"] for t in done) / len(done) if done else None,
        "overall_tasks": done,
        "overall_accuracy": 100.0 * correct / scored if scored else None,
    }


def evaluate_predictions(
    pred_dir: str | os.PathLike[str],
    benchmark_dir: str | os.PathLike[str] | None = None,
    protocol: str = "strict",
    skip_bad_rows: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score every benchmark folder in `pred_dir`; return the `metrics.json` content.

    Args:
        pred_dir: folder of `<Benchmark>/generated_predictions.jsonl`.
        benchmark_dir: folder of the official benchmark files (true labels); None to read the
            true labels from the predictions' `label` field.
        protocol: `strict` or `official` (see `protocols.py`).
        skip_bad_rows: skip and count bad rows instead of stopping at the first.
        limit: score only the first `limit` rows of each benchmark (a `--limit` generation).

    Returns:
        A JSON-ready dict: protocol, per-pair `benchmarks`, per-task `tasks`, `overall_f1`,
        `overall_accuracy`, `missing` benchmarks and `notes` for the report. Rates in percent.

    Raises:
        UserError: bad input (see `files.py`), an unknown protocol or benchmark folder, or a
            prediction file whose row count differs from its benchmark file.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    pred_dir = Path(pred_dir)
    bench_dir = Path(benchmark_dir) if benchmark_dir is not None else None
    found, missing = find_predictions(pred_dir)
    by_pair: dict[tuple[str, str], dict[str, Any]] = {}
    notes: list[str] = []
    for name, path in found.items():
        results, bench_notes = _score_benchmark(
            BENCHMARKS[name], path, bench_dir, PROTOCOLS[protocol], skip_bad_rows, limit
        )
        by_pair.update({(r["benchmark"], r["task"]): r for r in results})
        notes += bench_notes
    results = [by_pair[b.name, task] for b, task in all_pairs() if (b.name, task) in by_pair]
    cost = CostTally()
    for result in results:
        tally = result.pop("_cost_tally")
        if result["task"] == _first_task(result):  # one tally per file, not per task
            cost = cost.merge(tally)
    if bench_dir is None:
        notes.insert(
            0,
            "no benchmark folder given: true labels read from the `label` field of the predictions",
        )
    if limit is not None:
        notes.insert(0, f"only the first {limit} rows of each benchmark were scored (--limit)")
    summary = summarise(results)
    for task, info in summary["tasks"].items():
        if info["missing"] and info["benchmarks"]:
            notes.append(
                f"{task}: weighted F1 over {len(info['benchmarks'])} of "
                f"{len(TASK_ORDER[task])} benchmarks (missing: {', '.join(info['missing'])})"
            )
    if summary["overall_f1"] is not None and len(summary["overall_tasks"]) < len(TASKS):
        notes.append(f"overall F1 = mean over tasks {', '.join(summary['overall_tasks'])} only")
    return {
        "schema_version": SCHEMA_VERSION,
        "protocol": protocol,
        "protocol_rule": PROTOCOLS[protocol].rule,
        "predictions": str(pred_dir),
        "benchmark_dir": None if bench_dir is None else str(bench_dir),
        "units": "percent",
        "benchmarks": results,
        **summary,
        "skipped_rows": sum(r["skipped_rows"] for r in results if r["task"] == _first_task(r)),
        "cost": cost.to_dict(),
        "missing": missing,
        "notes": notes,
    }


def _first_task(result: dict[str, Any]) -> str:
    # Skipped rows are per file; count them once per benchmark, not once per task.
    return BENCHMARKS[result["benchmark"]].tasks[0]
