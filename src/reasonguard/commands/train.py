"""`reasonguard train sft|dpo|classifier --config C.yaml [key=value ...] [--dry-run]`: train a
guard model, or the encoder classifier of a cascade's first tier.

Example:
    reasonguard train sft --config configs/demo-cpu.yaml learning_rate=1e-4 --dry-run
    reasonguard train dpo --config configs/guardreasoner-hsdpo-3b.yaml --dry-run
    reasonguard train classifier --config configs/classifier-minilm.yaml
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


_CLASSIFIER_HELP = """\
An encoder classifier (all-MiniLM-L6-v2 offline with model_name_or_path: minilm; a DeBERTa-v3
or ModernBERT hub id on a real machine) with one head per task: request harmful, response
refusal, response harmful. One forward pass per item (the request alone, or request and response
as a pair); the loss is masked where a task has no label. Labels from guard training records
(dataset), from benchmark files (benchmarks + benchmark_dir), or, to distil a guard, from a folder
of its predictions as `generate` writes them (teacher_predictions; their label probabilities are
soft targets where present). Same run directory, resume, logging and `key=value` overrides as
`train sft`; output_dir/final is a guard for classify, generate, evaluate and serve.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a guard model (sft, dpo) or an encoder classifier"
    )
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, help_text, description in (
        ("sft", "reasoning SFT (full, LoRA or QLoRA)", _SFT_HELP),
        ("dpo", "hard-sample DPO on mined pairs (full, LoRA or QLoRA)", _DPO_HELP),
    ):
        _add_stage(stages, stage, help_text, description)
    _add_classifier(stages)


def _add_classifier(stages: Any) -> None:
    parser = stages.add_parser(
        "classifier",
        help="an encoder classifier with one head per task (gold labels or a teacher's)",
        description=_CLASSIFIER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and the labels and print the data plan (items, labels per "
        "task, steps) without loading model weights",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop invalid records or prediction rows (counted in training_info.json) instead "
        "of stopping",
    )
    parser.set_defaults(func=run_classifier_stage)


def run_classifier_stage(args: argparse.Namespace) -> int:
    from reasonguard.classifier.config import load_classifier_config

    overrides = list(args.overrides) + (["skip_invalid=true"] if args.skip_invalid else [])
    check_stage("classifier", args.config, overrides)
    config = load_classifier_config(args.config, overrides)
    if args.dry_run:
        from reasonguard.classifier.plan import format_classifier_plan, plan_classifier

        print(format_classifier_plan(plan_classifier(config)))
        return 0
    from reasonguard.classifier.train import run_classifier

    run_classifier(config)
    return 0


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
    from reasonguard.classifier.config import ClassifierConfig
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
    classifier_keys = set(field_names(ClassifierConfig))
    given = [key for key in dpo_keys if key in data]
    if stage == "classifier":
        _check_classifier_config(config_path, data, classifier_keys, set(dpo_keys))
        return
    only_classifier = [key for key in data if key in classifier_keys - sft_keys]
    if only_classifier:
        raise UserError(
            f"{config_path} is a classifier config (it sets {', '.join(only_classifier)}, which "
            f"only the encoder classifier has): train it with `reasonguard train classifier "
            f"--config {config_path}`"
        )
    _check_causal_model(data.get("model_name_or_path"), stage)
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


def _check_classifier_config(
    config_path: str, data: dict[str, Any], classifier_keys: set[str], dpo_keys: set[str]
) -> None:
    """Refuse an SFT or DPO config given to `train classifier`, naming its command."""
    from reasonguard.errors import UserError

    foreign = [key for key in data if key not in classifier_keys]
    if not foreign:
        return
    from reasonguard.train.config import SFTConfig, field_names

    guard_keys = set(field_names(SFTConfig)) | dpo_keys
    if all(key in guard_keys for key in foreign):
        command = "dpo" if any(key in dpo_keys for key in foreign) else "sft"
        raise UserError(
            f"{config_path} is a {command.upper()} config of a causal guard model (it sets "
            f"{', '.join(foreign)}, which the encoder classifier has not): train it with "
            f"`reasonguard train {command} --config {config_path}`"
        )


def _check_causal_model(name: Any, stage: str) -> None:
    """Refuse a trained classifier or an encoder as the model of `train sft|dpo`.

    Only local folders and the offline aliases are looked at (a hub id is judged when it loads).
    """
    from pathlib import Path

    from reasonguard.classifier.kinds import folder_kind
    from reasonguard.errors import UserError
    from reasonguard.models import ALIASES, resolve_model

    if not isinstance(name, str) or not (name in ALIASES or Path(name).expanduser().is_dir()):
        return
    if name in ALIASES and name != "minilm":
        return  # the causal aliases: nothing to read (and nothing to build) here
    folder = Path(name).expanduser()
    # a local folder is judged by what it holds before resolve_model's model-folder checks, so
    # a classifier folder gets this message rather than 'holds no model'
    kind = folder_kind(folder if folder.is_dir() else resolve_model(name))
    if kind == "classifier":
        raise UserError(
            f"config key 'model_name_or_path': {name} is an encoder classifier (trained by "
            f"`reasonguard train classifier`), not a causal language model; train {stage} "
            "trains a reasoning guard from a causal LM (Llama, SmolLM2, ...). To train the "
            "classifier further, name it in a classifier config: `reasonguard train classifier`"
        )
    if kind == "encoder":
        raise UserError(
            f"config key 'model_name_or_path': {name} is an encoder, not a causal language "
            f"model: train {stage} teaches a model to write its reasoning, which an encoder "
            "cannot. Encoders train as classifiers: `reasonguard train classifier`"
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
