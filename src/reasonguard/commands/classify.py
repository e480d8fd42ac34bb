"""`reasonguard classify`: run a guard on one prompt (JSON to stdout) or a JSONL file of items.

Example:
    reasonguard classify --model runs/sft/final --prompt "How do I pick a lock?"
    reasonguard classify --model runs/sft/final --classifier runs/classifier/final \
        --prompt "How do I pick a lock?"
    reasonguard classify --model runs/sft/final --input items.jsonl --output verdicts.jsonl
"""

from __future__ import annotations

import argparse

from reasonguard.commands.generate import (
    add_mode_argument,
    add_model_arguments,
    backend_options,
    cascade_bands,
    classifier_tier,
    resolve_mode,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify a prompt (and response) or a JSONL file of items",
        description="Print one verdict as JSON, or write one verdict row per input row. Output "
        "rows keep the input's fields and add the verdict's, among them `mode` (what gave the "
        "verdict) and `tier` (the cascade tier that answered: classifier, fast or reasoning).",
    )
    add_model_arguments(p)
    single = p.add_argument_group("one item")
    single.add_argument("--prompt", help="the user prompt to judge")
    single.add_argument("--response", help="the AI response to judge (optional)")
    many = p.add_argument_group("a file of items")
    many.add_argument("--input", metavar="FILE", help='JSONL rows {"prompt": ..., "response": ...}')
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write the verdicts here as JSONL, one row per item with the item's fields (default: "
        "stdout; one item is printed as indented JSON)",
    )
    p.add_argument(
        "--no-scores",
        action="store_true",
        help="reasoning and cascade modes: skip the label probabilities of reasoned verdicts (an "
        "extra forward pass each); fast mode's verdicts are those probabilities",
    )
    add_mode_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from reasonguard.errors import UserError

    if (args.prompt is None) == (args.input is None):
        raise UserError("give either --prompt TEXT [--response TEXT] or --input FILE")
    if args.input is not None and args.response is not None:
        raise UserError("--response goes with --prompt, not --input")
    if args.no_scores and resolve_mode(args) in ("fast", "classifier"):
        raise UserError(
            f"--no-scores goes with --mode reasoning or cascade: {args.mode} verdicts are the "
            "label probabilities, so there is no extra pass to skip"
        )
    # Everything that can be checked without the model is checked before it loads.
    items = (
        [{"prompt": args.prompt, "response": args.response}]
        if args.input is None
        else _read(args.input)
    )
    classifier_bands = classifier_tier(args)
    bands = cascade_bands(args.model, resolve_mode(args))
    options = backend_options(args)

    from reasonguard.cascade.bands import Bands
    from reasonguard.infer.guard import load_guard

    _quiet_deprecations()
    guard = load_guard(
        args.model,
        backend=args.backend,
        prompt_format=args.prompt_format,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        bands=None if bands is None else Bands.from_dict(bands),
        classifier=args.classifier,
        classifier_bands=None if classifier_bands is None else Bands.from_dict(classifier_bands),
        **options,
    )
    start = _start_line(args.model, guard.mode, guard.max_new_tokens, len(items), args.classifier)
    print(start, file=sys.stderr)
    results = guard.classify(items, scores=not args.no_scores)
    for warning in _warnings(results, guard.max_new_tokens):
        print(f"warning: {warning}", file=sys.stderr)
    if args.output is None:
        if args.input is None:
            print(json.dumps(results[0].to_dict(), ensure_ascii=False, indent=1))
        else:
            sys.stdout.write(_jsonl(items, results))
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(_jsonl(items, results))
    except OSError as exc:
        raise UserError(f"{args.output}: cannot write ({exc.strerror})") from None
    count = f"{len(results)} verdict{'s' * (len(results) != 1)}"
    print(f"wrote {count} to {args.output}", file=sys.stderr)
    return 0


def _jsonl(items: list, results: list) -> str:
    """One JSON line per item: the item's fields, then the verdict's."""
    import json

    return "".join(
        json.dumps({**item, **result.to_dict()}, ensure_ascii=False) + "\n"
        for item, result in zip(items, results, strict=True)
    )


def _quiet_deprecations() -> None:
    """Hide transformers' deprecation notices about its own internals (nothing a user can act
    on): the `past_key_values` argument and `is_gradient_checkpointing`."""
    import warnings

    for pattern in (".*past_key_values.*", ".*is_gradient_checkpointing.*"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def _start_line(
    model: str, mode: str, max_new_tokens: int, count: int, classifier: str | None = None
) -> str:
    """What the command is about to do, said before it does it (reasoning takes a while)."""
    items = "" if count == 1 else f" for {count} items"
    each = "" if count == 1 else " each"
    budget = f"{max_new_tokens} new tokens{each}"
    if classifier is not None:
        return (
            f"judging with {classifier}, then {model}{items} (three-tier cascade: the "
            f"classifier's verdicts, fast verdicts inside its uncertainty bands, reasoning of up "
            f"to {budget} inside fast mode's)..."
        )
    if mode == "fast":
        return f"judging with {model}{items} (fast mode: no reasoning)..."
    if mode == "classifier":
        return f"judging with {model}{items} (encoder classifier: no reasoning)..."
    if mode == "cascade":
        return (
            f"judging with {model}{items} (cascade mode: fast verdicts, reasoning of up to "
            f"{budget} inside the uncertainty bands)..."
        )
    return f"generating with {model}{items} (up to {budget}, reasoning mode)..."


def _warnings(results: list, max_new_tokens: int) -> list[str]:
    """One warning per kind of output without a (complete) verdict: cut off by the token
    budget, stopped in a repetition loop, or ended without an answer block."""
    cut = [i for i, r in enumerate(results) if r.truncated and r.num_tokens >= max_new_tokens]
    loop = [
        i
        for i, r in enumerate(results)
        if r.truncated and r.is_parsing_error and r.num_tokens < max_new_tokens
    ]
    unparsed = [i for i, r in enumerate(results) if r.is_parsing_error and not r.truncated]
    found = []
    if cut:
        verdict = (
            "before the answer block, so no verdict was read"
            if all(results[i].is_parsing_error for i in cut)
            else "and the verdict may be incomplete"
        )
        found.append(
            f"{_which(cut, results)} hit the {max_new_tokens}-token budget {verdict}; "
            "raise --max-new-tokens (default 2048)"
        )
    if loop:
        found.append(
            f"{_which(loop, results)} ended in a repetition loop before the answer block, so "
            "no verdict was read"
        )
    if unparsed:
        found.append(
            f"{_which(unparsed, results)} ended without an answer block, so no verdict was read; "
            "check that the model is a trained guard and its --prompt-format"
        )
    return found


def _which(indices: list[int], results: list) -> str:
    """`the output`, or `2 of 5 outputs (items 0, 3)` (items numbered from 0, in input order)."""
    if len(results) == 1:
        return "the output"
    shown = ", ".join(str(i) for i in indices[:10]) + (", ..." if len(indices) > 10 else "")
    return f"{len(indices)} of {len(results)} outputs (item{'s' * (len(indices) > 1)} {shown})"


def _read(path: str) -> list:
    """The items of a JSONL file, each checked; errors name the file and line (from 1)."""
    from reasonguard.errors import where
    from reasonguard.evaluate.files import BadRows, read_jsonl
    from reasonguard.infer.guard import check_item

    rows = []
    for line, row in read_jsonl(path, BadRows(skip=False)):
        check_item(row, where(path, line))
        rows.append(row)
    return rows
