"""Calibrate a guard's cascade on a labelled dev set (`reasonguard calibrate`).

Both modes run on every dev item: full reasoning (the reference verdicts and their generated
tokens) and fast mode (the label probabilities). The items are then split (a seeded stratified
split, `holdout.py`): per task, `cascade.choose_band` picks on the calibration part the band that
escalates the fewest items while the cascade's F1 stays within `max_f1_drop` points of full
reasoning's, and the F1 drop and share escalated of those bands are reported on the held-out
part, which the choice never read. The result, with what it was measured on and the hashes of
the items of each part, is written as `cascade.json` beside the model, where `load_guard`,
`classify`, `generate`/`evaluate --mode cascade` and the server read it.

Dev items come from a training-format source (records whose `output` ends in an answer block,
e.g. a slice of the training data held out from training) or from benchmark files (their true
labels, as `evaluate` reads them; a benchmark calibrated on is then no longer a test set).

Example:
    >>> from reasonguard import load_guard
    >>> from reasonguard.cascade.calibrate import calibrate, items_from_source
    >>> guard = load_guard("runs/demo/model/final")
    >>> record = calibrate(guard, items_from_source("dev.jsonl"), max_f1_drop=0.5)
    >>> record["bands"], record["held_out"]["escalated_share"]
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.cascade.bands import (
    Bands,
    TaskEvidence,
    band_outcome,
    choose_band,
    escalate,
    positive_probability,
)
from reasonguard.cascade.holdout import (
    DEFAULT_HELD_OUT_SHARE,
    DEFAULT_SEED,
    HASH_METHOD,
    METHOD,
    item_hash,
    stratified_split,
)
from reasonguard.errors import UserError
from reasonguard.format import POSITIVE_LABEL, TASKS, split_input

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
    from reasonguard.evaluate.files import BadRows
    from reasonguard.evaluate.labels import true_labels
    from reasonguard.evaluate.registry import BENCHMARKS
    from reasonguard.generation.run import benchmark_jobs

    items = []
    for job in benchmark_jobs(names, benchmark_dir):
        bench = BENCHMARKS[job.name]
        for row, record in enumerate(job.records, start=1):
            place = f"{Path(benchmark_dir) / bench.filename} row {row}"
            labels = true_labels(bench, record, place, None, BadRows(skip=False))
            prompt, response = _split(record, place)
            truth = {t: (labels or {}).get(t) for t in TASKS}
            items.append(DevItem(prompt, response, truth, place))
    return items


def _asked(item: DevItem) -> tuple[str, ...]:
    return ("prompt",) if item.response is None else TASKS


@dataclass(frozen=True)
class Measured:
    """Both modes' verdicts on every dev item, and the seconds each mode took."""

    reasoning: list[Any]
    fast: list[Any]
    reasoning_seconds: float
    fast_seconds: float


def measure(
    guard: Any, items: Sequence[DevItem], max_new_tokens: int | None = None, log: Any = None
) -> Measured:
    """Run full reasoning and fast mode on every item (held-out ones too: they are reported)."""
    say = log or (lambda text: None)
    pairs = [{"prompt": i.prompt, "response": i.response} for i in items]
    clock = time.perf_counter()
    say(f"reasoning mode on {len(items)} dev items ...")
    reasoned = guard.classify(pairs, mode="reasoning", scores=False, max_new_tokens=max_new_tokens)
    reasoning_seconds = time.perf_counter() - clock
    say("fast mode ...")
    clock = time.perf_counter()
    fast = guard.classify(pairs, mode="fast")
    return Measured(reasoned, fast, reasoning_seconds, time.perf_counter() - clock)


def split_dev(
    items: Sequence[DevItem], held_out_share: float, seed: int, per_source: bool = False
) -> tuple[list[int], list[int]]:
    """The (calibration, held-out) positions of `items` (see `holdout.stratified_split`).

    Args:
        per_source: stratify by the item's source file (its `place` without the row) as well
            as its labels, so every file gives its share to each part.
    """
    strata: list[tuple] = [tuple(item.truth[t] for t in TASKS) for item in items]
    if per_source:
        strata = [
            (item.place.rsplit(" row ", 1)[0], *s) for item, s in zip(items, strata, strict=True)
        ]
    keys = [item_hash(item.prompt, item.response) for item in items]
    return stratified_split(strata, held_out_share, seed, keys)


def _evidence(
    items: Sequence[DevItem], measured: Measured, positions: Sequence[int], task: str
) -> TaskEvidence:
    keep = [k for k in positions if task in _asked(items[k]) and items[k].truth[task] is not None]
    positive = POSITIVE_LABEL[task]
    return TaskEvidence(
        truth=[items[k].truth[task] == positive for k in keep],
        reasoning=[measured.reasoning[k].label(task) == positive for k in keep],
        fast=[measured.fast[k].label(task) == positive for k in keep],
        p_fast=[positive_probability(measured.fast[k].scores, task) for k in keep],
    )


def _escalated(
    items: Sequence[DevItem], measured: Measured, positions: Sequence[int], bands: Bands
) -> list[int]:
    return [k for k in positions if escalate(measured.fast[k].scores, _asked(items[k]), bands)]


def fit(
    items: Sequence[DevItem],
    measured: Measured,
    split: tuple[Sequence[int], Sequence[int]],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
) -> dict[str, Any]:
    """Choose the bands on the calibration positions of `split`, report them on the held-out
    ones (whose labels and verdicts are not read while choosing).

    Returns:
        The `cascade.json` record (see `calibrate`).
    """
    calibration, held_out = split
    tasks: dict[str, Any] = {}
    reported: dict[str, Any] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for task in TASKS:
        tasks[task] = choose_band(_evidence(items, measured, calibration, task), max_f1_drop)
        if tasks[task]["band"] is not None:
            ranges[task] = tuple(tasks[task]["band"])  # type: ignore[assignment]
    bands = Bands(ranges)
    for task in TASKS:
        reported[task] = band_outcome(
            _evidence(items, measured, held_out, task), bands.to_dict()[task]
        )
    tokens = [r.num_tokens for r in measured.reasoning]
    n = len(items)
    parts = {}
    for name, positions, per_task in (
        ("calibration", calibration, tasks),
        ("held_out", held_out, reported),
    ):
        hard = _escalated(items, measured, positions, bands)
        parts[name] = {
            "items": len(positions),
            "tasks": per_task,
            "escalated": len(hard),
            "escalated_share": len(hard) / len(positions),
            "cascade_tokens_per_item": sum(tokens[k] for k in hard) / len(positions),
        }
    share = parts["held_out"]["escalated_share"]
    reasoning_seconds = measured.reasoning_seconds / n
    fast_seconds = measured.fast_seconds / n
    return {
        "bands": bands.to_dict(),
        "max_f1_drop": max_f1_drop,
        "items": n,
        **parts,
        # Over all items for the two modes (a mode's cost does not depend on the split); the
        # cascade's at the held-out escalation.
        "tokens_per_item": {
            "reasoning": sum(tokens) / n,
            "fast": 0.0,
            "cascade": parts["held_out"]["cascade_tokens_per_item"],
        },
        "seconds_per_item": {
            "reasoning": reasoning_seconds,
            "fast": fast_seconds,
            "cascade_estimated": fast_seconds + reasoning_seconds * share,
        },
        "reasoning_parse_failures": sum(r.is_parsing_error for r in measured.reasoning),
        "item_hashes": {
            "method": HASH_METHOD,
            **{
                name: [item_hash(items[k].prompt, items[k].response) for k in positions]
                for name, positions in (("calibration", calibration), ("held_out", held_out))
            },
        },
    }


def calibrate(
    guard: Any,
    items: Sequence[DevItem],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    max_new_tokens: int | None = None,
    log: Any = None,
    held_out_share: float = DEFAULT_HELD_OUT_SHARE,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Measure both modes on `items`, choose the cascade's bands on a seeded stratified part of
    them and report the bands on the rest (see the module docstring).

    Args:
        held_out_share: the share of the distinct items held out for the report.
        seed: which items are held out.

    Returns:
        The `cascade.json` record: `bands`; the `split`; per part (`calibration`, `held_out`)
        its items, per-task evidence (`tasks`: band, F1 of each mode, the cascade's F1 and
        `f1_drop`, share escalated) and overall share escalated; tokens and seconds per item
        of each mode; and `item_hashes`, which items each part holds.

    Raises:
        UserError: no items, fewer than two distinct items, a negative budget, or a held-out
            share outside (0, 1).
    """
    if not items:
        raise UserError("the dev set has no items")
    if max_f1_drop < 0:
        raise UserError(f"--max-f1-drop must not be negative, got {max_f1_drop}")
    split = split_dev(items, held_out_share, seed)  # bad settings fail before the model runs
    measured = measure(guard, items, max_new_tokens, log)
    record = fit(items, measured, split, max_f1_drop)
    return {
        **record,
        "split": {
            "method": METHOD,
            "held_out_share": held_out_share,
            "seed": seed,
            "strata": "the true labels of the three tasks",
        },
    }
