"""`reasonguard train sft|dpo --config C.yaml [key=value ...] [--dry-run]`: train a guard model.

Example:
    reasonguard train sft --config configs/demo-cpu.yaml learning_rate=1e-4 --dry-run
    reasonguard train dpo --config configs/guardreasoner-hsdpo-3b.yaml --dry-run
    reasonguard train sft --config configs/demo-cpu.yaml --num-processes 2 --cpu
    reasonguard train sft --config configs/guardreasoner-rsft-8b.yaml --num-processes 4 --sharding zero3
"""

from __future__ import annotations

import argparse
from typing import Any

_SFT_HELP = """\
Reasoning SFT (GuardReasoner stage 1). Settings come from the YAML config; `key=value` overrides
(YAML values: 5e-5, true, [a, b], null) apply on top. The run directory (output_dir) receives
checkpoints, TensorBoard logs, status.json, training_info.json, loss_curve.png and the final model
in output_dir/final. Rerunning the same command resumes from the newest checkpoint (resume: auto).
Several GPUs: `--num-processes N [--sharding fsdp|zero2|zero3]` (or `accelerate launch
--config_file configs/accelerate/X.yaml -m reasonguard train sft ...`); the rows per optimizer
step stay effective_batch_size, so the optimizer steps do not depend on N.
"""


_DPO_HELP = """\
Hard-sample DPO (GuardReasoner stage 2) on the pairs of `reasonguard mine`, starting from an R-SFT
model (model_name_or_path: its final/ folder). Each pair's DPO loss (sigmoid, beta) plus pref_ftx x
the chosen output's NLL is multiplied by its sample_weight. Same run directory, resume, logging and
`key=value` overrides as `train sft`; the reference log-probs are computed once before step 1.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="train a guard model (sft, dpo)")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, help_text, description in (
        ("sft", "reasoning SFT (full, LoRA or QLoRA)", _SFT_HELP),
        ("dpo", "hard-sample DPO on mined pairs (full, LoRA or QLoRA)", _DPO_HELP),
    ):
        _add_stage(stages, stage, help_text, description)


def _add_stage(stages: Any, stage: str, help_text: str, description: str) -> None:
    parser = stages.add_parser(
        stage,
        help=help_text,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print the data plan (rows, steps, batch, max length) "
        "without loading model weights",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop invalid dataset rows (counted in training_info.json) instead of stopping",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="train in N data-parallel processes, one per GPU: relaunches this command under "
        "`accelerate launch --multi_gpu --num_processes N`; with --dry-run, plans for N processes",
    )
    parser.add_argument(
        "--sharding",
        choices=("ddp", "fsdp", "zero2", "zero3"),
        default="ddp",
        help="with --num-processes: ddp = a full replica per process (default); fsdp = PyTorch "
        "FSDP2, zero2 / zero3 = DeepSpeed ZeRO stage 2 / 3 (parameters, gradients and optimizer "
        "state sharded: full fine-tuning of models one GPU cannot hold)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="CPU processes (gloo) even where GPUs exist, e.g. --num-processes 2 --cpu in CI",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from reasonguard.errors import UserError
    from reasonguard.train.config import SFTConfig, load_config
    from reasonguard.train.dpo import DPOConfig
    from reasonguard.train.launch import launch, world_size

    overrides = list(args.overrides) + (["skip_invalid=true"] if args.skip_invalid else [])
    cls = {"sft": SFTConfig, "dpo": DPOConfig}[args.stage]
    config = load_config(args.config, overrides, cls=cls)  # config errors surface here, pre-model
    processes = args.num_processes
    if processes is not None and processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {processes}")
    if args.cpu and not (processes and processes > 1):
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by training's device choice
    if args.dry_run:
        from reasonguard.train.allocenv import decision
        from reasonguard.train.dryrun import format_plan, plan_sft

        world = processes or world_size()

        if args.stage == "dpo":
            from reasonguard.train.dpo_data import load_pairs, prepare_pairs

            plan = plan_sft(
                config,
                prepare_fn=prepare_pairs,
                records_fn=load_pairs,
                world_size=world,
                stage="dpo",
            )
        else:
            plan = plan_sft(config, world_size=world)
        print(format_plan(plan))
        allocator = decision()
        settings = " ".join(f"{k}={v}" for k, v in allocator["env"].items() if v is not None)
        print(f"cpu allocator: {allocator['action']}" + (f" ({settings})" if settings else ""))
        return 0
    if processes is not None and processes > 1:
        argv = ["train", args.stage, "--config", args.config, *overrides]
        return launch(argv, processes, cpu=args.cpu, sharding=args.sharding)
    if args.sharding != "ddp":
        raise UserError(
            f"--sharding {args.sharding} needs --num-processes N (N >= 2); under a launcher "
            "the launcher's config chooses (configs/accelerate/*.yaml)"
        )
    if args.stage == "dpo":
        from reasonguard.train.dpo import run_dpo

        run_dpo(config)
        return 0
    from reasonguard.train.sft import run_sft

    run_sft(config)
    return 0
