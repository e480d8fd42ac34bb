"""Labelled items for the classifier: a request, a response or None, and a target per task.

A target is the probability that the task's positive label (`harmful`, `refusal`) is right: 1.0
or 0.0 for a gold or teacher label, the teacher's own probability for a soft target, None where
the item has no label for the task (its loss is masked there). An item without a response is
asked the request task only.

The sources that make items are `sources.py` (guard records, benchmark files) and `teacher.py`
(a teacher's predictions).

Example:
    >>> from reasonguard.classifier.items import hard_targets
    >>> hard_targets({"prompt": "harmful", "refusal": "refusal", "response": None}, None)
    {'prompt': 1.0, 'response': None, 'refusal': None}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from reasonguard.format import POSITIVE_LABEL, TASKS


@dataclass(frozen=True)
class LabelledItem:
    """One training item.

    Attributes:
        prompt: the user's request.
        response: the AI's response, or None (then only the request task is asked).
        targets: per task in `format.TASKS`, P(positive label) to learn, or None (no label).
        place: where it came from, for messages (`file:line`, `split 'S' row N`).
        soft: its targets came from a teacher's probabilities.
    """

    prompt: str
    response: str | None
    targets: Mapping[str, float | None]
    place: str
    soft: bool = False

    @property
    def num_labels(self) -> int:
        return sum(t is not None for t in self.targets.values())


def asked(response: str | None) -> tuple[str, ...]:
    """The tasks an item asks: the response tasks only when there is a response."""
    return ("prompt",) if response is None else TASKS


def hard_targets(labels: Mapping[str, str | None], response: str | None) -> dict[str, float | None]:
    """1.0 / 0.0 per asked task with a label, None elsewhere."""
    targets: dict[str, float | None] = dict.fromkeys(TASKS)
    for task in asked(response):
        if labels.get(task) is not None:
            targets[task] = float(labels[task] == POSITIVE_LABEL[task])
    return targets
