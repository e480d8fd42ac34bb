"""`reasonguard plan --config C [--gpu CLASS] [--tokens-per-second X]`: how long and how much
memory an SFT run will take, before launching it (no model weights loaded).

Example:
    reasonguard plan --config configs/exp19-qlora-3b-instruct.yaml --gpu 4090
    reasonguard plan --config configs/demo-cpu.yaml --gpu cpu --json runs/plan-demo.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# Light imports only: `reasonguard --help` imports this file.
from reasonguard.errors import UserError

# Kept in step with reasonguard.train.plan.TARGETS (tests check it), so --help needs no import.
GPU_CHOICES = ("h100", "a100", "l40s", "4090", "4070ti-super", "cpu")

_HELP = """\
Tokens per epoch, optimizer steps, a memory estimate (weights, trainable weights and AdamW
state, activations with and without gradient checkpointing, LM head) and the wall time of an SFT
config, from a FLOPs model and an assumed MFU per GPU class (peak TFLOPS from NVIDIA's spec
sheets), or for `cpu` a matmul timed on this machine. Token counts come from the real rows when
data and tokenizer are local, else from published statistics (marked ESTIMATED). `key=value`
overrides apply as in `train sft`.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate the time and memory of a training config before launching it",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="SFT YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--gpu",
        default=None,
        metavar="CLASS",
        help=f"target: {'|'.join(GPU_CHOICES)} (default: this machine's GPU class, or cpu)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        metavar="X",
        help="a measured training rate (real, non-pad tokens/s as `train` logs it); replaces "
        "the throughput model",
    )
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the plan here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.gpu is not None and args.gpu not in GPU_CHOICES:
        raise UserError(f"--gpu {args.gpu!r} is not known; choose one of: {', '.join(GPU_CHOICES)}")
    rate = args.tokens_per_second
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise UserError(f"--tokens-per-second must be a positive number, got {rate}")
    from reasonguard.train.config import load_config
    from reasonguard.train.plan import format_training_plan, plan_training

    config = load_config(args.config, list(args.overrides))
    plan = plan_training(config, gpu=args.gpu, tokens_per_second=rate)
    print(format_training_plan(plan))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config_file": args.config, **plan}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
