"""Calibrate a guard's cascade on a labelled dev set (`reasonguard calibrate`).

Both modes run on every dev item: full reasoning (the reference verdicts and their generated
tokens) and fast mode (the label probabilities). Per task, `cascade.choose_band` then picks the
band that escalates the fewest items while the cascade's F1 stays within `max_f1_drop` points of
full reasoning's. The result, with what it was measured on, is written as `cascade.json` beside
the model, where `load_guard`, `classify`, `generate`/`evaluate --mode cascade` and the server
read it.

Dev items come from a training-format source (records whose `output` ends in an answer block,
e.g. a held-out slice of GuardReasonerTrain) or from benchmark files (their true labels, as
`evaluate` reads them).

Example:
    >>> from reasonguard import load_guard
    >>> from reasonguard.infer.calibrate import calibrate, items_from_source
    >>> guard = load_guard("runs/demo/model/final")
    >>> record = calibrate(guard, items_from_source("dev.jsonl"), max_f1_drop=0.5)
    >>> record["bands"], record["escalated_share"]
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import POSITIVE_LABEL, TASKS, split_input
from reasonguard.infer.cascade import (
    Bands,
    TaskEvidence,
    choose_band,
    escalate,
    positive_probability,
)

DEFAULT_MAX_F1_DROP = 0.5


@dataclass(frozen=True)
class DevItem:
    """One labelled dev item: the prompt, the response (or None) and the true label per task
    (None where the item has no label for it)."""

    prompt: str
    response: str | None
    truth: dict[str, str | None]
    place: str


def _split(record: Any, place: str) -> tuple[str, str | None]:
    if not isinstance(record, dict) or not isinstance(record.get("input"), str):
        raise UserError(f"{place}: field 'input': missing or not a string")
    try:
        return split_input(record["input"])
    except ValueError as exc:
        raise UserError(f"{place}: field 'input': {exc}") from None


def items_from_source(source: str, splits: Sequence[str] | None = None) -> list[DevItem]:
    """Dev items from a training-format source: labels from the answer block of `output`.

    Raises:
        UserError: an unreadable source, or a record without input or answer block.
    """
    from reasonguard.data.sources import load_source
    from reasonguard.evaluate.labels import read_label

    items = []
    for split, records in load_source(source, splits).items():
        for row, record in enumerate(records, start=1):
            place = f"{source}: split {split!r} row {row}"
            prompt, response = _split(record, place)
            try:
                truth = {t: read_label(record.get("output"), t, bare=False) for t in TASKS}
            except ValueError as exc:
                raise UserError(f"{place}: field 'output': {exc}") from None
            if truth["prompt"] is None:
                raise UserError(f"{place}: field 'output': no `Request:` label in its answer block")
            items.append(DevItem(prompt, response, truth, place))
    return items


def items_from_benchmarks(
    names: Sequence[str], benchmark_dir: str | os.PathLike[str]
) -> list[DevItem]:
    """Dev items from benchmark files, labelled as `evaluate` reads them.

    Raises:
        UserError: unknown or missing benchmarks, or a row without a readable label.
    """
    from reasonguard.evaluate.evaluator import _true_labels
    from reasonguard.evaluate.files import BadRows
    from reasonguard.evaluate.registry import BENCHMARKS
    from reasonguard.infer.generate import benchmark_jobs

    items = []
    for job in benchmark_jobs(names, benchmark_dir):
        bench = BENCHMARKS[job.name]
        for row, record in enumerate(job.records, start=1):
            place = f"{Path(benchmark_dir) / bench.filename} row {row}"
            labels = _true_labels(bench, record, place, None, BadRows(skip=False))
            prompt, response = _split(record, place)
            truth = {t: (labels or {}).get(t) for t in TASKS}
            items.append(DevItem(prompt, response, truth, place))
    return items


def _asked(item: DevItem) -> tuple[str, ...]:
    return ("prompt",) if item.response is None else TASKS


def calibrate(
    guard: Any,
    items: Sequence[DevItem],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    max_new_tokens: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Measure both modes on `items` and choose the cascade's bands (see the module docstring).

    Returns:
        The `cascade.json` record: `bands`, per-task evidence (`tasks`), the share escalated,
        tokens per item in each mode, and what it was measured on.

    Raises:
        UserError: no items, or a negative budget.
    """
    if not items:
        raise UserError("the dev set has no items")
    if max_f1_drop < 0:
        raise UserError(f"--max-f1-drop must not be negative, got {max_f1_drop}")
    say = log or (lambda text: None)
    pairs = [{"prompt": i.prompt, "response": i.response} for i in items]
    clock = time.perf_counter()
    say(f"reasoning mode on {len(items)} dev items ...")
    reasoned = guard.classify(pairs, mode="reasoning", scores=False, max_new_tokens=max_new_tokens)
    reasoning_seconds = time.perf_counter() - clock
    say("fast mode ...")
    clock = time.perf_counter()
    fast = guard.classify(pairs, mode="fast")
    fast_seconds = time.perf_counter() - clock
    tasks: dict[str, Any] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for task in TASKS:
        keep = [
            k
            for k, item in enumerate(items)
            if task in _asked(item) and item.truth[task] is not None
        ]
        positive = POSITIVE_LABEL[task]
        evidence = TaskEvidence(
            truth=[items[k].truth[task] == positive for k in keep],
            reasoning=[reasoned[k].label(task) == positive for k in keep],
            fast=[fast[k].label(task) == positive for k in keep],
            p_fast=[positive_probability(fast[k].scores, task) for k in keep],
        )
        tasks[task] = choose_band(evidence, max_f1_drop)
        if tasks[task]["band"] is not None:
            ranges[task] = tuple(tasks[task]["band"])  # type: ignore[assignment]
    bands = Bands(ranges)
    hard = [k for k, item in enumerate(items) if escalate(fast[k].scores, _asked(item), bands)]
    tokens = [r.num_tokens for r in reasoned]
    n = len(items)
    return {
        "bands": bands.to_dict(),
        "max_f1_drop": max_f1_drop,
        "items": n,
        "tasks": tasks,
        "escalated": len(hard),
        "escalated_share": len(hard) / n,
        "tokens_per_item": {
            "reasoning": sum(tokens) / n,
            "fast": 0.0,
            "cascade": sum(tokens[k] for k in hard) / n,
        },
        # Measured for the two modes; the cascade's is their sum at its escalated share.
        "seconds_per_item": {
            "reasoning": reasoning_seconds / n,
            "fast": fast_seconds / n,
            "cascade_estimated": fast_seconds / n + reasoning_seconds / n * len(hard) / n,
        },
        "reasoning_parse_failures": sum(r.is_parsing_error for r in reasoned),
    }
