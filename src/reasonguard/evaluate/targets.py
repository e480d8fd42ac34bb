"""Target thresholds (YAML) and their pass/fail check against an evaluation's metrics.

A targets file names levels, each a mapping from metric to its minimum, in percent:

    levels:
      minimum: {overall_accuracy: 70, prompt_f1: 75, refusal_f1: 70, response_f1: 70}

Metrics: `overall_f1`, `overall_accuracy`, and `<task>_f1` / `<task>_accuracy` for the tasks
prompt, response and refusal (`<task>_f1` is the task's weighted F1). Accuracies are pooled over
every scored row (sample-weighted), as in `evaluator.summarise`. A value covers only the
benchmark-task pairs the evaluation scored (`metric_coverage`); `compare` prints that coverage
beside a pass / FAIL checked on part of the suite.

Example:
    >>> from reasonguard.evaluate.targets import load_targets, check_targets
    >>> levels = load_targets("examples/targets-exp19.yaml")
    >>> check_targets(metrics, levels)[0]  # (metric, level, threshold, value, passed)
    ('overall_accuracy', 'minimum', 70.0, 90.65, True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.evaluate.registry import TASK_ORDER, all_pairs
from reasonguard.format import TASKS

METRICS = (
    "overall_f1",
    "overall_accuracy",
    *(f"{task}_{kind}" for task in TASKS for kind in ("f1", "accuracy")),
)


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """The value of a target metric in a `metrics.json` dict (None when not evaluated)."""
    if name.startswith("overall_"):
        return metrics.get(name)
    task, kind = name.rsplit("_", 1)
    info = metrics.get("tasks", {}).get(task, {})
    return info.get("weighted_f1" if kind == "f1" else "accuracy")


def metric_coverage(metrics: dict[str, Any], name: str) -> tuple[int, int]:
    """(pairs scored, pairs in the suite) behind a target metric: all 13 benchmark-task pairs
    for the overall metrics, the task's pairs for `<task>_f1` / `<task>_accuracy`."""
    tasks = metrics.get("tasks") or {}
    if name.startswith("overall_"):
        scored = sum(
            b.name in ((tasks.get(t) or {}).get("benchmarks") or []) for b, t in all_pairs()
        )
        return scored, len(all_pairs())
    task = name.rsplit("_", 1)[0]
    present = (tasks.get(task) or {}).get("benchmarks") or []
    return sum(b in present for b in TASK_ORDER[task]), len(TASK_ORDER[task])


def load_targets(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Read a targets file: {level: {metric: minimum in percent}}.

    Raises:
        UserError: unreadable or malformed YAML, an unknown metric, or a threshold that is not
            a number in [0, 100] (fractions such as 0.75 are rejected: thresholds are percent).
    """
    import yaml  # only `compare --targets` needs it

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    levels = data.get("levels") if isinstance(data, dict) else None
    if not isinstance(levels, dict) or not levels:
        raise UserError(f"{path}: expected a mapping 'levels: {{level: {{metric: minimum}}}}'")
    out: dict[str, dict[str, float]] = {}
    for level, thresholds in levels.items():
        if not isinstance(thresholds, dict) or not thresholds:
            raise UserError(f"{path}: level {level!r}: expected a mapping of metric: minimum")
        out[str(level)] = {}
        for metric, value in thresholds.items():
            place = f"{path}: level {level!r}, metric {metric!r}"
            if metric not in METRICS:
                raise UserError(f"{place}: unknown metric; expected one of {', '.join(METRICS)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(f"{place}: expected a number, got {value!r}")
            if not 0 <= value <= 100 or 0 < value <= 1:
                raise UserError(
                    f"{place}: {value} is not a percentage in (1, 100] (write 75, not 0.75)"
                )
            out[str(level)][metric] = float(value)
    return out


def check_targets(
    metrics: dict[str, Any], levels: dict[str, dict[str, float]]
) -> list[tuple[str, str, float, float | None, bool]]:
    """(metric, level, threshold, value, passed) for every threshold; a missing value fails."""
    return [
        (metric, level, threshold, value, value is not None and value >= threshold)
        for level, thresholds in levels.items()
        for metric, threshold in thresholds.items()
        for value in [metric_value(metrics, metric)]
    ]
