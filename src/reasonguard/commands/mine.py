"""`reasonguard mine GENERATIONS.jsonl [...] --out pairs.jsonl`: hard-sample pairs for HS-DPO.

Reads the k-sample training-data generations of `reasonguard generate --data ... --samples K`,
keeps the prompts the model is unsure about and writes weighted preference pairs; see
`reasonguard.hsdpo.mine`.

Example:
    reasonguard mine runs/hsdpo/generations/main/WildGuardTrainR.jsonl \\
        runs/hsdpo/generations/no-ToxicChatTrainR/AegisTrainR.jsonl --out runs/hsdpo/pairs.jsonl
"""

from __future__ import annotations

import argparse
from typing import Any

_HELP = """\
Hard-sample mining. Needs at least 2 sampled outputs per prompt (generate with --samples 4
--temperature 0.7); a file of one sample per prompt (k = 1) is refused, as it cannot give pairs.
Per row, the sampled outputs missing an answer are ignored; the tasks are tried in the order
request, response, refusal (the last two only for a real AI response with a true label); the first
task where the outputs are mixed right and wrong gives one pair: chosen = the longest right output,
rejected = the longest wrong one (ties: the earlier sample). Weights #wrong - #right are min-max
scaled per file to [1 - max_norm, 1 + max_norm]. Files are merged in the order given; a duplicate
input keeps the first file's pair. Writes the pairs to --out and a summary beside them (pairs.jsonl
-> pairs.summary.json): rows per source and task that were hard, all right, all wrong or
unparseable.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "mine",
        help="mine hard-sample preference pairs from k-sample generations (HS-DPO data)",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "generations",
        nargs="+",
        metavar="GENERATIONS",
        help="JSONL of `generate --data ... --samples K` rows, in priority order",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PAIRS",
        help="pair file to write (JSONL); the summary goes beside it (pairs.summary.json)",
    )
    parser.add_argument(
        "--max-norm",
        type=float,
        default=0.2,
        help="weights span [1 - max_norm, 1 + max_norm] within each file (default 0.2)",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip and count invalid generation rows instead of stopping at the first",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reasonguard.hsdpo.mine import mine_files

    mine_files(args.generations, args.out, max_norm=args.max_norm, skip_invalid=args.skip_invalid)
    return 0
