"""`reasonguard data validate|stats SOURCE`: check and describe guard training data.

SOURCE is a hub dataset id (default `yueliu1999/GuardReasonerTrain`), a folder of split files,
one json/jsonl/parquet file, or `samples` (the project's own sample set).

Example:
    reasonguard data validate samples
    reasonguard data stats ./GuardReasonerTrain --splits AegisTrainR --prompt-format chat --json s.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Light modules only (no datasets / transformers / numpy): `reasonguard --help` imports this file.
from reasonguard.data.sources import DEFAULT_DATASET
from reasonguard.errors import UserError
from reasonguard.format import PROMPT_FORMATS, TASK_KEY, TASKS

DEFAULT_TOKENIZER = "llama3-tokenizer"
MAX_LISTED = 20  # invalid rows printed in full by `validate --skip-invalid`


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="validate guard training data and describe it")
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    validate = actions.add_parser(
        "validate", help="check fields, input layout and answer labels of every row"
    )
    _add_source_arguments(validate)
    _add_skip_invalid(validate, "list and count")
    validate.add_argument(
        "--exit-zero",
        action="store_true",
        help="exit 0 even when rows are invalid (they are still listed and counted; implies "
        "--skip-invalid); without it invalid rows make the exit status 2",
    )
    validate.set_defaults(func=run)

    stats = actions.add_parser(
        "stats", help="rows, label distribution and token lengths (with the real tokenizer)"
    )
    _add_source_arguments(stats)
    stats.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help=f"tokenizer alias, hub id or folder (default {DEFAULT_TOKENIZER}); 'none' skips "
        "token statistics",
    )
    stats.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="raw")
    stats.add_argument(
        "--max-length",
        type=_positive_int,
        default=None,
        help="count rows this length would truncate (default: the auto max length)",
    )
    stats.add_argument("--json", metavar="OUT", default=None, help="also write the stats here")
    _add_skip_invalid(stats, "leave out and count")
    stats.set_defaults(func=run)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_DATASET,
        metavar="SOURCE",
        help=f"hub id, folder of split files, one json/jsonl/parquet file, or 'samples' "
        f"(default {DEFAULT_DATASET})",
    )
    parser.add_argument("--splits", nargs="+", metavar="S", help="only these splits")


def _add_skip_invalid(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help=f"{what} invalid rows (a line that is not JSON included) instead of stopping "
        "at the first one; rows are named FILE:LINE in JSON-lines files, else by 1-based row",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from reasonguard.data.located import load_located
    from reasonguard.data.validate import validate_records

    records, places = load_located(args.source, args.splits)
    exit_zero = args.data_action == "validate" and args.exit_zero
    skip = args.skip_invalid or exit_zero
    valid, report = validate_records(records, skip_invalid=skip, source=args.source, places=places)
    if args.data_action == "stats":
        return _run_stats(args, valid, report)
    _print_validation(report)
    _print_label_mismatches(report.label_mismatches)
    if not report.num_invalid:
        return 0
    if exit_zero:
        print(f"{report.num_invalid} invalid rows; exit status 0 as asked (--exit-zero)")
        return 0
    print(
        f"error: {report.num_invalid} of {report.num_rows} rows invalid (listed above); fix "
        "them, or pass --exit-zero to exit 0 anyway",
        file=sys.stderr,
    )
    return 2


def _print_validation(report: Any) -> None:
    invalid = report.invalid_by_split()
    rows = [[split, n, n - invalid[split], invalid[split]] for split, n in report.rows.items()]
    rows.append(["total", report.num_rows, report.num_valid, report.num_invalid])
    print(f"source: {report.source}")
    _print_table(["split", "rows", "valid", "invalid"], rows)
    if not report.num_invalid:
        print(f"all {report.num_rows} rows valid")
        return
    print(f"\n{report.num_invalid} invalid rows:")
    for bad in report.invalid[:MAX_LISTED]:
        print(f"  {bad.describe()}")
    if report.num_invalid > MAX_LISTED:
        print(f"  ... and {report.num_invalid - MAX_LISTED} more")


def _run_stats(args: argparse.Namespace, valid: dict, report: Any) -> int:
    from reasonguard.data.stats import dataset_stats

    if report.num_invalid:  # only with --skip-invalid: without it the first one stops here
        print(
            f"warning: {report.num_invalid} invalid rows left out of the statistics "
            f"(--skip-invalid; `reasonguard data validate {args.source} --skip-invalid` lists "
            "them)",
            file=sys.stderr,
        )
    tokenizer = None if args.tokenizer.lower() == "none" else _load_tokenizer(args.tokenizer)
    stats = dataset_stats(
        valid, tokenizer, args.prompt_format, args.max_length, progress=sys.stderr.isatty()
    )
    if stats["tokens"] is not None:
        stats["tokens"]["tokenizer"] = args.tokenizer  # the name given, not a cache path
    stats = {"source": args.source, **stats, "validation": report.to_dict()}
    _print_stats(stats, report.label_mismatches)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stats, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


def _load_tokenizer(name: str) -> Any:
    from reasonguard.models import ALIASES, load_tokenizer

    if (
        name not in ALIASES
        and name.startswith(("/", ".", "~"))
        and not Path(name).expanduser().is_dir()
    ):
        raise UserError(f"cannot load tokenizer {name!r}: no such folder")
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as exc:  # missing package/folder, no hub access, bad name
        raise UserError(f"cannot load tokenizer {name!r}: {exc}") from exc


def _print_label_mismatches(mismatches: list[Any]) -> None:
    """The rows whose response labels disagree with their response, by kind, with places."""
    from reasonguard.data.response_labels import KINDS, LABELS_WITHOUT_RESPONSE, WHAT

    if not mismatches:
        print("response labels agree with the responses in every row")
        return
    for kind in KINDS:
        rows = [m for m in mismatches if m.kind == kind]
        if not rows:
            continue
        print(f"\n{len(rows)} {'row has' if len(rows) == 1 else 'rows have'} {WHAT[kind]}:")
        for mismatch in rows[:MAX_LISTED]:
            print(f"  {mismatch.describe()}")
        if len(rows) > MAX_LISTED:
            print(f"  ... and {len(rows) - MAX_LISTED} more")
        if kind == LABELS_WITHOUT_RESPONSE:
            print(
                "training keeps these labels, as published; the training config key "
                "labels_without_response: none sets them to None"
            )
        else:
            print("(reported only: a response without its label has no label to restore)")


def _print_response_labels(counts: dict[str, dict[str, int]]) -> None:
    print("\nresponse labels against responses")
    header = ["task", "with response", "labelled", "labelled, no response", "response, no label"]
    keys = ["rows_with_response", "labelled", "labelled_without_response", "response_without_label"]
    _print_table(header, [[task, *(n[k] for k in keys)] for task, n in counts.items()])


def _print_stats(stats: dict[str, Any], mismatches: list[Any]) -> None:
    print(f"source: {stats['source']}")
    left_out = stats["validation"]["num_invalid"]
    if left_out:
        print(f"{left_out} invalid rows left out (--skip-invalid); the counts below are the rest")
    rows = [
        [split, n, stats["prompt_only_rows"][split], n - stats["prompt_only_rows"][split]]
        for split, n in stats["rows"].items()
    ]
    prompt_only = sum(stats["prompt_only_rows"].values())
    rows.append(["total", stats["total_rows"], prompt_only, stats["total_rows"] - prompt_only])
    _print_table(["split", "rows", "prompt only", "with response"], rows)
    _print_response_labels(stats["response_labels"])
    _print_label_mismatches(mismatches)

    for task in TASKS:
        labels = list(stats["labels"]["total"][task])
        print(f"\nlabels, task {task} ({TASK_KEY[task]}:)")
        table = [
            [split, *(counts[task].get(label, 0) for label in labels)]
            for split, counts in stats["labels"]["by_split"].items()
        ]
        table.append(["total", *stats["labels"]["total"][task].values()])
        _print_table(["split", *labels], table)

    tokens = stats["tokens"]
    if tokens is None:
        return
    print(f"\ntoken lengths ({tokens['tokenizer']}, prompt format {tokens['prompt_format']})")
    columns = ["mean", "p50", "p95", "p99", "max", "total"]
    table = [[part, *(_number(tokens[part][c]) for c in columns)] for part in _PARTS]
    _print_table(["", *columns], table)
    print(
        f"\nauto max length (p95 clamped to [1024, 2048]): {tokens['auto_max_length']}\n"
        f"max length {tokens['max_length']} ({tokens['max_length_source']}): "
        f"{tokens['truncated_rows']} of {stats['total_rows']} rows truncated "
        f"({100 * tokens['truncated_fraction']:.2f}%), {tokens['truncated_tokens']} tokens cut"
    )


_PARTS = ("sequence", "prompt", "completion")


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Print left-aligned first column, right-aligned numbers."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        print("  " + "  ".join([first, *rest]))
