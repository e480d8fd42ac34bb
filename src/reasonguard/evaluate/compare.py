"""Compare evaluation runs (and paper rows): F1 tables with deltas, target checks, bar charts.

A run is an evaluation output folder holding `metrics.json`, or the path of that file. Deltas are
against the first run. The summary says how many of the 13 benchmark-task pairs each run scored,
and a target checked on a partial run says so beside its pass / FAIL.

Example:
    >>> from reasonguard.evaluate.compare import load_run, render_comparison
    >>> runs = [load_run("runs/exp18/eval"), load_run("runs/exp19/eval")]
    >>> print(render_comparison(runs, paper=["GuardReasoner 3B"]))
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.evaluate.cost import tier_text
from reasonguard.evaluate.metrics import weighted_average
from reasonguard.evaluate.paper import paper_row, paper_row_name
from reasonguard.evaluate.registry import BENCHMARKS, TASK_ORDER, TASK_TITLES
from reasonguard.evaluate.report import coverage, fmt, markdown_table, missing_pairs_text
from reasonguard.evaluate.targets import check_targets, metric_coverage
from reasonguard.format import TASKS

_REQUIRED = ("protocol", "benchmarks", "tasks")
AVERAGE = "Weighted avg"


@dataclass(frozen=True)
class Run:
    """One column of a comparison: a name and its F1 per (benchmark, task) and per task."""

    name: str
    f1: dict[tuple[str, str], float | None]
    task_f1: dict[str, float | None]
    overall_f1: float | None
    overall_accuracy: float | None
    protocol: str | None
    metrics: dict[str, Any] | None = None  # None for paper rows (no targets to check)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read an evaluation output (folder or `metrics.json`) as a comparison column.

    Raises:
        UserError: no metrics.json, malformed JSON, or missing keys.
    """
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: not found (a RUN is an evaluate --out folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    missing = [key for key in _REQUIRED if not isinstance(metrics, dict) or key not in metrics]
    if missing:
        raise UserError(f"{file}: not a reasonguard metrics.json (missing {', '.join(missing)})")
    name = metrics.get("name") or (path.name if path.is_dir() else path.parent.name)
    try:
        return Run(
            name=name,
            f1={(r["benchmark"], r["task"]): r["f1"] for r in metrics["benchmarks"]},
            task_f1={t: metrics["tasks"].get(t, {}).get("weighted_f1") for t in TASKS},
            overall_f1=metrics.get("overall_f1"),
            overall_accuracy=metrics.get("overall_accuracy"),
            protocol=metrics["protocol"],
            metrics=metrics,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{file}: not a reasonguard metrics.json (bad entry: {exc!r})") from None


def paper_run(name: str, present: dict[str, list[str]]) -> Run:
    """A paper row as a comparison column.

    Its task averages are recomputed over `present` (the benchmarks the first run has, per task)
    with the paper's weights, so they compare with the runs' averages.
    """
    name = paper_row_name(name)
    row = paper_row(name)
    f1 = {(b, t): row[t]["f1"][b] for t in TASKS if t in row for b in TASK_ORDER[t]}
    task_f1: dict[str, float | None] = {}
    for task in TASKS:
        values = [(f1.get((b, task)), BENCHMARKS[b].weights[task]) for b in present[task]]
        ok = task in row and present[task] and all(v is not None for v, _ in values)
        task_f1[task] = weighted_average(values) if ok else None
    done = [v for v in task_f1.values() if v is not None]
    overall = sum(done) / len(done) if len(done) == len(TASKS) else None
    return Run(f"{name} (paper)", f1, task_f1, overall, None, None)


def _unique(runs: Sequence[Run]) -> list[Run]:
    """Rename repeated run names (`eval`, `eval #2`) so table columns stay distinct."""
    seen: dict[str, int] = {}
    out = []
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        out.append(
            run if seen[run.name] == 1 else replace(run, name=f"{run.name} #{seen[run.name]}")
        )
    return out


def _cells(values: Sequence[float | None]) -> list[str]:
    """F1 cells; every one after the first carries its delta against the first."""
    base = values[0]
    cells = [fmt(base)]
    for value in values[1:]:
        if value is None or base is None:
            cells.append(fmt(value))
        else:
            delta = round(value - base, 2) + 0.0  # + 0.0 turns -0.0 into 0.0: no "(-0.00)"
            cells.append(f"{fmt(value)} ({delta:+.2f})")
    return cells


def task_series(
    columns: Sequence[Run], task: str
) -> tuple[list[str], dict[str, list[float | None]]]:
    """(row names, values per column) of a task: the benchmarks some run scored, then the average."""
    names = [
        b
        for b in TASK_ORDER[task]
        if any(r.metrics is not None and (b, task) in r.f1 for r in columns)
    ]
    series = {r.name: [*(r.f1.get((b, task)) for b in names), r.task_f1[task]] for r in columns}
    return [*names, AVERAGE], series


def render_comparison(
    runs: Sequence[Run],
    paper: Sequence[str] = (),
    targets: dict[str, dict[str, float]] | None = None,
) -> tuple[str, dict[str, tuple[list[str], dict[str, list[float | None]]]]]:
    """The comparison report, and per task the (rows, series) a chart draws.

    Raises:
        UserError: no runs, or an unknown paper row.
    """
    if not runs:
        raise UserError("compare needs at least one RUN")
    present = {t: runs[0].metrics["tasks"].get(t, {}).get("benchmarks", []) for t in TASKS}
    columns = _unique([*runs, *(paper_run(name, present) for name in paper)])
    parts = ["# reasonguard comparison", ""]
    parts += [f"- {r.name}: protocol {r.protocol}" for r in columns if r.metrics is not None]
    parts.append(f"- Deltas are against {columns[0].name}; F1 x100.")
    protocols = {r.protocol for r in columns if r.metrics is not None}
    if len(protocols) > 1:
        parts.append(
            f"- Warning: the runs use different protocols ({', '.join(sorted(protocols))})."
        )
    if paper:
        parts.append(
            f"- Paper rows: task averages recomputed over the benchmarks {columns[0].name} has."
        )
    charts = {}
    header = ["Benchmark", *(r.name for r in columns)]
    for task in TASKS:
        rows, series = task_series(columns, task)
        if len(rows) == 1:
            continue  # no run scored this task
        charts[task] = (rows, series)
        table = [[row, *_cells([series[r.name][i] for r in columns])] for i, row in enumerate(rows)]
        parts += ["", f"## {TASK_TITLES[task]} (F1 %)", "", markdown_table(header, table)]
    summary = [[f"{t} weighted F1", *_cells([r.task_f1[t] for r in columns])] for t in TASKS]
    summary.append(["overall F1", *_cells([r.overall_f1 for r in columns])])
    summary.append(["overall accuracy", *_cells([r.overall_accuracy for r in columns])])
    first = coverage(runs[0].metrics)
    covers = [coverage(r.metrics) if r.metrics is not None else first for r in columns]
    summary.append(
        ["benchmark-task pairs", *(f"{c['pairs_scored']} of {c['pairs_total']}" for c in covers)]
    )
    parts += ["", "## Summary", "", markdown_table(["Metric", *(r.name for r in columns)], summary)]
    partial = [
        f"- {r.name}: {c['pairs_scored']} of {c['pairs_total']} benchmark-task pairs (missing: "
        f"{missing_pairs_text(c)})"
        for r, c in zip(columns, covers, strict=True)
        if r.metrics is not None and c["pairs_scored"] < c["pairs_total"]
    ]
    if partial:
        parts += [
            "",
            "Partial coverage: the task averages and overall scores of these runs cover only the "
            "pairs they scored (paper rows: the pairs of the first run).",
            "",
            *partial,
        ]
    costed = cost_points(runs)
    if costed:
        parts += ["", "## Cost per item", "", _cost_table(costed)]
    if targets:
        parts += ["", "## Targets", "", _targets_table(columns, targets)]
    return "\n".join(parts) + "\n", charts


def cost_points(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per run with a recorded cost (`evaluate` writes it): name, mode, overall F1, generated
    tokens, seconds and the share escalated per item, and the share each tier answered; the
    points of the F1-vs-tokens chart."""
    points = []
    for run in runs:
        cost = (run.metrics or {}).get("cost") or {}
        if cost.get("tokens_per_item") is None:
            continue
        points.append(
            {
                "name": run.name,
                "mode": cost.get("mode"),
                "overall_f1": run.overall_f1,
                "tokens_per_item": cost["tokens_per_item"],
                "seconds_per_item": cost.get("seconds_per_item"),
                "escalated_share": cost.get("escalated_share"),
                "tier_shares": cost.get("tier_shares") or {},
            }
        )
    return points


def _cost_table(points: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            p["name"],
            p["mode"] or "-",
            fmt(p["overall_f1"]),
            f"{p['tokens_per_item']:.1f}",
            "-" if p["seconds_per_item"] is None else f"{p['seconds_per_item']:.3f}",
            "-" if p["escalated_share"] is None else f"{100 * p['escalated_share']:.0f}%",
            tier_text(p),
        ]
        for p in points
    ]
    header = ["Run", "Mode", "Overall F1", "Tokens / item", "Seconds / item", "Escalated"]
    header += ["Answered by tier"]
    return markdown_table(header, rows)


def _targets_table(columns: Sequence[Run], targets: dict[str, dict[str, float]]) -> str:
    runs = [r for r in columns if r.metrics is not None]
    checks = [check_targets(r.metrics, targets) for r in runs]
    rows = []
    for i, (metric, level, threshold, _, _) in enumerate(checks[0]):
        cells = []
        for run, check in zip(runs, checks, strict=True):
            value, passed = check[i][3:]
            cell = f"{fmt(value)} {'pass' if passed else 'FAIL'}"
            scored, total = metric_coverage(run.metrics, metric)
            if value is not None and scored < total:
                cell += f" (on {scored} of {total} pairs)"
            cells.append(cell)
        rows.append([metric, level, f">= {threshold:g}", *cells])
    return markdown_table(["Metric", "Level", "Threshold", *(r.name for r in runs)], rows)
