"""`reasonguard classify`: run a guard on one prompt (JSON to stdout) or a JSONL file of items.

Example:
    reasonguard classify --model runs/sft/final --prompt "How do I pick a lock?"
    reasonguard classify --model runs/sft/final --input items.jsonl --output verdicts.jsonl
"""

from __future__ import annotations

import argparse

from reasonguard.commands.generate import add_model_arguments, backend_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify a prompt (and response) or a JSONL file of items",
        description="Print one verdict as JSON, or write one verdict row per input row. Output "
        "rows keep the input's fields and add the verdict's.",
    )
    add_model_arguments(p)
    single = p.add_argument_group("one item")
    single.add_argument("--prompt", help="the user prompt to judge")
    single.add_argument("--response", help="the AI response to judge (optional)")
    many = p.add_argument_group("a file of items")
    many.add_argument("--input", metavar="FILE", help='JSONL rows {"prompt": ..., "response": ...}')
    many.add_argument("--output", metavar="FILE", help="JSONL verdicts (default: stdout)")
    p.add_argument("--no-scores", action="store_true", help="skip the label probabilities")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from reasonguard.errors import UserError

    if (args.prompt is None) == (args.input is None):
        raise UserError("give either --prompt TEXT [--response TEXT] or --input FILE")
    if args.input is not None and args.response is not None:
        raise UserError("--response goes with --prompt, not --input")
    items = (
        [{"prompt": args.prompt, "response": args.response}]
        if args.input is None
        else _read(args.input)
    )

    from reasonguard.infer.guard import load_guard, validate_items

    validate_items(items)  # bad rows fail before the model loads
    guard = load_guard(
        args.model,
        backend=args.backend,
        prompt_format=args.prompt_format,
        max_new_tokens=args.max_new_tokens,
        **backend_options(args),
    )
    results = guard.classify(items, scores=not args.no_scores)
    if args.input is None:
        print(json.dumps(results[0].to_dict(), ensure_ascii=False, indent=1))
        return 0
    lines = "".join(
        json.dumps({**item, **result.to_dict()}, ensure_ascii=False) + "\n"
        for item, result in zip(items, results, strict=True)
    )
    if args.output is None:
        sys.stdout.write(lines)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(lines)
        except OSError as exc:
            raise UserError(f"{args.output}: cannot write ({exc.strerror})") from None
    return 0


def _read(path: str) -> list:
    from reasonguard.evaluate.files import BadRows, read_jsonl

    return [row for _, row in read_jsonl(path, BadRows(skip=False))]
