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

from reasonguard.launch.command import SHARDINGS

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
        "`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N` (the "
        "--sharding strategy's file); with --dry-run, plans for N processes",
    )
    parser.add_argument(
        "--sharding",
        choices=SHARDINGS,
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
    from reasonguard.train.config import DPOConfig, SFTConfig, load_config

    overrides = list(args.overrides) + (["skip_invalid=true"] if args.skip_invalid else [])
    check_stage(args.stage, args.config, overrides)  # an SFT config to dpo, or a DPO one to sft
    cls = {"sft": SFTConfig, "dpo": DPOConfig}[args.stage]
    config = load_config(args.config, overrides, cls=cls)  # config errors surface here, pre-model

    from reasonguard.launch.command import launch, world_size

    processes = args.num_processes
    if processes is not None and processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {processes}")
    if args.cpu and not (processes and processes > 1):
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by training's device choice
    if args.dry_run:
        from reasonguard.plan.dryrun import format_plan, plan_sft

        world = processes or world_size()

        if args.stage == "dpo":
            from reasonguard.train.dpo.pairs import load_pairs, prepare_pairs

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
        from reasonguard.train.dpo.stage import run_dpo

        run_dpo(config)
        return 0
    from reasonguard.train.sft import run_sft

    run_sft(config)
    return 0


def check_stage(stage: str, config_path: str, overrides: list[str]) -> None:
    """Refuse a config of the other stage, before anything loads.

    A DPO config is one that sets a DPO key (`beta`, `loss_type`, `pref_ftx`, `init_adapter`:
    the keys DPO has and SFT has not); `train sft` refuses it. `train dpo` refuses a config that
    sets none of them and whose dataset holds guard records instead of preference pairs: the
    shipped `samples`, the GuardReasoner training set, or a local file or folder whose first row
    has no `chosen` / `rejected` (other hub ids are not looked at).

    Raises:
        UserError: naming the command that trains the config.
    """
    from reasonguard.errors import UserError
    from reasonguard.train.config import (
        DPOConfig,
        SFTConfig,
        apply_overrides,
        field_names,
        read_yaml,
    )

    data = apply_overrides(read_yaml(config_path), overrides)
    sft_keys = set(field_names(SFTConfig))
    dpo_keys = [key for key in field_names(DPOConfig) if key not in sft_keys]
    given = [key for key in dpo_keys if key in data]
    if stage == "sft" and given:
        raise UserError(
            f"{config_path} is a DPO config (it sets {', '.join(given)}, which only DPO has): "
            f"train it with `reasonguard train dpo --config {config_path}`"
        )
    dataset = data.get("dataset")
    if stage == "dpo" and not given and isinstance(dataset, str) and _holds_records(dataset):
        raise UserError(
            f"{config_path} is an SFT config, not a DPO config: it sets none of the DPO keys "
            f"({', '.join(dpo_keys)}) and its dataset {dataset!r} holds guard records "
            "(instruction/input/output), not preference pairs (chosen/rejected). Train it with "
            f"`reasonguard train sft --config {config_path}`; DPO trains on the pair file that "
            "`reasonguard mine` writes, with a config that sets the DPO keys"
        )


def _holds_records(dataset: str) -> bool:
    """Whether a dataset is known to hold guard records, not DPO pairs (see `check_stage`)."""
    import json
    from pathlib import Path

    from reasonguard.data.sources import DEFAULT_DATASET, SAMPLES, load_source

    if dataset in (SAMPLES, DEFAULT_DATASET) and not Path(dataset).exists():
        return True
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as lines:
            first = next((line for line in lines if line.strip()), "")
        try:
            row = json.loads(first) if first else None
        except json.JSONDecodeError:
            return False  # the pair reader reports the bad line
    elif path.exists():
        try:
            row = next((rows[0] for rows in load_source(str(path)).values() if rows), None)
        except Exception:  # unreadable data: the pair reader reports it
            return False
    else:
        return False
    return isinstance(row, dict) and not {"chosen", "rejected"} & set(row)
