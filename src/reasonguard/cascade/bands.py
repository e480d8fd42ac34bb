"""The cascade: fast mode first, full reasoning only for the items fast mode is unsure of.

An item is escalated when, for any task asked of it, fast mode's probability of the task's
positive label (`harmful`, or `refusal`) falls inside that task's uncertainty band `[low, high]`
(or fast mode could not score the task); its reasoning verdict then replaces the fast one. A band
of `[0, 1]` escalates everything (the cascade is reasoning mode), no band escalates nothing (it
is fast mode).

`choose_bands` picks, per task, the band that escalates the fewest items of a labelled dev set
while the cascade's F1 stays within a budget of full reasoning's (`reasonguard calibrate`); the
result is written as `cascade.json` beside the model and read back by default.

Example:
    >>> from reasonguard.cascade.bands import Bands, escalate
    >>> bands = Bands({"prompt": (0.2, 0.8)})
    >>> escalate({"prompt_harmfulness": {"harmful": 0.6, "unharmful": 0.4}}, ("prompt",), bands)
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import POSITIVE_LABEL, TASK_FIELD, TASKS

CASCADE_FILE = "cascade.json"
# `classifier`: the verdict of an encoder classifier alone (`infer/classifier.py`).
MODES = ("reasoning", "fast", "cascade", "classifier")


@dataclass(frozen=True)
class Bands:
    """Per task, the `(low, high)` range of fast-mode P(positive) that is escalated; a task
    missing from `ranges` escalates nothing."""

    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def everything(cls) -> Bands:
        return cls({task: (0.0, 1.0) for task in TASKS})

    @classmethod
    def nothing(cls) -> Bands:
        return cls({})

    def contains(self, task: str, p_positive: float | None) -> bool:
        if task not in self.ranges:
            return False
        if p_positive is None:  # fast mode could not score it: the reasoning verdict decides
            return True
        low, high = self.ranges[task]
        return low <= p_positive <= high

    def to_dict(self) -> dict[str, list[float] | None]:
        return {task: list(self.ranges[task]) if task in self.ranges else None for task in TASKS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "bands") -> Bands:
        ranges = {}
        for task, value in data.items():
            if task not in TASKS:
                raise UserError(f"{where}: unknown task {task!r}; expected {', '.join(TASKS)}")
            if value is None:
                continue
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 2
                or not all(isinstance(v, (int, float)) for v in value)
                or not 0 <= value[0] <= value[1] <= 1
            ):
                raise UserError(
                    f"{where}: task {task!r}: expected [low, high] with 0 <= low <= high <= 1 "
                    f"or null, got {value!r}"
                )
            ranges[task] = (float(value[0]), float(value[1]))
        return cls(ranges)


def positive_probability(scores: Mapping[str, Any], task: str) -> float | None:
    """P(the task's positive label) from a scores dict keyed by verdict field, or None."""
    probs = scores.get(TASK_FIELD[task])
    return None if probs is None else probs.get(POSITIVE_LABEL[task])


def escalate(scores: Mapping[str, Any], asked: Sequence[str], bands: Bands) -> bool:
    """Whether an item whose fast-mode scores are `scores` goes to full reasoning."""
    return any(bands.contains(task, positive_probability(scores, task)) for task in asked)


# --------------------------------------------------------------------------------------------
# The calibration file


def read_calibration(model_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `cascade.json` of a local model folder, or None."""
    path = Path(model_path) / CASCADE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not (
        isinstance(data.get("bands"), dict) or isinstance(data.get("tier_bands"), dict)
    ):
        raise UserError(f"{path}: expected an object with 'bands' (or 'tier_bands')")
    return data


def read_bands(model_path: str | os.PathLike[str], tier: str = "fast") -> Bands | None:
    """The calibrated bands saved beside a model, or None when it has none.

    Args:
        tier: whose bands: `fast` (the two-tier cascade's `bands`), or `classifier`, the first
            tier of a three-tier cascade (`tier_bands`, written by `calibrate --classifier`).

    Raises:
        UserError: an unreadable file or bands.
    """
    data = read_calibration(model_path)
    if data is None:
        return None
    where = str(Path(model_path) / CASCADE_FILE)
    if tier == "fast":
        return None if data.get("bands") is None else Bands.from_dict(data["bands"], where)
    found = (data.get("tier_bands") or {}).get(tier)
    if found is None:
        return None
    if not isinstance(found, dict):
        raise UserError(f"{where}: tier_bands.{tier}: expected an object of bands")
    return Bands.from_dict(found, f"{where}: tier_bands.{tier}")


def write_calibration(folder: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write `cascade.json` (atomically) into `folder`."""
    path = Path(folder) / CASCADE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# Choosing the bands


def f1_score(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """F1 in percent of the positive class (0 when there is no true or predicted positive)."""
    tp = sum(t and p for t, p in zip(truth, predicted, strict=True))
    fp = sum(p and not t for t, p in zip(truth, predicted, strict=True))
    fn = sum(t and not p for t, p in zip(truth, predicted, strict=True))
    return 200.0 * tp / (2 * tp + fp + fn) if tp else 0.0


@dataclass(frozen=True)
class TaskEvidence:
    """What calibration measured for one task on the dev items that have its label.

    Attributes:
        truth: the true label is positive.
        reasoning: the reasoning verdict is positive.
        fast: the fast verdict is positive.
        p_fast: fast mode's P(positive), None where it could not score.
    """

    truth: list[bool]
    reasoning: list[bool]
    fast: list[bool]
    p_fast: list[float | None]


def cascade_predictions(evidence: TaskEvidence, low: float, high: float) -> list[bool]:
    return [
        r if p is None or low <= p <= high else f
        for r, f, p in zip(evidence.reasoning, evidence.fast, evidence.p_fast, strict=True)
    ]


MAX_BOUNDS = 200


def _spread(bounds: list[float]) -> list[float]:
    """At most `MAX_BOUNDS` of the sorted `bounds`, evenly spaced in rank, both ends kept."""
    if len(bounds) <= MAX_BOUNDS:
        return bounds
    step = (len(bounds) - 1) / (MAX_BOUNDS - 1)
    return sorted({bounds[round(i * step)] for i in range(MAX_BOUNDS)})


def choose_band(
    evidence: TaskEvidence, max_f1_drop: float, reference_f1: float | None = None
) -> dict[str, Any]:
    """The band escalating the fewest items whose cascade F1 is at least reasoning's F1 minus
    `max_f1_drop` (points); ties go to the narrower band.

    In a cascade of more tiers (`cascade.fit`), `evidence.reasoning` holds the verdicts of the
    tiers above (what an escalated item gets), `evidence.fast` this tier's, and `reference_f1`
    the F1 the budget is counted from (the top tier's alone; default: that of
    `evidence.reasoning`).

    Candidate bounds are the fast scores themselves (each band is closed; at most
    `MAX_BOUNDS` per side, evenly spaced in rank, on large dev sets), plus the empty band; bands
    straddle 0.5, the fast verdict's decision point. With no item, the band is `[0, 1]`.
    """
    import bisect

    n = len(evidence.truth)
    reasoning_f1 = f1_score(evidence.truth, evidence.reasoning)
    if n == 0:
        return {"band": [0.0, 1.0], "items": 0, "reasoning_f1": None, "fast_f1": None}
    floor = (reasoning_f1 if reference_f1 is None else reference_f1) - max_f1_drop
    scored = sorted({p for p in evidence.p_fast if p is not None})
    lows = _spread([p for p in scored if p <= 0.5] + [0.5])
    highs = _spread([0.5] + [p for p in scored if p >= 0.5])
    unscored = sum(p is None for p in evidence.p_fast)
    ranked = sorted(p for p in evidence.p_fast if p is not None)
    best: tuple[int, float, float, float] | None = None  # (escalated, width, low, high)
    fast_f1 = f1_score(evidence.truth, evidence.fast)
    if fast_f1 >= floor and unscored == 0:
        best = (0, -1.0, 0.5, 0.5)  # the empty band: fast mode alone is good enough
    for low in lows:
        for high in highs:
            inside = bisect.bisect_right(ranked, high) - bisect.bisect_left(ranked, low)
            escalated = unscored + inside
            if best is not None and (escalated, high - low) >= best[:2]:
                continue
            predicted = cascade_predictions(evidence, low, high)
            if f1_score(evidence.truth, predicted) >= floor:
                best = (escalated, high - low, low, high)
    if best is None:  # even [min, max] falls short (cannot happen: it equals reasoning)
        best = (n, 1.0, 0.0, 1.0)
    _, width, low, high = best
    return band_outcome(evidence, None if width < 0 else [low, high])


def band_outcome(evidence: TaskEvidence, band: Sequence[float] | None) -> dict[str, Any]:
    """What the cascade with `band` (None: no band, fast mode alone) does on `evidence`: items,
    escalated (count and share), F1 of each mode and the cascade's drop below reasoning (points).
    Calibration reports it on the items that chose the band and on the held-out ones."""
    n = len(evidence.truth)
    if n == 0:
        return {"band": None if band is None else list(band), "items": 0}
    if band is None:
        predicted, escalated = evidence.fast, 0
    else:
        low, high = band
        predicted = cascade_predictions(evidence, low, high)
        escalated = sum(p is None or low <= p <= high for p in evidence.p_fast)
    reasoning_f1 = f1_score(evidence.truth, evidence.reasoning)
    cascade_f1 = f1_score(evidence.truth, predicted)
    return {
        "band": None if band is None else list(band),
        "items": n,
        "escalated": escalated,
        "escalated_share": escalated / n,
        "reasoning_f1": round(reasoning_f1, 2),
        "fast_f1": round(f1_score(evidence.truth, evidence.fast), 2),
        "cascade_f1": round(cascade_f1, 2),
        "f1_drop": round(reasoning_f1 - cascade_f1, 2),
    }
