"""What transformers and accelerate are told for a training run: the `TrainingArguments` built
from the config, the DeepSpeed config under a DeepSpeed launch, and where the processes run
(CPU or GPU, the process group's backend).

Built before the weights load, so DeepSpeed ZeRO-3 loads them partitioned (`zero.Init`) and
FSDP's `cpu_ram_efficient_loading` applies. One Trainer batch is one optimizer step's rows: the
engine (`train.engine`) splits it into micro-batches and accumulates their gradients itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def training_arguments(
    config: Any,
    *,
    run_dir: Path,
    total_steps: int,
    bf16: bool,
    evaluates: bool,
    is_main: bool,
) -> Any:
    """The Trainer's arguments: the config's Hugging Face settings, one step per batch.

    Args:
        config: the run's config with its decisions in place of `auto` (`Recipe.run_config`).
        run_dir: the run directory (checkpoints go there).
        total_steps: the optimizer steps of the whole run.
        bf16: whether the run trains in bf16.
        evaluates: whether the run has held-out rows to evaluate on.
        is_main: whether this is rank 0 (the only one with a progress bar).
    """
    from transformers import TrainingArguments

    from reasonguard.train.modeling import cuda_available, warmup_steps

    c = config
    save = {"both": "steps"}.get(c.save_strategy, c.save_strategy)
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=total_steps,
        per_device_train_batch_size=1,  # one batch = one optimizer step's rows (engine.py)
        gradient_accumulation_steps=1,
        per_device_eval_batch_size=c.per_device_eval_batch_size,
        learning_rate=c.learning_rate,
        weight_decay=c.weight_decay,
        adam_beta1=c.adam_beta1,
        adam_beta2=c.adam_beta2,
        adam_epsilon=c.adam_epsilon,
        max_grad_norm=c.max_grad_norm,
        lr_scheduler_type=c.lr_scheduler_type,
        warmup_steps=warmup_steps(c, total_steps),
        optim=c.optim,
        seed=c.seed,
        bf16=bf16,
        use_cpu=cpu_only() and not cuda_available(),
        logging_steps=c.logging_steps,
        logging_first_step=True,
        report_to=c.report_to,
        eval_strategy=c.eval_strategy if evaluates else "no",
        eval_steps=c.eval_steps,
        save_strategy=save,
        save_steps=c.save_steps,
        # Kept by step number in the run monitor (transformers orders by mtime, which a
        # resumed DeepSpeed run touches on the checkpoint it loads).
        save_total_limit=None,
        save_only_model=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=not is_main or None,
        deepspeed=deepspeed_config(),
        ddp_backend=process_backend().get("backend"),
    )


def deepspeed_config() -> dict[str, Any] | None:
    """Under a DeepSpeed launch: the launcher's DeepSpeed config (its YAML's settings or its
    JSON file), with the batch keys one optimizer step per batch needs; None otherwise.
    The other `auto` values (optimizer, clipping, precision) are filled by transformers from
    the training arguments."""
    from reasonguard.launch.command import uses_deepspeed

    if not uses_deepspeed():
        return None
    import copy

    from accelerate.utils import DeepSpeedPlugin

    config = copy.deepcopy(DeepSpeedPlugin().deepspeed_config)
    config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,  # the accumulation is the engine's, within a step
    )
    # Left for DeepSpeed to derive (micro x accumulation x processes): transformers would
    # fill it before the process group is known.
    config.pop("train_batch_size", None)
    # The launcher's settings are in `config` now; accelerate would refuse them twice.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    return config


def cpu_only() -> bool:
    """Whether accelerate should run this process on the CPU. Not under DeepSpeed: accelerate
    drops DeepSpeed from CPU-only states, while DeepSpeed runs on CPU processes itself (its CPU
    accelerator, with gloo)."""
    import torch

    from reasonguard.launch.command import forced_cpu, uses_deepspeed

    if uses_deepspeed():
        return False
    return forced_cpu() or not torch.cuda.is_available()


def process_backend() -> dict[str, str]:
    """DeepSpeed on CPU processes needs gloo named: accelerate finds no backend without a GPU."""
    import torch

    from reasonguard.launch.command import uses_deepspeed

    return {"backend": "gloo"} if uses_deepspeed() and not torch.cuda.is_available() else {}


def true_env(name: str) -> bool:
    """Whether the environment variable `name` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
