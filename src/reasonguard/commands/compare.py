"""`reasonguard compare RUN [RUN ...]`: F1 tables with deltas, target checks and bar charts.

Example:
    reasonguard compare runs/exp18/eval runs/exp19/eval --paper "GuardReasoner 3B" \\
        --targets examples/targets-exp19.yaml --out runs/exp19/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reasonguard.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare evaluation runs with each other and with the paper",
        description="Compare evaluate outputs: per-benchmark and per-task F1 with deltas against "
        "the first RUN, how many of the 13 benchmark-task pairs each RUN scored, optional targets "
        "(a check on part of the pairs says so), and (with --out) comparison.md plus one PNG per "
        "task.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="an evaluate output folder (runs/eval-<name> unless --out said otherwise) or its "
        "metrics.json",
    )
    p.add_argument(
        "--paper",
        action="append",
        default=[],
        metavar="ROW",
        help='a paper row, in any case, e.g. "GuardReasoner 3B" (repeatable)',
    )
    p.add_argument(
        "--targets", metavar="FILE", help="YAML of thresholds, e.g. examples/targets-exp19.yaml"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write comparison.md, f1_<task>.png and (runs with a cost) f1_vs_tokens.png here",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reasonguard.evaluate.compare import load_run, render_comparison
    from reasonguard.evaluate.registry import TASK_TITLES
    from reasonguard.evaluate.targets import load_targets

    targets = load_targets(args.targets) if args.targets else None
    runs = [load_run(path) for path in args.runs]
    report, charts = render_comparison(runs, paper=args.paper, targets=targets)
    sys.stdout.write(report)
    if not args.out:
        return 0
    from reasonguard.evaluate.compare import cost_points
    from reasonguard.evaluate.plots import bar_chart, cost_chart

    out = Path(args.out)
    points = cost_points(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(report, encoding="utf-8")
        for task, (rows, series) in charts.items():
            bar_chart(f"{TASK_TITLES[task]} (F1 %)", rows, series, out / f"f1_{task}.png")
        if points:
            cost_chart(points, out / "f1_vs_tokens.png")
    except OSError as exc:
        raise UserError(f"{out}: cannot write results ({exc.strerror})") from None
    count = len(charts) + bool(points)
    print(f"wrote {out / 'comparison.md'} and {count} charts", file=sys.stderr)
    return 0
