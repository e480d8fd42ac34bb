"""`reasonguard calibrate`: choose a guard's cascade bands on a labelled dev set.

The bands are chosen on 70% of the dev items and reported on the other 30% (a seeded
stratified split by true labels); `cascade.json` records both and which items each part held.

With `--classifier`, the cascade has three tiers (the classifier, fast mode, reasoning) and the
bands of both lower tiers are chosen (`cascade/fit.py`).

Example:
    reasonguard calibrate --model runs/exp19/final --data dev.jsonl --max-f1-drop 0.5
    reasonguard calibrate --model runs/exp19/final --classifier runs/classifier/final \\
        --data dev.jsonl
    reasonguard calibrate --model runs/exp19/final --data dev.jsonl --held-out-share 0.25 \\
        --seed 1 --out runs/exp19/cascade
"""

from __future__ import annotations

import argparse

from reasonguard.cascade.holdout import DEFAULT_HELD_OUT_SHARE, DEFAULT_SEED
from reasonguard.commands.generate import (
    add_classifier_argument,
    add_model_arguments,
    backend_options,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="choose the fast/reasoning cascade's uncertainty bands on a labelled dev set",
        description="Run the guard in reasoning mode and in fast mode on every dev item, split "
        "the items (seeded, stratified by their true labels), pick per task on the calibration "
        "part the narrowest band of fast-mode probabilities to send to reasoning such that the "
        "cascade's F1 stays within --max-f1-drop points of full reasoning's, and report the F1 "
        "drop and share escalated on the held-out part. Writes cascade.json (the bands, both "
        "parts' numbers and their items' hashes) into the model folder (or --out), where every "
        "later `--mode cascade` reads it. Calibrate on dev data held out from training, not on "
        "a benchmark you then report. With --classifier, the cascade has three tiers: the "
        "classifier, fast mode, reasoning; all three run on every dev item, and the bands of the "
        "fast tier (within half the F1 budget) and then of the classifier tier (within all of "
        "it) are chosen, both counted from full reasoning's F1.",
        epilog="example: reasonguard calibrate --model runs/exp19/final --data dev.jsonl "
        "--max-f1-drop 0.5",
    )
    add_model_arguments(p, required=False)
    add_classifier_argument(p)
    p.add_argument(
        "--replay",
        metavar="PRED_DIR",
        help="instead of --model: a folder of a guard's existing predictions "
        "(<Benchmark>/generated_predictions.jsonl, as `generate` writes them or as released) as "
        "the top tier, behind --classifier: the bands and the cascade's F1 and share escalated "
        "measured without running that guard (with --benchmarks and --out; each file split in "
        "its share)",
    )
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument(
        "--data",
        metavar="SOURCE",
        help="labelled dev records (instruction/input/output with an answer block): a json, "
        "jsonl or parquet file, a folder, or a hub id",
    )
    dev.add_argument(
        "--benchmarks", nargs="+", metavar="NAME", help="benchmark names (with --benchmark-dir)"
    )
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="with --data: only these splits")
    p.add_argument("--benchmark-dir", metavar="D", help="default: $REASONGUARD_BENCHMARKS")
    p.add_argument(
        "--max-f1-drop",
        type=float,
        default=0.5,
        metavar="POINTS",
        help="how many F1 points (0-100 scale) below full reasoning the cascade may fall, per "
        "task (default 0.5)",
    )
    p.add_argument(
        "--held-out-share",
        type=float,
        default=DEFAULT_HELD_OUT_SHARE,
        metavar="SHARE",
        help="the share of the dev items held out to report the bands on, not to choose them "
        f"(default {DEFAULT_HELD_OUT_SHARE})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"which items are held out (default {DEFAULT_SEED})",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where cascade.json goes (default: the model folder; required for hub ids)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from reasonguard.cascade.bands import write_calibration
    from reasonguard.cascade.calibrate import calibrate, items_from_benchmarks, items_from_source
    from reasonguard.cascade.fit import render_summary
    from reasonguard.commands.generate import benchmark_names
    from reasonguard.errors import UserError

    if args.max_f1_drop < 0:
        raise UserError(f"--max-f1-drop must not be negative, got {args.max_f1_drop}")
    if not 0 < args.held_out_share < 1:
        raise UserError(
            f"--held-out-share must be between 0 and 1 (exclusive), got {args.held_out_share}"
        )
    _check_replay(args)
    # Only a folder the user named gets the file: a hub id or an offline alias (whose cached
    # copy is shared by everything that uses the alias) needs --out.
    model_dir = Path(args.model or args.out)
    if args.out is None and not model_dir.is_dir():
        raise UserError(
            f"{args.model} is not a local model folder: give --out DIR for cascade.json"
        )
    out = Path(args.out) if args.out else model_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        if args.benchmark_dir:
            raise UserError("--benchmark-dir goes with --benchmarks, not --data")
        items = items_from_source(args.data, args.splits)
        dev = args.data
    else:
        from reasonguard.evaluate.registry import resolve_benchmark_dir

        if args.splits:
            raise UserError("--splits goes with --data, not --benchmarks")
        folder = resolve_benchmark_dir(args.benchmark_dir)
        if folder is None:
            raise UserError("--benchmarks needs --benchmark-dir D (or $REASONGUARD_BENCHMARKS)")
        items = items_from_benchmarks(benchmark_names(args.benchmarks), folder)
        dev = f"{folder}: {', '.join(benchmark_names(args.benchmarks))}"

    from reasonguard.infer.guard import load_guard

    if args.replay is not None:
        record = _replay_record(args, items, folder, benchmark_names(args.benchmarks))
        path = write_calibration(out, {"dev": dev, **record})
        print(render_summary(record))
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if args.classifier is not None:
        from reasonguard.infer.classifier import check_classifier_tier
        from reasonguard.models import resolve_model

        # no bands yet: they are what is chosen
        check_classifier_tier(args.model, resolve_model(args.model), args.classifier, "fast")
    guard = load_guard(
        args.model,
        backend=args.backend,
        prompt_format=args.prompt_format,
        max_new_tokens=args.max_new_tokens,
        **backend_options(args),
    )
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    if args.classifier is None:
        record = calibrate(
            guard,
            items,
            args.max_f1_drop,
            log=log,
            held_out_share=args.held_out_share,
            seed=args.seed,
        )
        record = {"model": args.model, "dev": dev, **record}
    else:
        from reasonguard.cascade.fit import calibrate_tiers
        from reasonguard.cascade.tiers import Tier

        classifier = load_guard(args.classifier, device=args.device, threads=args.threads)
        tiers = [Tier("classifier", classifier), Tier("fast", guard), Tier("reasoning", guard)]
        record = calibrate_tiers(
            tiers,
            items,
            args.max_f1_drop,
            held_out_share=args.held_out_share,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            log=log,
        )
        record = {"model": args.model, "classifier": args.classifier, "dev": dev, **record}
    path = write_calibration(out, record)
    print(summary(record) if args.classifier is None else render_summary(record))
    print(f"wrote {path}", file=sys.stderr)
    if model_dir.is_dir() and out.resolve() != model_dir.resolve():
        print(
            f"(copy it into {model_dir} to make the cascade the model's default)",
            file=sys.stderr,
        )
    return 0


def _check_replay(args: argparse.Namespace) -> None:
    """--model or --replay, and what --replay needs, before anything is read."""
    from reasonguard.errors import UserError

    if args.replay is None:
        if args.model is None:
            raise UserError("give --model MODEL (or --replay PRED_DIR with --classifier)")
        return
    if args.model is not None:
        raise UserError("--replay replaces --model: the replayed predictions are the top tier")
    for needed, flag in (
        (args.classifier, "--classifier DIR (the tier in front of the replayed guard)"),
        (args.benchmarks, "--benchmarks (the replayed predictions are benchmark rows)"),
        (args.out, "--out DIR (where cascade.json goes)"),
    ):
        if not needed:
            raise UserError(f"--replay needs {flag}")


def _replay_record(args: argparse.Namespace, items: list, folder: str, names: list) -> dict:
    """The calibration of the cascade --classifier, then the replayed guard of --replay."""
    import sys

    from reasonguard.cascade.fit import calibrate_tiers
    from reasonguard.cascade.replay import ReplayGuard
    from reasonguard.cascade.tiers import Tier
    from reasonguard.infer.guard import load_guard

    replay = ReplayGuard(args.replay, benchmarks=names, benchmark_dir=folder)
    classifier = load_guard(args.classifier, device=args.device, threads=args.threads)
    record = calibrate_tiers(
        [Tier("classifier", classifier), Tier("reasoning", replay)],
        items,
        args.max_f1_drop,
        held_out_share=args.held_out_share,
        seed=args.seed,
        per_source=True,
        log=lambda text: print(text, file=sys.stderr),
    )
    return {"replay": args.replay, "classifier": args.classifier, **record}


def summary(record: dict) -> str:
    """The printed table: per task the band, then on the held-out items the F1 of each mode,
    the cascade's F1 drop and the share escalated."""
    split, held = record["split"], record["held_out"]
    cal = record["calibration"]
    lines = [
        f"cascade bands chosen on {cal['items']} dev items, reported on {held['items']} held out "
        f"({split['method']}, held-out share {split['held_out_share']}, seed {split['seed']}); "
        f"F1 budget {record['max_f1_drop']} points below reasoning",
        "| task | band | items (calibration / held out) | reasoning F1 | fast F1 | cascade F1 "
        "| F1 drop | escalated |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, got in held["tasks"].items():
        band = "none" if got["band"] is None else f"[{got['band'][0]:.3f}, {got['band'][1]:.3f}]"
        share = got.get("escalated_share")
        lines.append(
            f"| {task} | {band} | {cal['tasks'][task]['items']} / {got['items']} | "
            f"{_num(got.get('reasoning_f1'))} | {_num(got.get('fast_f1'))} | "
            f"{_num(got.get('cascade_f1'))} | {_num(got.get('f1_drop'))} | "
            f"{'-' if share is None else f'{100 * share:.0f}%'} |"
        )
    tokens = record["tokens_per_item"]
    lines.append(
        f"held-out items escalated: {100 * held['escalated_share']:.0f}% "
        f"({held['escalated']} of {held['items']}; on the calibration items "
        f"{100 * cal['escalated_share']:.0f}%); generated tokens per item: reasoning "
        f"{tokens['reasoning']:.1f}, cascade {tokens['cascade']:.1f}, fast 0"
    )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
