"""The markdown report of one evaluation: the paper's three tables with our run beside paper rows.

Example:
    >>> from reasonguard.evaluate.report import render_report
    >>> print(render_report(metrics, paper=["GuardReasoner 1B"]))  # metrics = metrics.json content
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reasonguard.evaluate.metrics import weighted_average
from reasonguard.evaluate.paper import paper_row
from reasonguard.evaluate.registry import BENCHMARKS, TASK_ORDER, TASK_TITLES
from reasonguard.format import TASKS


def fmt(value: float | None, digits: int = 2) -> str:
    """A percentage cell: `-` for a missing value."""
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def paper_cells(name: str, task: str, present: Sequence[str]) -> list[str]:
    """One paper row of a task table: F1 per benchmark, then its weighted average.

    When the run covers only some benchmarks, the average is recomputed over those with the same
    weights (so it compares with ours), and the published full average follows in parentheses.
    """
    scores = paper_row(name).get(task)
    if scores is None:
        return ["-"] * (len(TASK_ORDER[task]) + 1)
    cells = [fmt(scores["f1"][bench]) for bench in TASK_ORDER[task]]
    published = scores["weighted_f1"]
    if not present or list(present) == list(TASK_ORDER[task]):
        return [*cells, fmt(published)]
    values = [scores["f1"][bench] for bench in present]
    if any(v is None for v in values):
        return [*cells, f"- (paper: {fmt(published)})"]
    subset = weighted_average(
        (v, BENCHMARKS[b].weights[task]) for v, b in zip(values, present, strict=True)
    )
    return [*cells, f"{fmt(subset)} (paper: {fmt(published)})"]


def task_table(metrics: dict[str, Any], task: str, label: str, paper: Sequence[str]) -> str:
    """The paper-style F1 table of one task: our run, then the chosen paper rows."""
    ours = {r["benchmark"]: r["f1"] for r in metrics["benchmarks"] if r["task"] == task}
    present = metrics["tasks"][task]["benchmarks"]
    header = ["Method", *TASK_ORDER[task], "Weighted avg"]
    rows = [
        [
            label,
            *(fmt(ours.get(b)) for b in TASK_ORDER[task]),
            fmt(metrics["tasks"][task]["weighted_f1"]),
        ]
    ]
    rows += [[f"{name} (paper)", *paper_cells(name, task, present)] for name in paper]
    return markdown_table(header, rows)


def _failures(r: dict[str, Any]) -> str:
    text = f"{r['parse_failures']} ({r['parse_failure_rate']:.2f}%)"
    extra = [f"{r['dropped']} dropped"] if r["dropped"] else []
    extra += [f"{r['double_counted']} counted twice"] if r["double_counted"] else []
    return f"{text}; {', '.join(extra)}" if extra else text


def details_table(metrics: dict[str, Any]) -> str:
    """Every benchmark-task pair: n, F1, precision, recall, accuracy, confusion, failures."""
    header = ["Benchmark", "Task", "n", "F1", "Precision", "Recall", "Accuracy"]
    header += ["TP", "FP", "FN", "TN", "Parse failures", "Truncated", "Skipped rows"]
    rows = []
    for r in metrics["benchmarks"]:
        c = r["confusion"]
        rows.append(
            [r["benchmark"], r["task"], str(r["n"])]
            + [fmt(r[key]) for key in ("f1", "precision", "recall", "accuracy")]
            + [str(c[key]) for key in ("tp", "fp", "fn", "tn")]
            + [_failures(r), str(r["truncated"]), str(r["skipped_rows"])]
        )
    return markdown_table(header, rows)


def scores_tables(metrics: dict[str, Any]) -> list[str]:
    """The score section's two tables (AUPRC and best threshold; F1 per threshold), or nothing
    when no prediction carried scores."""
    rows = [r for r in metrics["benchmarks"] if r.get("score_metrics")]
    if not rows:
        return []
    summary, sweep = [], []
    for r in rows:
        s = r["score_metrics"]
        best = s["best"] or {}
        at_half = next((e for e in s["sweep"] if e["threshold"] == 0.5), {})
        summary.append(
            [r["benchmark"], r["task"], str(s["rows"]), str(s["no_score"]), fmt(s["auprc"])]
            + [fmt(best.get("threshold"), 1), fmt(best.get("f1")), fmt(at_half.get("f1"))]
        )
        sweep.append([r["benchmark"], r["task"]] + [fmt(e["f1"]) for e in s["sweep"]])
    thresholds = [f"{e['threshold']:.1f}" for e in rows[0]["score_metrics"]["sweep"]]
    header = ["Benchmark", "Task", "Rows with a score", "No score", "AUPRC"]
    header += ["Best threshold", "F1 at best", "F1 at 0.5"]
    return [
        "",
        "## Scores",
        "",
        "The model's probability of the positive label (harmful / refusal) at its answer. AUPRC x100 "
        "(average precision); F1 x100 of predicting positive when that probability >= threshold. "
        "Rows without an answer line have no score and are left out of this section.",
        "",
        markdown_table(header, summary),
        "",
        "### Threshold sweep (F1 %)",
        "",
        markdown_table(["Benchmark", "Task", *thresholds], sweep),
    ]


def render_report(
    metrics: dict[str, Any], paper: Sequence[str] = (), label: str = "This run"
) -> str:
    """The whole report: header, three task tables, overall scores, details and notes.

    Raises:
        UserError: a name in `paper` that is not a row of the paper's tables.
    """
    for name in paper:
        paper_row(name)  # fail early on an unknown row, before any output
    true_labels = (
        f"benchmark files in `{metrics['benchmark_dir']}`"
        if metrics["benchmark_dir"]
        else "the `label` field of each prediction row"
    )
    parts = [
        "# reasonguard evaluation",
        "",
        f"- Predictions: `{metrics['predictions']}`",
        f"- Protocol: **{metrics['protocol']}**: {metrics['protocol_rule']}.",
        f"- True labels: {true_labels}.",
        "- F1 x100, positive class harmful (prompt, response) or refusal (refusal task); "
        "weighted averages use the paper's sample-count weights.",
    ]
    for task in TASKS:
        parts += ["", f"## {TASK_TITLES[task]} (F1 %)", "", task_table(metrics, task, label, paper)]
    overall = metrics["overall_f1"]
    parts += [
        "",
        "## Overall",
        "",
        f"- Overall F1 (mean of the task averages: {', '.join(metrics['overall_tasks']) or 'none'}): "
        f"{fmt(overall)}",
        f"- Overall accuracy (pooled over every scored row of every benchmark-task pair): "
        f"{fmt(metrics['overall_accuracy'])}",
        "",
        "## Details",
        "",
        details_table(metrics) if metrics["benchmarks"] else "(nothing scored)",
        *scores_tables(metrics),
    ]
    missing = [f"{m['benchmark']} ({m['reason']})" for m in metrics["missing"]]
    notes = list(metrics["notes"])
    if missing:
        notes.insert(0, f"missing benchmarks: {', '.join(missing)}")
    if notes:
        parts += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(parts) + "\n"
