"""`reasonguard plan --config C [--gpu CLASS] [--gpu-memory-gib G --gpu-tflops T]
[--num-processes N --sharding S] [--tokens-per-second X]`: how long and how much memory an SFT
run will take, before launching it (no model weights loaded).

Example:
    reasonguard plan --config configs/exp19-qlora-3b-instruct.yaml --gpu 4090
    reasonguard plan --config configs/exp19-qlora-3b-instruct.yaml --gpu a100 --gpu-memory-gib 40
    reasonguard plan --config configs/guardreasoner-rsft-8b.yaml --gpu h100 --num-processes 4 --sharding zero3
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
from reasonguard.launch.command import SHARDINGS

# Kept in step with reasonguard.plan.estimate.TARGETS (tests check it), so --help needs no import.
GPU_CHOICES = (
    "h100",
    "a100",
    "l40s",
    "a6000",
    "l4",
    "a10",
    "4090",
    "3090",
    "4070ti-super",
    "cpu",
)
# The launcher's list (a light import: no torch), as `train --sharding` takes it.
SHARDING_CHOICES = SHARDINGS

_HELP = """\
Tokens per epoch, optimizer steps, a memory estimate (weights, trainable weights and AdamW
state, activations with and without gradient checkpointing, LM head) and the wall time of an SFT
config, from a FLOPs model and an assumed MFU per GPU class (peak TFLOPS from NVIDIA's spec
sheets; the MFU is marked ASSUMED), or for `cpu` a matmul timed on this machine. Token counts
come from the real rows when data and tokenizer are local, else from published statistics
(marked ESTIMATED). `key=value` overrides apply as in `train sft`.

A GPU that is not in the table: describe it with --gpu-memory-gib and --gpu-tflops (its dense
bf16 tensor TFLOPS from the spec sheet: half the headline figure where that is "with
sparsity"); with --gpu CLASS, either one replaces that class's number (an A100 40GB:
--gpu a100 --gpu-memory-gib 40).

Several GPUs (`--num-processes N --sharding ddp|fsdp|zero2|zero3`, as `train` takes them):
memory is per GPU (ddp a full replica; zero2 shards the fp32 master weights, gradients and AdamW
moments; fsdp / zero3 shard the weights too and gather one block at a time); time is the one-GPU
time / N / an ASSUMED scaling efficiency (0.90 ddp / zero2, 0.85 fsdp / zero3; not measured).
When a config does not fit, the plan names the fewest GPUs (2, 4 or 8) fsdp / zero3 need.
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
        help=f"target: {'|'.join(GPU_CHOICES)}, any case (default: this machine's GPU class, "
        "or cpu)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        metavar="G",
        help="GPU memory in GiB: with --gpu-tflops, plan for a GPU not in the table; with --gpu, "
        "replaces that class's memory",
    )
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=None,
        metavar="T",
        help="the GPU's dense bf16 tensor TFLOPS (spec sheet, without sparsity): with "
        "--gpu-memory-gib, plan for a GPU not in the table; with --gpu, replaces that class's",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        metavar="X",
        help="a measured training rate (real, non-pad tokens/s as `train` logs it, of a run with "
        "the same --num-processes and --sharding); replaces the throughput model, not scaled",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="GPUs of one node, one training process each (default: 1)",
    )
    parser.add_argument(
        "--sharding",
        default="ddp",
        metavar="S",
        help=f"with --num-processes N >= 2: {'|'.join(SHARDING_CHOICES)} (default: ddp, a full "
        "replica per GPU), as `train --sharding`",
    )
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the plan here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    gpu = None if args.gpu is None else args.gpu.strip().lower()
    if gpu is not None and gpu not in GPU_CHOICES:
        raise UserError(
            f"--gpu {args.gpu!r} is not known; choose one of: {', '.join(GPU_CHOICES)}; or "
            "describe it with --gpu-memory-gib and --gpu-tflops (no --gpu)"
        )
    rate = args.tokens_per_second
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise UserError(f"--tokens-per-second must be a positive number, got {rate}")
    processes, sharding = args.num_processes, args.sharding  # checked by plan.target.check_parallel
    from reasonguard.plan.estimate import format_training_plan, plan_training
    from reasonguard.train.config import load_config

    config = load_config(args.config, list(args.overrides))
    plan = plan_training(
        config,
        gpu=gpu,
        tokens_per_second=rate,
        num_processes=processes,
        sharding=sharding,
        gpu_memory_gib=args.gpu_memory_gib,
        gpu_tflops=args.gpu_tflops,
    )
    print(format_training_plan(plan))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config_file": args.config, **plan}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
