"""Score guard outputs on a labelled dataset in the training format (not one of the 13 benchmarks).

Each row carries the record's true `output` (labels parsed from its answer block by the format
module) and the model's `predict`. Every task with a true label is scored: the request always,
refusal and response harmfulness where the record has them. Used by the demo's held-out split and
by `generate --data` outputs (read by `reasonguard.evaluate.datafiles`).

Example:
    >>> from reasonguard.evaluate.dataset import evaluate_dataset
    >>> m = evaluate_dataset([{"output": gold, "predict": text}], name="held-out")
    >>> m["tasks"]["prompt"]["f1"]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reasonguard.evaluate.metrics import Confusion
from reasonguard.evaluate.protocols import PROTOCOLS
from reasonguard.evaluate.report import fmt, markdown_table
from reasonguard.format import POSITIVE_LABEL, TASKS, parse_labels

TASK_TITLES = {"prompt": "Request harmful", "refusal": "Refusal", "response": "Response harmful"}


def evaluate_dataset(
    rows: Iterable[Mapping[str, Any]], name: str = "dataset", protocol: str = "strict"
) -> dict[str, Any]:
    """Per-task F1, precision, recall, accuracy and parse failures over labelled rows.

    Args:
        rows: mappings with `output` (the true record output) and `predict` (the model's text);
            an optional boolean `truncated` marks outputs that hit the token limit.
        name: the dataset name written into the results.
        protocol: `strict` (every row once, a parse failure counts as wrong) or `official`.

    Returns:
        {"dataset", "protocol", "protocol_rule", "n", "tasks": {task: {...}}, "overall_f1",
        "overall_accuracy"}; rates in percent; `overall_f1` is the mean over scored tasks.
    """
    reader = PROTOCOLS[protocol]
    confusion = {task: Confusion() for task in TASKS}
    counts = {task: {"n": 0, "parse_failures": 0, "dropped": 0} for task in TASKS}
    truncated = n = 0
    for row in rows:
        n += 1
        truth = parse_labels(row["output"])
        tasks = [task for task in TASKS if truth[task] is not None]
        predicted, was_truncated = reader.read(
            row["predict"], tasks, bool(row.get("truncated", False))
        )
        truncated += was_truncated
        for task in tasks:
            positive = POSITIVE_LABEL[task]
            true = truth[task]
            counts[task]["n"] += 1
            if predicted[task] is not None:
                confusion[task] = confusion[task].add(true == positive, predicted[task] == positive)
                continue
            counts[task]["parse_failures"] += 1
            copies = reader.failure_copies(true)
            counts[task]["dropped"] += copies == 0
            if copies:
                confusion[task] = confusion[task].add(true == positive, true != positive, copies)
    tasks_out: dict[str, Any] = {}
    for task in TASKS:
        c, k = confusion[task], counts[task]
        if not k["n"]:
            continue
        tasks_out[task] = {
            "f1": c.f1,
            "precision": c.precision,
            "recall": c.recall,
            "accuracy": c.accuracy,
            "n": k["n"],
            "parse_failures": k["parse_failures"],
            "parse_failure_rate": 100.0 * k["parse_failures"] / k["n"],
            "dropped": k["dropped"],
            "confusion": c.to_dict(),
        }
    scored = sum(confusion[t].total for t in tasks_out)
    correct = sum(confusion[t].tp + confusion[t].tn for t in tasks_out)
    return {
        "dataset": name,
        "protocol": protocol,
        "protocol_rule": reader.rule,
        "units": "percent",
        "n": n,
        "truncated": truncated,
        "tasks": tasks_out,
        "overall_f1": (
            sum(t["f1"] for t in tasks_out.values()) / len(tasks_out) if tasks_out else None
        ),
        "overall_accuracy": 100.0 * correct / scored if scored else None,
    }


def render_dataset_report(metrics: Mapping[str, Any]) -> str:
    """A markdown report of `evaluate_dataset` results."""
    rows = []
    for task, r in metrics["tasks"].items():
        c = r["confusion"]
        rows.append(
            [
                TASK_TITLES[task],
                str(r["n"]),
                fmt(r["f1"]),
                fmt(r["precision"]),
                fmt(r["recall"]),
                fmt(r["accuracy"]),
                f"{c['tp']}/{c['fp']}/{c['fn']}/{c['tn']}",
                f"{r['parse_failures']} ({fmt(r['parse_failure_rate'])}%)",
            ]
        )
    table = markdown_table(
        ["Task", "n", "F1", "Precision", "Recall", "Accuracy", "TP/FP/FN/TN", "Parse failures"],
        rows,
    )
    skipped = metrics.get("skipped_rows", 0)
    skipped_line = (
        f"- Skipped bad rows: {skipped} (--skip-bad-rows), e.g. "
        f"{'; '.join(metrics.get('skipped_examples', [])[:3])}\n"
        if skipped
        else ""
    )
    return (
        f"# reasonguard evaluation: {metrics['dataset']}\n\n"
        f"- Rows: {metrics['n']} ({metrics['truncated']} truncated outputs)\n"
        f"{skipped_line}"
        f"- Protocol: **{metrics['protocol']}**: {metrics['protocol_rule']}.\n"
        "- F1 x100, positive class harmful (request, response) or refusal.\n\n"
        f"{table}\n\n"
        f"Overall F1 (mean over tasks): {fmt(metrics['overall_f1'])}; "
        f"overall accuracy (pooled): {fmt(metrics['overall_accuracy'])}\n"
    )
