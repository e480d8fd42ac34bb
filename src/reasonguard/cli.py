"""The `reasonguard` command line: one verb per capability, each a thin module in `commands/`.

Each command module exposes `register(subparsers)` (argument definitions only, no heavy imports)
and `run(args) -> int`. Library functions do the work; this file only dispatches.

Example:
    reasonguard evaluate preds/ --protocol official --benchmark-dir shared/data/benchmarks
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from reasonguard import __version__
from reasonguard.errors import UserError

# Verb -> command module. Listed here so `reasonguard --help` shows every verb.
COMMANDS = {
    "evaluate": "reasonguard.commands.evaluate",
    "compare": "reasonguard.commands.compare",
    "benchmarks": "reasonguard.commands.benchmarks",
    "data": "reasonguard.commands.data",
    "train": "reasonguard.commands.train",
    "plan": "reasonguard.commands.plan",
    "hsdpo": "reasonguard.commands.hsdpo",
    "mine": "reasonguard.commands.mine",
    "runs": "reasonguard.commands.runs",
    "generate": "reasonguard.commands.generate",
    "classify": "reasonguard.commands.classify",
    "calibrate": "reasonguard.commands.calibrate",
    "demo": "reasonguard.commands.demo",
    "serve": "reasonguard.commands.serve",
}


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: `--mod` is an error, never a guess at `--model` or
    `--mode`. Every verb's parser is of this class (argparse makes sub-parsers of the class of
    the parser that holds them)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


class CommandParser(Parser):
    """A verb's parser: an argument it does not know is its error, with its own usage line and
    the nearest option it has (argparse leaves such arguments to the top-level parser, whose
    usage names no option of the verb)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            self.error(message + _nearest_options(self, extras))
        return namespace, extras


def _nearest_options(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """`(did you mean --mode or --model?)` for the first unknown option, or nothing."""
    import difflib

    unknown = next((a.split("=", 1)[0] for a in extras if a.startswith("--")), None)
    if unknown is None:
        return ""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    near = difflib.get_close_matches(unknown, known, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="reasonguard",
        description="Train, evaluate and serve reasoning-based LLM guardrails.",
    )
    parser.add_argument("--version", action="version", version=f"reasonguard {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=CommandParser
    )
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a verb whose module is not written yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command == "train":
        # A real command line (not an in-process call): CPU training needs glibc allocator
        # settings that only take effect at process start (reasonguard.launch.allocenv).
        from reasonguard.launch.allocenv import reexec_if_needed

        reexec_if_needed(sys.argv[1:])
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a training run says how to resume (`train.monitor`)
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`reasonguard data stats F | head`): stop quietly, as
        # the Python docs advise (the signal module's note on SIGPIPE): point stdout at devnull
        # so the interpreter's final flush raises nothing, and exit as a piped tool does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
