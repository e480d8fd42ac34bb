"""The memory model of a training run: bytes per GPU of weights, optimizer state and activations.

- `parameter_memory`: the parameters, their gradients and the AdamW state per fine-tuning mode
  (full, LoRA, QLoRA) and multi-GPU strategy (`SHARDINGS`: ddp, fsdp, zero2, zero3).
- `memory_estimate`: the peak of the largest micro-batch, by component: those plus the
  activations (with or without gradient checkpointing), the LM head and a runtime allowance.
- `run_memory`: both checkpointing choices of a run from its rows' token lengths, what
  `plan.decisions` decides `gradient_checkpointing: auto` and the QLoRA fallback with.

Accuracy: the model counts the big tensors, ignores small ones and has not been checked against
a measured peak, so treat it as a rough guide. The sharded figures follow what FSDP2 and
DeepSpeed allocate; no multi-GPU run of this code has been measured.

Example:
    >>> from reasonguard.train.config import SFTConfig
    >>> from reasonguard.plan.hardware import GIB, KNOWN_ARCHITECTURES
    >>> from reasonguard.plan.memory import memory_estimate
    >>> arch = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-3B"]
    >>> c = SFTConfig(model_name_or_path="meta-llama/Llama-3.2-3B", finetuning="lora")
    >>> peak = memory_estimate(arch, c, True, 2048, 1100, checkpointing=True, on_gpu=True)
    >>> round(peak["total"] / GIB, 1), round(peak["weights"] / GIB, 1)  # bf16 base: 2 B/param
    (10.5, 6.0)
"""

from __future__ import annotations

from typing import Any

from reasonguard.errors import UserError
from reasonguard.plan.batch_profile import per_sample_attention, token_profile
from reasonguard.plan.hardware import GIB, Architecture, model_architecture

# Runtime memory beyond the counted tensors: the CUDA context and cuBLAS workspaces plus the
# caching allocator's fragmentation (about 10% on top); on a CPU, Python, torch and the data.
CUDA_CONTEXT_GIB = 1.0
ALLOCATOR_SLACK = 0.10
CPU_RUNTIME_GIB = 1.5

STRATEGY_TEXT = {
    "ddp": "data parallel: a full replica of weights, gradients and AdamW state on every GPU",
    "zero2": "DeepSpeed ZeRO-2: the bf16 weights whole on every GPU; fp32 master weights, "
    "gradients and AdamW moments sharded",
    "fsdp": "PyTorch FSDP2: weights, gradients and AdamW state sharded; one block (and the "
    "embeddings / LM head) gathered at a time",
    "zero3": "DeepSpeed ZeRO-3: weights, gradients and AdamW state sharded; one block (and the "
    "embeddings / LM head) gathered at a time",
}
# DeepSpeed's default reduce_bucket_size (elements): train/zero.py sets none, so it applies.
DEEPSPEED_REDUCE_BUCKET = 500_000_000


def lora_modules(modules: list[str]) -> list[str]:
    """The adapted projections of `lora_target_modules` (`all-linear`: every Llama projection)."""
    from reasonguard.train.config import LLAMA_TARGET_MODULES

    return list(LLAMA_TARGET_MODULES) if "all-linear" in modules else list(modules)


def trainable_params(arch: Architecture, config: Any) -> int:
    """Parameters the run trains: all of them (full) or the LoRA adapters."""
    if config.finetuning == "full":
        return arch.total_params
    return arch.lora_params(config.lora_r, lora_modules(config.lora_target_modules))


def parameter_memory(
    arch: Architecture, config: Any, bf16: bool, sharding: str = "ddp", processes: int = 1
) -> dict[str, float]:
    """Bytes per GPU of the parameters, their gradients and the optimizer state, under a
    multi-GPU strategy (`SHARDINGS`) over `processes` GPUs.

    Returns `weights` (the model's parameters apart from a separate fp32 master copy),
    `trainable_and_optimizer` (the trainable parameters' fp32 master weight + fp32 gradient +
    AdamW's two moments, 16 bytes a parameter; 10 with an 8-bit optimizer) and
    `sharding_transient` (what a strategy holds unsharded for a moment). By strategy:

    - ddp: a full replica on every GPU, the single-GPU figures. Full fine-tuning: fp32 weights
      plus the bf16 copy autocast keeps; LoRA: the frozen base in the compute dtype; QLoRA:
      NF4. (Full fine-tuning thus counts its fp32 weight twice, here and in
      `trainable_and_optimizer`: 22 bytes a parameter where 18 would do; left as the single-GPU
      plan has always had it.) The gradient all-reduce bucket is left out: it is used after
      backward has freed the activations.
    - zero2 (DeepSpeed ZeRO-2): DeepSpeed casts the module to the compute dtype (bf16), and that
      module (frozen base and trainable weights alike) stays whole on every GPU: `weights`.
      The fp32 master copy, the fp32 gradient partition and the two moments are sharded:
      `trainable_and_optimizer` / N. Transient: DeepSpeed's gradient reduce bucket
      (`DEEPSPEED_REDUCE_BUCKET` elements in the compute dtype).
    - zero3 (DeepSpeed ZeRO-3): as zero2, but the compute-dtype module is sharded too
      (`weights` / N). Transient: the reduce bucket, plus the gathered parameters of one
      transformer block and of the root (embeddings, LM head, final norm), in the compute dtype.
    - fsdp (FSDP2, `train.sharding.FSDP`): everything / N. The sharded parameters are the
      weights the optimizer updates in place (no separate master copy), so `weights` holds the
      fp32 trainable shards (plus the frozen LoRA base's shards in its compute dtype) and
      `trainable_and_optimizer` the fp32 gradient and the moments only. Transient: one block's
      and the root's parameters gathered in the compute dtype (the root stays gathered through
      forward and backward; blocks reshard after forward) and their unsharded gradients before
      the reduce-scatter.

    Not counted: the prefetch of the next block's parameters, DeepSpeed's ZeRO-3 live-parameter
    cache beyond one block, the fp32 upcast of a block's gradient for the reduce, and NCCL's
    own buffers (the runtime allowance covers some of this). QLoRA cannot be sharded (the
    trainer refuses it under FSDP / DeepSpeed); it is planned as ddp only.
    """
    a = 2 if bf16 else 4  # bytes of the compute dtype
    n = processes
    mode = config.finetuning
    trainable = trainable_params(arch, config)
    state = 2 if config.optim in ("paged_adamw_8bit", "adamw_bnb_8bit") else 8
    optimizer = (4 + 4 + state) * trainable  # fp32 weight, fp32 gradient, moments
    if sharding == "ddp":
        if mode == "full":
            weights = (4 + (2 if bf16 else 0)) * arch.total_params
        elif mode == "lora":
            weights = a * arch.total_params
        else:
            weights = (0.5 + 1 / 64 + 4 / (64 * 256)) * arch.body_params
            weights += 4 * (arch.embedding_params + arch.small_params)
        return {
            "weights": float(weights),
            "trainable_and_optimizer": float(optimizer),
            "sharding_transient": 0.0,
        }
    if mode == "qlora":
        raise UserError(f"finetuning qlora cannot be sharded ({sharding}); plan it with ddp")
    frozen = arch.total_params if mode == "lora" else 0
    block = arch.body_params // arch.layers + 2 * arch.hidden  # projections and two norms
    root = arch.embedding_params + arch.hidden  # embeddings, LM head, final norm
    bucket = DEEPSPEED_REDUCE_BUCKET * a
    if sharding == "zero2":
        weights, transient = a * (frozen + trainable), bucket
    elif sharding == "zero3":
        weights, transient = a * (frozen + trainable) / n, bucket + a * (root + block)
    else:  # fsdp: the fp32 trainable shards are the weights themselves
        weights, transient = (a * frozen + 4 * trainable) / n, 2 * a * (root + block)
        optimizer -= 4 * trainable
    return {
        "weights": float(weights),
        "trainable_and_optimizer": float(optimizer / n),
        "sharding_transient": float(transient),
    }


def memory_estimate(
    arch: Architecture,
    config: Any,
    bf16: bool,
    micro_tokens: int,
    micro_label_tokens: int,
    checkpointing: bool,
    on_gpu: bool,
    sharding: str = "ddp",
    processes: int = 1,
) -> dict[str, float]:
    """Peak memory in bytes of the largest micro-batch, by component, on one GPU (of
    `processes` under `sharding`; see `parameter_memory` for what each strategy divides).

    Weights: full = fp32 master weights (+ a bf16 copy held by autocast); lora = the frozen base
    in bf16 (fp32 without bf16); qlora = NF4 projections at 0.5 byte/param plus their
    double-quantised constants (one 8-bit absmax per 64 weights, one fp32 per 256 of those: ~0.016
    byte/param), the embeddings and norms in fp32 (peft's `prepare_model_for_kbit_training`
    upcasts them). Trainable params: fp32 weight + gradient + AdamW's two moments (8-bit
    optimizers: 2 bytes of state). Activations per token and layer, what autograd keeps: two
    norm inputs in fp32 with their outputs, rotated q and k, v and the attention output, the four
    MLP intermediates (gate, SiLU, up, product), and per adapted projection the adapter's input
    copy and dropout mask; with checkpointing only each layer's input is kept, plus one layer's
    full set during its recomputation. Memory-efficient attention (no scores matrix) is assumed.
    The LM head keeps fp32 logits, log-softmax and their gradient at the label positions.
    Activations and the LM head are per GPU whatever the strategy: each GPU runs its own
    micro-batches (`micro_tokens` is one GPU's).
    """
    a = 2 if bf16 else 4  # bytes of an activation (matmul outputs under autocast)
    mode = config.finetuning
    params = parameter_memory(arch, config, bf16, sharding, processes)
    modules = lora_modules(config.lora_target_modules)

    h, i = arch.hidden, arch.intermediate
    per_layer = 2 * (4 * h + a * h) + a * (3 * arch.q_dim + 2 * arch.kv_dim) + a * 4 * i
    if mode != "full":
        shapes = arch.linear_shapes()
        adapter_in = sum(shapes[m][0] for m in modules if m in shapes)
        copy = (a + 1) if config.lora_dropout > 0 else (a if bf16 else 0)
        per_layer += adapter_in * copy + 4 * config.lora_r * len(modules)
    residual = 4 if (mode in ("full", "qlora") or not bf16) else 2
    if checkpointing:
        activations = micro_tokens * (arch.layers * residual * h + per_layer)
    else:
        activations = micro_tokens * arch.layers * per_layer
    activations += micro_tokens * 4 * h  # final norm and hidden states
    lm_head = 12 * micro_label_tokens * arch.vocab
    tensors = sum(params.values()) + activations + lm_head
    if on_gpu:
        runtime = CUDA_CONTEXT_GIB * GIB + ALLOCATOR_SLACK * tensors
    else:
        runtime = CPU_RUNTIME_GIB * GIB
    return {
        "weights": params["weights"],
        "trainable_and_optimizer": params["trainable_and_optimizer"],
        "sharding_transient": params["sharding_transient"],
        "activations": float(activations),
        "lm_head": float(lm_head),
        "runtime": float(runtime),
        "total": float(tensors + runtime),
    }


def both_memories(
    arch: Architecture,
    config: Any,
    bf16: bool,
    profile: dict[str, Any],
    on_gpu: bool,
    sharding: str = "ddp",
    processes: int = 1,
) -> dict[str, dict[str, float]]:
    """`memory_estimate` of the largest micro-batch of `profile`, without and with checkpointing."""
    return {
        key: memory_estimate(
            arch,
            config,
            bf16,
            profile["max_micro_tokens"],
            profile["max_micro_label_tokens"],
            ckpt,
            on_gpu,
            sharding,
            processes,
        )
        for key, ckpt in (("without_checkpointing", False), ("with_checkpointing", True))
    }


def run_memory(
    config: Any,
    lengths: list[int],
    label_counts: list[int],
    budget: int | None,
    bf16: bool,
    on_gpu: bool,
) -> dict[str, dict[str, float]]:
    """Memory estimates (`without_checkpointing` / `with_checkpointing`, by component, bytes) of a
    run whose training rows have these lengths: what `plan.decisions` decides `auto` with.

    Args:
        config: the run config (its model, fine-tuning mode, batching).
        lengths, label_counts: tokens and labelled tokens of each training row.
        budget: tokens of one packed micro-batch (None: the longest row).
        bf16, on_gpu: the precision and device of the run.

    Raises:
        UserError: the model's shapes cannot be found (`model_architecture`).
    """
    arch = model_architecture(config.model_name_or_path)
    per_sample = per_sample_attention(config.attn_implementation, config.packing, on_gpu)
    profile = token_profile(lengths, label_counts, config, budget or max(lengths), per_sample)
    return both_memories(arch, config, bf16, profile, on_gpu)
