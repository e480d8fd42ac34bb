"""Binary classification metrics (in percent) and the sample-weighted average of the paper.

Example:
    >>> from reasonguard.evaluate.metrics import Confusion, weighted_average
    >>> c = Confusion(tp=8, fp=2, fn=2, tn=8)
    >>> c.f1, c.accuracy
    (80.0, 80.0)
    >>> weighted_average([(80.0, 100), (40.0, 300)])
    50.0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def _percent(numerator: int, denominator: int) -> float:
    # An empty denominator scores 0, as scikit-learn's `zero_division` default does (so a
    # benchmark with no positive predictions and no positives gets F1 0, not an error).
    return 100.0 * numerator / denominator if denominator else 0.0


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary confusion matrix, the positive class being harmful / refusal."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, true_positive: bool, predicted_positive: bool, copies: int = 1) -> Confusion:
        """A new matrix with `copies` more rows of this (true, predicted) kind."""
        if true_positive:
            if predicted_positive:
                return Confusion(self.tp + copies, self.fp, self.fn, self.tn)
            return Confusion(self.tp, self.fp, self.fn + copies, self.tn)
        if predicted_positive:
            return Confusion(self.tp, self.fp + copies, self.fn, self.tn)
        return Confusion(self.tp, self.fp, self.fn, self.tn + copies)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def f1(self) -> float:
        """F1 x100 = 2TP / (2TP + FP + FN)."""
        return _percent(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _percent(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _percent(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        return _percent(self.tp + self.tn, self.total)

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def weighted_average(values: Iterable[tuple[float, float]]) -> float | None:
    """Mean of `value` weighted by `weight` over (value, weight) pairs; None when there are none.

    The paper's per-task "Weighted Average" is this over the benchmarks of a task, each weighted
    by its sample count (see `registry.Benchmark.weights`).
    """
    pairs = list(values)
    total = sum(weight for _, weight in pairs)
    if not pairs or total <= 0:
        return None
    return sum(value * weight for value, weight in pairs) / total


# Thresholds of the score sweep: predict the positive class when its probability >= t.
SWEEP_THRESHOLDS = tuple(i / 10 for i in range(1, 10))


def average_precision(scored: Iterable[tuple[float, bool]]) -> float | None:
    """Average precision x100 (the area under the precision-recall curve, step-wise, as
    scikit-learn's `average_precision_score` computes it) of (score, is_positive) pairs.

    AP = sum over distinct score thresholds t, from high to low, of (R_t - R_prev) * P_t, where
    P_t and R_t are the precision and recall of "positive iff score >= t". Rows with equal
    scores enter together. None when there is no positive row (recall is undefined).
    """
    pairs = sorted(scored, key=lambda pair: -pair[0])
    positives = sum(1 for _, positive in pairs if positive)
    if not positives:
        return None
    area, tp, fp, recall, i = 0.0, 0, 0, 0.0, 0
    while i < len(pairs):
        score = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == score:  # a tie is one threshold
            tp += pairs[i][1]
            fp += not pairs[i][1]
            i += 1
        new_recall = tp / positives
        area += (new_recall - recall) * tp / (tp + fp)
        recall = new_recall
    return 100.0 * area


def threshold_sweep(
    scored: Iterable[tuple[float, bool]], thresholds: Iterable[float] = SWEEP_THRESHOLDS
) -> list[dict[str, float]]:
    """F1, precision and recall (x100) of "positive iff score >= t" at each threshold t."""
    pairs = list(scored)
    sweep = []
    for t in thresholds:
        c = Confusion()
        for score, positive in pairs:
            c = c.add(positive, score >= t)
        sweep.append({"threshold": t, "f1": c.f1, "precision": c.precision, "recall": c.recall})
    return sweep


def best_threshold(sweep: list[dict[str, float]]) -> dict[str, float] | None:
    """The sweep entry with the highest F1 (the lowest threshold among equals)."""
    return max(sweep, key=lambda entry: (entry["f1"], -entry["threshold"]), default=None)
