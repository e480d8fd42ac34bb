"""The per-row rules of hard-sample mining: which task of a row is hard, its chosen and
rejected outputs and raw weight (`select_hard`), and the weights' scaling (`scale_weights`).

1. Each sampled output must carry all three answers (`Request:`, `Completion:`, `Response:`; the
   word None counts as an answer, so prompt-only outputs are kept). An output missing any of them
   is ignored (`output_labels`).
2. The tasks are tried in the order prompt (the request), response, refusal; response and
   refusal only when the input holds a real AI response and that task's true label is not None.
   A task is hard when the kept outputs are mixed: at least one right and one wrong.
3. The first hard task makes the row's only pair: chosen = the longest right output, rejected =
   the longest wrong one (length in characters; between equally long outputs the earlier sample
   wins, so a rerun picks the same pair), raw weight = #wrong - #right among the kept outputs.

Reading generation files, merging them and the summary are `hsdpo.mine`'s.

Example:
    >>> from reasonguard.hsdpo.hard import scale_weights
    >>> scale_weights([-2, 0, 2], max_norm=0.2)
    [0.8, 1.0, 1.2]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reasonguard.errors import UserError
from reasonguard.format import TASKS, answer_values, parse_output

# The order tasks are tried in, spelled out rather than taken from TASKS so a reordering there
# cannot silently change which pair a row gives.
TASK_ORDER = ("prompt", "response", "refusal")
HARD, ALL_RIGHT, ALL_WRONG, UNPARSEABLE = "hard", "all_right", "all_wrong", "unparseable"
STATUSES = (HARD, ALL_RIGHT, ALL_WRONG, UNPARSEABLE)
DEFAULT_MAX_NORM = 0.2


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
