"""The markdown report of one evaluation: the paper's three tables with our run beside paper rows.

Example:
    >>> from reasonguard.evaluate.report import render_report
    >>> print(render_report(metrics, paper=["GuardReasoner 1B"]))  # metrics = metrics.json content
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reasonguard.evaluate.metrics import weighted_average
from reasonguard.evaluate.paper import paper_row, paper_row_name
from reasonguard.evaluate.registry import BENCHMARKS, TASK_ORDER, TASK_TITLES, all_pairs
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
    rows += [
        [f"{paper_row_name(name)} (paper)", *paper_cells(name, task, present)] for name in paper
    ]
    return markdown_table(header, rows)


def coverage(metrics: dict[str, Any]) -> dict[str, Any]:
    """How much of the benchmark suite an evaluation's averages cover.

    Returns:
        {"pairs_scored", "pairs_total", "tasks": {task: {"pairs_scored", "pairs_total"}},
        "missing": [{"benchmark", "task"}, ...]}: the benchmark-task pairs behind the task
        averages and the overall scores, out of the paper's 13, and the pairs left out (in the
        paper's table order).
    """
    tasks = metrics.get("tasks") or {}
    scored = {(b, t) for t in TASKS for b in (tasks.get(t) or {}).get("benchmarks") or []}
    return {
        "pairs_scored": sum((b.name, t) in scored for b, t in all_pairs()),
        "pairs_total": len(all_pairs()),
        "tasks": {
            t: {
                "pairs_scored": sum((b, t) in scored for b in TASK_ORDER[t]),
                "pairs_total": len(TASK_ORDER[t]),
            }
            for t in TASKS
        },
        "missing": [
            {"benchmark": b.name, "task": t} for b, t in all_pairs() if (b.name, t) not in scored
        ],
    }


def missing_pairs_text(cover: dict[str, Any]) -> str:
    """The missing pairs of `coverage()`, one name per benchmark: `ToxicChat, WildGuardTest
    (prompt, response, refusal)`; a benchmark scored on one task only carries no task list."""
    by_bench: dict[str, list[str]] = {}
    for pair in cover["missing"]:
        by_bench.setdefault(pair["benchmark"], []).append(pair["task"])
    return ", ".join(
        name if len(BENCHMARKS[name].tasks) == 1 else f"{name} ({', '.join(tasks)})"
        for name, tasks in by_bench.items()
    )


def coverage_text(cover: dict[str, Any]) -> str:
    """`over 6 of 13 benchmark-task pairs (missing: ...)`, or `over all 13 ...` when complete."""
    total = cover["pairs_total"]
    if cover["pairs_scored"] == total:
        return f"over all {total} benchmark-task pairs"
    return (
        f"over {cover['pairs_scored']} of {total} benchmark-task pairs "
        f"(missing: {missing_pairs_text(cover)})"
    )


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


def cost_section(metrics: dict[str, Any]) -> list[str]:
    """The cost section: generated tokens, seconds and escalations per item, per benchmark and
    overall, and the share each tier answered when the run had several (nothing when the rows
    recorded no cost)."""
    from reasonguard.evaluate.cost import tier_text

    overall = metrics.get("cost") or {}
    if not overall.get("items") or overall.get("tokens_per_item") is None:
        return []
    tiered = len(overall.get("tier_shares") or {}) > 1

    def cells(cost: dict[str, Any]) -> list[str]:
        seconds, share = cost.get("seconds_per_item"), cost.get("escalated_share")
        return [
            str(cost["items"]),
            "-" if cost.get("tokens_per_item") is None else f"{cost['tokens_per_item']:.1f}",
            "-" if seconds is None else f"{seconds:.3f}",
            "-" if share is None else f"{100 * share:.0f}%",
        ] + ([tier_text(cost)] if tiered else [])

    seen, rows = set(), []
    for r in metrics["benchmarks"]:
        if r["benchmark"] not in seen and r.get("cost"):
            seen.add(r["benchmark"])
            rows.append([r["benchmark"], *cells(r["cost"])])
    rows.append(["All", *cells(overall)])
    header = ["Benchmark", "Items", "Generated tokens / item", "Seconds / item", "Escalated"]
    header += ["Answered by tier"] if tiered else []
    return [
        "",
        f"## Cost (mode: {overall.get('mode')})",
        "",
        "Generated tokens and wall seconds of generation per item (a batch's time shared by its "
        "items; model loading excluded); escalated: the share of items a cascade sent to "
        "reasoning"
        + (
            "; answered by tier: the share of items each tier of the cascade answered."
            if tiered
            else "."
        ),
        "",
        markdown_table(header, rows),
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
    cover = coverage(metrics)
    partial = cover["pairs_scored"] < cover["pairs_total"]
    per_task = ", ".join(
        f"{t} {c['pairs_scored']} of {c['pairs_total']}" for t, c in cover["tasks"].items()
    )
    parts += [
        "",
        "## Overall",
        "",
        f"- Overall F1 (mean of the task averages: {', '.join(metrics['overall_tasks']) or 'none'}): "
        f"{fmt(overall)}, {coverage_text(cover)}",
        f"- Overall accuracy (pooled over every scored row of every benchmark-task pair): "
        f"{fmt(metrics['overall_accuracy'])}",
    ]
    if partial:
        parts.append(
            f"- Coverage per task: {per_task}. Both overall numbers cover only the pairs "
            "scored; they do not compare with an evaluation of the whole suite."
        )
    parts += [
        "",
        "## Details",
        "",
        details_table(metrics) if metrics["benchmarks"] else "(nothing scored)",
        *cost_section(metrics),
        *scores_tables(metrics),
    ]
    missing = [f"{m['benchmark']} ({m['reason']})" for m in metrics["missing"]]
    notes = list(metrics["notes"])
    if missing:
        notes.insert(0, f"missing benchmarks: {', '.join(missing)}")
    if notes:
        parts += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(parts) + "\n"
