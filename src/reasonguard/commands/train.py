"""`reasonguard train sft --config C.yaml [key=value ...] [--dry-run]`: train a guard model.

Example:
    reasonguard train sft --config configs/demo-cpu.yaml learning_rate=1e-4 --dry-run
"""

from __future__ import annotations

import argparse
from typing import Any

_SFT_HELP = """\
Reasoning SFT (GuardReasoner stage 1). Settings come from the YAML config; `key=value` overrides
(YAML values: 5e-5, true, [a, b], null) apply on top. The run directory (output_dir) receives
checkpoints, TensorBoard logs, status.json, training_info.json, loss_curve.png and the final model
in output_dir/final. Rerunning the same command resumes from the newest checkpoint (resume: auto).
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="train a guard model (sft)")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    sft = stages.add_parser(
        "sft",
        help="reasoning SFT (full, LoRA or QLoRA)",
        description=_SFT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sft.add_argument("--config", required=True, help="YAML config (see configs/)")
    sft.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    sft.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print the data plan (rows, steps, batch, max length) "
        "without loading model weights",
    )
    sft.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop invalid dataset rows (counted in training_info.json) instead of stopping",
    )
    sft.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reasonguard.train.config import load_config

    overrides = list(args.overrides) + (["skip_invalid=true"] if args.skip_invalid else [])
    config = load_config(args.config, overrides)  # every config error surfaces here, pre-model
    if args.stage != "sft":
        raise AssertionError(f"unhandled stage {args.stage}")
    if args.dry_run:
        from reasonguard.train.allocenv import decision
        from reasonguard.train.dryrun import format_plan, plan_sft

        print(format_plan(plan_sft(config)))
        allocator = decision()
        settings = " ".join(f"{k}={v}" for k, v in allocator["env"].items() if v is not None)
        print(f"cpu allocator: {allocator['action']}" + (f" ({settings})" if settings else ""))
        return 0
    from reasonguard.train.sft import run_sft

    run_sft(config)
    return 0
