"""`reasonguard evaluate PRED_DIR`: score benchmark predictions, write metrics.json and report.md.

Example:
    reasonguard evaluate preds/GuardReasoner-1B --protocol official \\
        --benchmark-dir ../shared/data/benchmarks --paper "GuardReasoner 1B" --out runs/eval-1b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reasonguard.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score benchmark predictions (F1 per benchmark, weighted per task)",
        description="Score <Benchmark>/generated_predictions.jsonl files; write metrics.json "
        "and report.md and print the report.",
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", help="folder of <Benchmark>/ prediction folders")
    p.add_argument(
        "--protocol",
        choices=("strict", "official"),
        default="strict",
        help="strict (default): every row once, last valid answer, failures wrong; "
        "official: the paper's script rules",
    )
    p.add_argument(
        "--benchmark-dir",
        metavar="D",
        help="folder of the official benchmark files (default: $REASONGUARD_BENCHMARKS; "
        "without either, true labels come from the predictions' label field)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="where metrics.json and report.md go (default PRED_DIR)"
    )
    p.add_argument(
        "--paper",
        action="append",
        default=[],
        metavar="ROW",
        help='a paper row to show beside ours, e.g. "GuardReasoner 3B" (repeatable)',
    )
    p.add_argument("--name", help="this run's name in reports (default: PRED_DIR's folder name)")
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip malformed rows and count them in the report instead of stopping",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reasonguard.evaluate.evaluator import evaluate_predictions
    from reasonguard.evaluate.paper import paper_row
    from reasonguard.evaluate.registry import resolve_benchmark_dir
    from reasonguard.evaluate.report import render_report

    for name in args.paper:
        paper_row(name)  # an unknown row fails before any work
    metrics = evaluate_predictions(
        args.pred_dir,
        resolve_benchmark_dir(args.benchmark_dir),
        protocol=args.protocol,
        skip_bad_rows=args.skip_bad_rows,
    )
    name = args.name or Path(args.pred_dir).resolve().name
    metrics = {"name": name, **metrics}
    report = render_report(metrics, paper=args.paper, label=name)
    sys.stdout.write(report)
    out = Path(args.out or args.pred_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        (out / "report.md").write_text(report, encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write results ({exc.strerror}); choose another --out"
        ) from None
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}", file=sys.stderr)
    return 0
