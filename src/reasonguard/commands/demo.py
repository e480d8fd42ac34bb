"""`reasonguard demo`: the whole R-SFT flow on SmolLM2-135M, offline, on a CPU (see demo.py);
`reasonguard demo --tiers`: an encoder classifier in front of that guard, the three-tier cascade
(see demo_tiers.py)."""

from __future__ import annotations

import argparse

from reasonguard.commands.generate import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train, generate and score on the shipped samples with SmolLM2 (CPU, offline)",
        description="Run the offline demo: LoRA R-SFT of SmolLM2-135M-Instruct on the project's "
        "sample set, generation on a held-out part, and per-task scoring. With --tiers, put an "
        "encoder classifier in front of the demo's trained guard (trained first when --out has "
        "none): train the classifier on the same rows, calibrate the three-tier cascade "
        "(classifier, fast mode, reasoning) on the held-out part, judge example prompts "
        "through it and write OUT/tiers/report.md.",
        epilog="examples: reasonguard demo; reasonguard demo --tiers",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config", default=None, help="training config (default configs/demo-cpu.yaml)")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=320, help="generation budget per item"
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="generation batch size (16)")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing it")
    p.add_argument(
        "--tiers",
        action="store_true",
        help="the three-tier demo: classifier, fast mode, reasoning, reusing the demo's guard",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tiers:
        from reasonguard.errors import UserError

        if args.fresh:
            raise UserError("--fresh goes with the demo itself: --tiers reuses its trained guard")
        from reasonguard.demo_tiers import run_tiers_demo

        run_tiers_demo(
            out=args.out,
            config=args.config,
            overrides=args.overrides,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        return 0
    from reasonguard.demo import run_demo

    run_demo(
        out=args.out,
        config=args.config,
        overrides=args.overrides,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        fresh=args.fresh,
    )
    return 0
