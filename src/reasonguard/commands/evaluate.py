"""`reasonguard evaluate`: score benchmark predictions, write metrics.json and report.md.

`evaluate PRED_DIR` scores predictions already made; `evaluate --model M` first generates them
into `OUT/predictions` (resumable, as `generate`: rerun the same command after an interruption)
and then scores them. The first path never imports torch, so it starts in a fraction of a second.
Results never go into PRED_DIR (an input): without --out they go to `runs/eval-<name>`, where
name is PRED_DIR's folder name (or the --model name).

Example:
    reasonguard evaluate preds/GuardReasoner-1B --protocol official \\
        --benchmark-dir data/benchmarks --paper "GuardReasoner 1B" --out runs/eval-1b
    reasonguard evaluate --model runs/sft/final --benchmarks all \\
        --benchmark-dir data/benchmarks --out runs/eval-sft --scores
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from reasonguard.commands.generate import (
    add_generation_arguments,
    add_model_arguments,
    benchmark_names,
    run_generation,
)
from reasonguard.errors import UserError
from reasonguard.evaluate.datafiles import data_output_files
from reasonguard.evaluate.registry import PREDICTIONS_FILE

PREDICTIONS = "predictions"  # where `--model` writes predictions, under --out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score benchmark predictions (F1 per benchmark, weighted per task)",
        description="Score <Benchmark>/generated_predictions.jsonl files (PRED_DIR), or generate "
        "them with a model first (--model, into OUT/predictions, resumable); write metrics.json "
        "and report.md to OUT (never into PRED_DIR) and print the report.",
    )
    p.add_argument(
        "pred_dir",
        nargs="?",
        metavar="PRED_DIR",
        help="folder of <Benchmark>/ prediction folders (or give --model instead)",
    )
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
        "--out",
        metavar="DIR",
        help="where metrics.json and report.md go (default runs/eval-<PRED_DIR's folder name>, "
        "never inside PRED_DIR; with --model, runs/eval-<model>, predictions in DIR/predictions)",
    )
    p.add_argument(
        "--paper",
        action="append",
        default=[],
        metavar="ROW",
        help='a paper row to show beside ours, in any case, e.g. "GuardReasoner 3B" (repeatable)',
    )
    p.add_argument(
        "--name", help="this run's name in reports (default: PRED_DIR's folder name, or --model)"
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip malformed rows and count them in the report instead of stopping",
    )
    gen = p.add_argument_group("generating first (--model)")
    add_model_arguments(gen, required=False)
    gen.add_argument(
        "--benchmarks",
        nargs="+",
        default=None,
        metavar="NAME",
        help="with --model: 'all' (default) or benchmark names (space or comma separated)",
    )
    add_generation_arguments(gen)
    p.set_defaults(func=run)


def _default_out(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"
    return Path("runs") / f"eval-{slug}"


def _default_scoring_out(pred_dir: Path) -> Path:
    """`runs/eval-<PRED_DIR's folder name>`: results never go into the predictions (an input).

    Raises:
        UserError: that folder would lie inside PRED_DIR (run from inside it).
    """
    out = _default_out(pred_dir.resolve().name or "predictions")
    if out.resolve().is_relative_to(pred_dir.resolve()):
        raise UserError(
            f"{pred_dir}: the default output folder {out} would be inside the predictions "
            "folder; choose where the results go with --out DIR"
        )
    return out


def _generate(args: argparse.Namespace, out: Path) -> Path:
    """`--model`: generate the benchmarks' predictions into OUT/predictions (resuming)."""
    from reasonguard.evaluate.registry import resolve_benchmark_dir
    from reasonguard.generation.run import benchmark_jobs

    folder = resolve_benchmark_dir(args.benchmark_dir)
    if folder is None:
        raise UserError("--model needs --benchmark-dir D (or $REASONGUARD_BENCHMARKS)")
    jobs = benchmark_jobs(benchmark_names(args.benchmarks or ["all"]), folder)
    pred_dir = out / PREDICTIONS
    run_generation(args, jobs, str(pred_dir))
    return pred_dir


# Options that only make sense when generating (their defaults are None or False).
_GENERATION_ONLY = (
    "benchmarks",
    "scores",
    "threads",
    "batch_size",
    "device",
    "data_parallel",
    "dtype",
    "load_in_4bit",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "max_model_len",
    "classifier",
)


def run(args: argparse.Namespace) -> int:
    from reasonguard.evaluate.evaluator import evaluate_predictions
    from reasonguard.evaluate.paper import paper_row_name
    from reasonguard.evaluate.registry import resolve_benchmark_dir
    from reasonguard.evaluate.report import coverage, render_report

    if (args.pred_dir is None) == (args.model is None):
        raise UserError(
            "give PRED_DIR (score existing predictions) or --model M (generate, then score)"
        )
    if args.model is None:
        given = [
            f"--{k.replace('_', '-')}"
            for k in _GENERATION_ONLY
            if getattr(args, k) not in (None, False)
        ]
        given += ["--mode"] if args.mode is not None else []
        if given:
            raise UserError(f"{', '.join(given)}: only with --model (generation options)")
    args.paper = [paper_row_name(name) for name in args.paper]  # unknown: fail before any work
    if args.model is not None:
        out = Path(args.out) if args.out else _default_out(args.model)
        pred_dir = _generate(args, out)
        name = args.name or args.model
    else:
        pred_dir = Path(args.pred_dir)
        files = data_output_files(pred_dir)
        if files is not None:
            return _score_data_outputs(args, pred_dir)
        if not pred_dir.is_dir():
            raise UserError(
                f"{pred_dir}: not found (expected a folder of <Benchmark>/{PREDICTIONS_FILE} "
                "folders, or a `generate --data` output file or folder)"
            )
        out = Path(args.out) if args.out else _default_scoring_out(pred_dir)
        name = args.name or pred_dir.resolve().name
    metrics = evaluate_predictions(
        pred_dir,
        resolve_benchmark_dir(args.benchmark_dir),
        protocol=args.protocol,
        skip_bad_rows=args.skip_bad_rows,
        limit=args.limit,
    )
    metrics = {"name": name, **metrics, "coverage": coverage(metrics)}
    report = render_report(metrics, paper=args.paper, label=name)
    _write_results(out, metrics, report)
    return 0


def _write_results(out: Path, metrics: dict, report: str) -> None:
    sys.stdout.write(report)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        (out / "report.md").write_text(report, encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write results ({exc.strerror}); choose another --out"
        ) from None
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}", file=sys.stderr)


def _score_data_outputs(args: argparse.Namespace, path: Path) -> int:
    """PRED_DIR is a `generate --data` output file or folder (e.g. the demo's generations/):
    labelled records in the training format, scored per task."""
    from reasonguard.evaluate.datafiles import score_data_outputs
    from reasonguard.evaluate.dataset import render_dataset_report

    given = ["--benchmark-dir"] * (args.benchmark_dir is not None) + ["--paper"] * bool(args.paper)
    if given:
        raise UserError(
            f"{', '.join(given)}: only with benchmark predictions; {path} holds labelled "
            "records (`generate --data` outputs), which carry their own true labels"
        )
    metrics = score_data_outputs(path, args.protocol, args.skip_bad_rows, args.limit)
    name = args.name or (path.resolve().parent.name if path.is_file() else path.resolve().name)
    metrics["name"] = name
    out = (
        Path(args.out)
        if args.out
        else _default_scoring_out(path.parent if path.is_file() else path)
    )
    _write_results(out, metrics, render_dataset_report(metrics))
    return 0
