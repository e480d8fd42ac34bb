"""`reasonguard plan`: tokens, steps, memory and wall time of an SFT config, before launching it.

A timeline of the kind "~1,000 steps/epoch at 5.4 min/step, ~270 hours", computed from the
config, the data and the model's shapes:

1. **Tokens.** The data plan of `train sft --dry-run` (`dryrun.plan_sft`). When the rows and the
   tokenizer are local, the real token lengths of every training row are used; otherwise (a hub
   dataset with no hub access) the rows are the published split sizes and the lengths a seeded
   sample drawn to match the published token statistics (`batch_profile.PUBLISHED_TOKENS`),
   marked ESTIMATED. Micro-batches are formed by the trainer's own code on the first steps of
   epoch 0 (`batch_profile.token_profile`), which gives the padding and the largest micro-batch.
2. **Memory** of the largest micro-batch (`memory.memory_estimate`): weights by fine-tuning
   mode, trainable weights + gradients + AdamW state, activations with and without gradient
   checkpointing, the LM head over label positions only, and a runtime allowance. On several
   GPUs (`num_processes`, `sharding`: ddp, fsdp, zero2, zero3, as `train` takes them) the
   estimate is per GPU (`memory.parameter_memory`).
3. **Time** from a FLOPs model (`timing.flops_per_token`, attention counted as the run's kernel
   computes it) divided by the sustained FLOPS of the target (`timing.throughput`): the GPU
   class's peak x an assumed MFU (`hardware.GPUS`; marked ASSUMED in the plan), or, for `cpu`, a
   matmul timed on this machine, or a measured `tokens_per_second`. A GPU outside the table is
   described by its memory and bf16 TFLOPS (`hardware.custom_gpu`). N GPUs divide the time by N x an assumed scaling
   efficiency; the optimizer steps are the trainer's for N processes.

The parts live in `plan.hardware` (GPU and model tables), `plan.target` (the device and the
launch a plan is for), `plan.batch_profile` (token counts), `plan.memory`, `plan.timing`,
`plan.fit` (what would fit when the run does not) and `plan.report` (the text); their public
names are importable from here too.

Accuracy: a planning estimate. The MFU values are assumptions from published anchors, not
measurements of this code on these GPUs (GPU speed is unmeasured, see BENCHMARKS.md); the memory
model counts the big tensors, ignores small ones and has not been checked against a measured
peak, so treat it as a rough guide. Nothing multi-GPU here is measured either: the sharded
memory follows what FSDP2 and DeepSpeed allocate, the scaling efficiencies are assumptions.

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.plan.estimate import format_training_plan, plan_training
    >>> plan = plan_training(load_config("configs/exp19-qlora-3b-instruct.yaml"), gpu="4090")  # doctest: +SKIP
    >>> print(format_training_plan(plan))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

from reasonguard.errors import UserError
from reasonguard.launch.command import SHARDINGS
from reasonguard.plan.batch_profile import (
    PUBLISHED_TOKENS,
    SIMULATED_STEPS,
    per_sample_attention,
    row_tokens,
    token_profile,
)
from reasonguard.plan.decisions import checkpointing_decision, quantization_decision
from reasonguard.plan.fit import SHARDED_PROCESS_COUNTS, sharded_fit, smaller_alternatives
from reasonguard.plan.hardware import (
    GIB,
    GPUS,
    KNOWN_ARCHITECTURES,
    MFU_SOURCE,
    TARGETS,
    Architecture,
    GPUClass,
    architecture_from_config,
    cpu_label,
    model_architecture,
    ram_bytes,
    this_machine,
)
from reasonguard.plan.memory import (
    ALLOCATOR_SLACK,
    CPU_RUNTIME_GIB,
    CUDA_CONTEXT_GIB,
    DEEPSPEED_REDUCE_BUCKET,
    STRATEGY_TEXT,
    both_memories,
    memory_estimate,
    parameter_memory,
    run_memory,
    trainable_params,
)
from reasonguard.plan.report import format_training_plan, hours_text
from reasonguard.plan.target import check_parallel, plan_target
from reasonguard.plan.timing import (
    CPU_EFFICIENCY,
    SCALING_EFFICIENCY,
    flops_per_token,
    lm_head_flops,
    measure_matmul_flops,
    run_flops,
    scaling_efficiency,
    throughput,
)

__all__ = [
    "ALLOCATOR_SLACK",
    "CPU_EFFICIENCY",
    "CPU_RUNTIME_GIB",
    "CUDA_CONTEXT_GIB",
    "DEEPSPEED_REDUCE_BUCKET",
    "GIB",
    "GPUS",
    "KNOWN_ARCHITECTURES",
    "PUBLISHED_TOKENS",
    "SCALING_EFFICIENCY",
    "SHARDED_PROCESS_COUNTS",
    "SHARDINGS",
    "SIMULATED_STEPS",
    "STRATEGY_TEXT",
    "TARGETS",
    "Architecture",
    "GPUClass",
    "architecture_from_config",
    "check_parallel",
    "flops_per_token",
    "format_training_plan",
    "hours_text",
    "lm_head_flops",
    "measure_matmul_flops",
    "memory_estimate",
    "model_architecture",
    "parameter_memory",
    "plan_target",
    "plan_training",
    "run_memory",
    "scaling_efficiency",
    "this_machine",
    "token_profile",
]


def plan_training(
    config: Any,
    gpu: str | None = None,
    tokens_per_second: float | None = None,
    cpu_flops: float | None = None,
    num_processes: int = 1,
    sharding: str = "ddp",
    gpu_memory_gib: float | None = None,
    gpu_tflops: float | None = None,
) -> dict[str, Any]:
    """Tokens, steps, memory and wall time of an SFT config on a GPU class or this CPU.

    Args:
        config: a loaded `SFTConfig`.
        gpu: one of `TARGETS`, in any case; None means this machine (`this_machine`), or,
            with both `gpu_memory_gib` and `gpu_tflops`, a GPU outside the table.
        tokens_per_second: a measured training rate (real, non-pad tokens per second, as
            `reasonguard train` logs it: of the whole run, with this `num_processes` and
            `sharding`) that replaces the throughput model; it is not scaled.
        cpu_flops: the CPU matmul rate to use instead of timing one (tests).
        num_processes: GPUs (one training process each) of one node.
        sharding: one of `SHARDINGS` (with one process only `ddp`). Memory is then per GPU
            (`parameter_memory`); time is the one-GPU time / (N x `SCALING_EFFICIENCY`), the
            optimizer steps are the trainer's for N processes (`SFTConfig.rows_per_step`).
        gpu_memory_gib, gpu_tflops: the memory (GiB) and dense bf16 TFLOPS of the GPU: with
            `gpu`, they replace that class's numbers; without it, both describe any GPU.

    Returns:
        A JSON-ready dict (see `format_training_plan` for what it holds).

    Raises:
        UserError: an unknown `gpu`, a GPU description that is incomplete or not positive,
            a non-positive `tokens_per_second`, a process count or sharding that cannot run
            (see `check_parallel`), or what `plan_sft` and `model_architecture` raise.
    """
    from reasonguard.plan.dryrun import plan_sft
    from reasonguard.train.data import prepare

    target, device = plan_target(gpu, gpu_memory_gib, gpu_tflops)
    if tokens_per_second is not None and not tokens_per_second > 0:
        raise UserError(f"--tokens-per-second must be positive, got {tokens_per_second}")
    c = config
    on_gpu = device is not None
    check_parallel(c, target, num_processes, sharding)
    n = num_processes
    bf16 = on_gpu if c.bf16 == "auto" else bool(c.bf16)
    if on_gpu and not bf16 and tokens_per_second is None and math.isnan(device.fp32_tflops):
        raise UserError(
            "--gpu-tflops is the GPU's bf16 rate and this config trains in fp32 (bf16: false): "
            "give a measured --tokens-per-second, or plan it with bf16=true"
        )
    arch = model_architecture(c.model_name_or_path)
    trainable = trainable_params(arch, c)
    notes: list[str] = []

    captured: dict[str, Any] = {}

    def keep(cfg: Any, tokenizer: Any) -> Any:
        captured["data"] = prepare(cfg, tokenizer)
        return captured["data"]

    data_plan = plan_sft(c, prepare_fn=keep, world_size=n)
    notes.extend(data_plan["notes"])
    max_length = data_plan["max_length"] or 2048
    budget = c.pack_tokens or max_length
    per_sample = per_sample_attention(c.attn_implementation, c.packing, on_gpu)
    rows = row_tokens(c, captured.get("data"), data_plan, max_length)
    lengths, labels = rows["lengths"], rows["labels"]
    eval_tokens, eval_labels = rows["eval_tokens"], rows["eval_labels"]
    token_source, estimated = rows["source"], rows["estimated"]
    notes.extend(rows["notes"])
    profile = token_profile(lengths, labels, c, budget, per_sample, n)
    if data_plan["samples_per_step"] < n:
        notes.append(
            f"{n} processes share steps of {data_plan['samples_per_step']} rows: some have no "
            "row to train on (raise effective_batch_size, or use fewer processes)"
        )

    steps_epoch = data_plan["steps_per_epoch"]
    total_steps = data_plan["total_steps"]
    epochs_run = total_steps / steps_epoch  # fractional with max_steps
    label_share = profile["label_tokens"] / profile["real_tokens"]

    # Memory: both checkpointing choices; the config's choice decides which one is "the" run.
    memory = both_memories(arch, c, bf16, profile, on_gpu, sharding, n)
    capacity = device.memory_gib * GIB if device is not None else ram_bytes()
    setting = c.gradient_checkpointing
    if setting == "auto":
        # The training run's own rule (plan/decisions.py): on a GPU, on only when it must be;
        # train estimates a single process's replica (`run_memory`), so the plan does too.
        replica = memory
        if n > 1:
            one = token_profile(lengths, labels, c, budget, per_sample)
            replica = both_memories(arch, c, bf16, one, on_gpu)
            notes.append(
                "gradient_checkpointing auto is decided from one process's full-replica "
                "estimate, as train decides it"
            )
        decided = checkpointing_decision(
            setting, replica["without_checkpointing"]["total"], capacity if on_gpu else None
        )
        checkpointing = bool(decided.value)
        notes.append(f"gradient_checkpointing {decided.reason}")
    else:
        checkpointing = bool(setting)
    if c.finetuning == "qlora" and on_gpu and c.qlora_fallback_to_lora == "auto":
        import dataclasses

        lora = both_memories(arch, dataclasses.replace(c, finetuning="lora"), True, profile, True)
        key = "with_checkpointing" if setting is True else "without_checkpointing"
        decided = quantization_decision("qlora", "auto", lora[key]["total"], capacity, bf16)
        notes.append(
            f"qlora_fallback_to_lora {decided.reason}"
            + (" (this plan's numbers are for NF4)" if decided.value == "bf16" else "")
        )
    chosen = memory["with_checkpointing" if checkpointing else "without_checkpointing"]

    # FLOPs of the whole run (training steps plus the held-out evaluations), and its rate.
    n_evals = _eval_count(c, total_steps, steps_epoch) if data_plan["eval_rows"] else 0
    flops = run_flops(
        arch,
        c.finetuning,
        trainable,
        checkpointing,
        profile,
        epochs_run,
        n_evals,
        eval_tokens,
        eval_labels,
    )
    train_flops, eval_flops = flops["train_flops"], flops["eval_flops"]
    keys_per_token = flops.pop("attention_keys_per_token")
    run_tokens = epochs_run * profile["real_tokens"]
    rate, speedup = throughput(
        target,
        arch,
        bf16,
        c.finetuning,
        profile["max_micro_tokens"],
        train_flops,
        run_tokens,
        tokens_per_second,
        cpu_flops,
        sharding,
        n,
        device=device,
    )
    if rate["source"] == "model":  # the peak is a spec sheet's, the MFU an assumption
        rate.update(mfu_assumed=True, mfu_source=MFU_SOURCE)
    sustained = rate["sustained_flops"]
    train_seconds = train_flops / (sustained * speedup)
    eval_seconds = eval_flops / (sustained * speedup)

    # What stops the config on this machine matters only when the plan is for this CPU.
    problems = [] if on_gpu else list(data_plan["problems"])
    fits = chosen["total"] <= capacity
    plan = {
        "config": {
            "model": c.model_name_or_path,
            "finetuning": c.finetuning,
            "lora_r": c.lora_r,
            "dataset": c.dataset,
            "packing": c.packing,
            "pack_tokens": budget if c.packing else None,
            "per_device_train_batch_size": c.per_device_train_batch_size,
            "samples_per_step": data_plan["samples_per_step"],
            "gradient_checkpointing": setting,
            "bf16": bf16,
            "attn_implementation": c.attn_implementation,
        },
        "target": target,
        "device": device.label if device is not None else cpu_label(),
        "gpu": None
        if device is None
        else {
            "memory_gib": device.memory_gib,
            "bf16_tflops": device.bf16_tflops,
            "fp32_tflops": None if math.isnan(device.fp32_tflops) else device.fp32_tflops,
            "given": device is not GPUS.get(target),
        },
        "parallel": {
            "num_processes": n,
            "sharding": sharding,
            "strategy": STRATEGY_TEXT[sharding],
            "scaling_efficiency": rate["scaling_efficiency"],
            "scaling_efficiency_source": "assumed (not measured on GPUs)"
            if rate["scaling_efficiency"] is not None and n > 1
            else None,
        },
        "model": {
            "source": arch.source,
            "shape": arch.describe(),
            "total_params": arch.total_params,
            "body_params": arch.body_params,
            "trainable_params": trainable,
        },
        "data": {
            "estimated": estimated or bool(data_plan["estimated"]),
            "token_source": token_source,
            "train_rows": data_plan["train_rows"],
            "eval_rows": data_plan["eval_rows"],
            "max_length": max_length,
            "max_length_source": data_plan["max_length_source"],
            "tokens_per_epoch": profile["real_tokens"],
            "label_tokens_per_epoch": profile["label_tokens"],
            "label_share": label_share,
            "computed_tokens_per_epoch": profile["computed_tokens"],
            "padding_efficiency": profile["padding_efficiency"],
            "largest_micro_batch_tokens": profile["max_micro_tokens"],
            "mean_attention_keys_per_token": keys_per_token,
            "batching_simulated_steps": profile["simulated_steps"],
        },
        "steps": {
            "per_epoch": steps_epoch,
            "total": total_steps,
            "epochs": epochs_run,
            "evaluations": n_evals,
        },
        "memory": {
            "per_gpu_of": n,  # every figure is one GPU's (of n)
            "capacity_bytes": capacity,
            "checkpointing": checkpointing,
            "fits": fits,
            **memory,
        },
        "compute": flops,
        "throughput": rate,
        "time": {
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "total_seconds": train_seconds + eval_seconds,
            "hours": (train_seconds + eval_seconds) / 3600,
        },
        "notes": notes,
        "problems": problems,
    }
    if not fits:
        plan["memory"]["would_fit"] = smaller_alternatives(
            arch, c, bf16, profile, checkpointing, on_gpu, capacity, sharding, n
        )
        if on_gpu and c.finetuning != "qlora":
            shards = (lengths, labels, budget, per_sample)
            plan["memory"]["sharded_fit"] = sharded_fit(
                arch, c, bf16, shards, checkpointing, capacity, (sharding, n)
            )
    return plan


def _eval_count(c: Any, total_steps: int, steps_epoch: int) -> int:
    """Held-out evaluations of a run: by schedule, plus the final one at the end when the last
    step is not already an eval step (what `sft.run_sft` does)."""
    if c.eval_strategy == "no":
        return 0
    every = c.eval_steps if c.eval_strategy == "steps" else steps_epoch
    return total_steps // every + (1 if total_steps % every else 0)
