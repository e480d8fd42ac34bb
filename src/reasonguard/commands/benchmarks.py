"""`reasonguard benchmarks {list,download}`: the benchmark registry and getting its files.

Example:
    reasonguard benchmarks list --benchmark-dir data/benchmarks
    reasonguard benchmarks download benchmarks/
    reasonguard benchmarks download benchmarks/ --wildguardtest-from wildguardtest.jsonl
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("benchmarks", help="list the benchmarks or download their files")
    verbs = p.add_subparsers(dest="benchmarks_command", metavar="ACTION", required=True)

    show = verbs.add_parser(
        "list", help="the 11 files / 13 benchmark-task pairs and what is present"
    )
    show.add_argument("--benchmark-dir", metavar="D", help="default: $REASONGUARD_BENCHMARKS")
    show.set_defaults(func=run_list)

    get = verbs.add_parser(
        "download",
        help="fetch the public benchmark files; explain the gated WildGuardTest",
        description="Download the ten public GuardReasoner benchmark files into DIR (files "
        "already there are kept), and print how to add the gated WildGuardTest. With "
        "--wildguardtest-from, only convert that export (no network).",
    )
    get.add_argument("dest", metavar="DIR")
    get.add_argument("--force", action="store_true", help="download files that already exist")
    get.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    get.add_argument("--base-url", help="a mirror of the data/benchmark folder (default: GitHub)")
    get.add_argument(
        "--wildguardtest-from",
        metavar="FILE",
        help="convert an allenai/wildguardmix wildguardtest export (.jsonl, .json or .parquet)",
    )
    get.set_defaults(func=run_download)


def run_list(args: argparse.Namespace) -> int:
    from reasonguard.evaluate.registry import BENCHMARKS, resolve_benchmark_dir
    from reasonguard.evaluate.report import markdown_table

    folder = resolve_benchmark_dir(args.benchmark_dir)
    rows = []
    for b in BENCHMARKS.values():
        status = (
            "-" if folder is None else ("present" if (folder / b.filename).is_file() else "MISSING")
        )
        source = ", ".join(b.label_columns.values()) or "output"
        rows.append([b.name, b.filename, ", ".join(b.tasks), str(b.rows), source, status])
    print(markdown_table(["Benchmark", "File", "Tasks", "Rows", "Labels", "Status"], rows))
    if folder is None:
        print("\n(no --benchmark-dir or $REASONGUARD_BENCHMARKS: presence not checked)")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from reasonguard.evaluate.download import (
        BASE_URL,
        WILDGUARD_HELP,
        convert_wildguardtest,
        download_benchmarks,
    )

    if args.wildguardtest_from:
        convert_wildguardtest(args.wildguardtest_from, args.dest)
        return 0
    download_benchmarks(
        args.dest, args.base_url or BASE_URL, timeout=args.timeout, force=args.force
    )
    print()
    print(WILDGUARD_HELP.format(dest=args.dest))
    return 0
