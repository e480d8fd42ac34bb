"""`reasonguard hsdpo --config P.yaml [key=value ...] [--dry-run] [--export-configs DIR]`.

Runs GuardReasoner stage 2 end to end (diversity R-SFT models, k-sample generation, mining, DPO);
see `reasonguard.hsdpo.pipeline`.

Example:
    reasonguard hsdpo --config configs/hsdpo/guardreasoner-3b.yaml --dry-run
    reasonguard hsdpo --config configs/hsdpo/guardreasoner-3b.yaml --num-processes 4 data_parallel=4
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reasonguard.launch.command import SHARDINGS

_HELP = """\
Hard-sample DPO, the whole stage, resumable: (1) the main R-SFT model, (2) one diversity R-SFT
model per left-out source, (3) k sampled outputs per training prompt (each left-out source
sampled by the diversity models that trained on it, the other sources by the main model),
(4) mining and merging the hard samples, (5) weighted DPO from the main model. It prints the plan
first; a stage whose output is complete is skipped, so rerunning the same command after a crash
continues where it stopped. Each training and generation stage runs as its own reasonguard
command in a child process (printed before it starts), so it returns its GPU memory when it ends;
when one fails, the pipeline stops with that stage's exit code. With --dry-run the plan also lists what would stop the run here (a
main_model that does not exist, a backend that is not installed); a real run refuses to start
with those.

Several GPUs: --num-processes N [--sharding fsdp|zero2|zero3] [--cpu] launch every training stage
as `reasonguard train STAGE --config C.yaml --num-processes N ...` does; the generation stages
use data_parallel. Give the same flags when rerunning to resume.

Relative paths in the pipeline file (sft_config, dpo_config, main_model) are looked up in the
pipeline file's folder first, then in the current directory, then in the folders above the
pipeline file; output_dir is relative to the current directory.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "hsdpo",
        help="hard-sample DPO pipeline (diversity models, sampling, mining, DPO)",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="pipeline YAML (see configs/hsdpo/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument(
        "--export-configs",
        metavar="DIR",
        help="write the resolved R-SFT configs of the main and diversity models and the DPO "
        "config to DIR (to run or inspect stages by hand), then stop",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="train every R-SFT and DPO stage in N processes, one per GPU (passed on to "
        "`reasonguard train`, like its --num-processes); generation: data_parallel",
    )
    parser.add_argument(
        "--sharding",
        choices=SHARDINGS,
        default="ddp",
        help="with --num-processes: how the training stages share the model (see "
        "`reasonguard train sft --help`)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="train the stages in CPU processes (gloo) even where GPUs exist",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from reasonguard.hsdpo.pipeline import Pipeline, load_pipeline_config, run_pipeline
    from reasonguard.hsdpo.stages import StageFailed, TrainLaunch, save_stage_config

    launch = TrainLaunch(args.num_processes, args.sharding, args.cpu)  # refused before loading
    config = load_pipeline_config(args.config, args.overrides)
    if args.export_configs:
        pipeline = Pipeline(config)
        out = Path(args.export_configs)
        out.mkdir(parents=True, exist_ok=True)
        written = [save_stage_config(pipeline.main_sft, out / "rsft-main.yaml", "sft")]
        for source, sft in pipeline.diversity.items():
            written.append(save_stage_config(sft, out / f"rsft-no-{source}.yaml", "sft"))
        written.append(save_stage_config(pipeline.dpo_config(), out / "dpo.yaml", "dpo"))
        for item in written:
            print(item)
        return 0
    try:
        run_pipeline(config, dry_run=args.dry_run, launch=launch)
    except StageFailed as exc:
        # The child already printed why; its exit code says how (2: bad input, as for any
        # reasonguard command), so a script sees the same code as from the stage run by hand.
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
