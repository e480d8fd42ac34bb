"""`reasonguard plan`: tokens, steps, memory and wall time of an SFT config, before launching it.

The seed's hand-written timeline ("~1,000 steps/epoch at 5.4 min/step, ~270 hours"), computed:

1. **Tokens.** The data plan of `train sft --dry-run` (`dryrun.plan_sft`). When the rows and the
   tokenizer are local, the real token lengths of every training row are used; otherwise (a hub
   dataset with no hub access) the rows are the published split sizes and the lengths a seeded
   sample drawn to match the published token statistics (`PUBLISHED_TOKENS`), marked ESTIMATED.
   Micro-batches are formed by the trainer's own code (`step_plan`, `micro_batches`, `pack`) on
   the first steps of epoch 0, which gives the padding and the largest micro-batch.
2. **Memory** of the largest micro-batch (`memory_estimate`): weights by fine-tuning mode,
   trainable weights + gradients + AdamW state, activations with and without gradient
   checkpointing from the model's layer shapes, the LM head over label positions only (that is
   what `modeling.labelled_loss_sum` computes), and a runtime allowance. On several GPUs
   (`num_processes`, `sharding`: ddp, fsdp, zero2, zero3, as `train` takes them) the estimate
   is per GPU: each process batches its own share of every step's rows, and the parameters,
   gradients and optimizer state are replicated or sharded as `parameter_memory` describes.
3. **Time** from a FLOPs model (`flops_per_token`) divided by the sustained FLOPS of the target:
   peak dense TFLOPS of the GPU class x an assumed MFU per fine-tuning mode (`GPUS`), or, for
   `cpu`, a matmul timed on this machine x `CPU_EFFICIENCY`. `tokens_per_second` replaces the
   throughput model with a measured rate. N GPUs divide the time by N x an assumed scaling
   efficiency (`SCALING_EFFICIENCY`); the optimizer steps are the trainer's for N processes.

Accuracy: a planning estimate. The MFU values are assumptions from published anchors, not
measurements of this code on these GPUs (GPU speed is unmeasured, see BENCHMARKS.md); the memory
model counts the big tensors, ignores small ones and has not been checked against a measured
peak, so treat it as a rough guide. Nothing multi-GPU here is measured either: the sharded
memory follows what FSDP2 and DeepSpeed allocate, the scaling efficiencies are assumptions.

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.plan import format_training_plan, plan_training
    >>> plan = plan_training(load_config("configs/exp19-qlora-3b-instruct.yaml"), gpu="4090")  # doctest: +SKIP
    >>> print(format_training_plan(plan))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train.decisions import checkpointing_decision, quantization_decision

GIB = 1024**3

# --------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class GPUClass:
    """One GPU class of the throughput and memory model."""

    label: str
    bf16_tflops: float
    """Peak dense bf16 tensor-core TFLOPS (FP32 accumulate), spec sheet, no sparsity."""
    fp32_tflops: float
    """Peak FP32 (non-tensor) TFLOPS: the rate for `bf16: false` (PyTorch's matmuls do not use
    TF32 by default)."""
    memory_gib: float
    """Device memory (nominal; a little less is usable)."""
    mfu: dict[str, float]
    """Model FLOPs utilisation assumed per fine-tuning mode."""


# Peak numbers from NVIDIA's public spec sheets, dense (the sheets' headline figures are with 2:4
# sparsity, twice these):
#   H100 SXM5 80GB datasheet: BF16 tensor 1,979 TFLOPS sparse -> 989.4 dense; FP32 67; 80 GB.
#   A100 SXM4 80GB datasheet: BF16 tensor 624 sparse -> 312 dense; FP32 19.5; 80 GB.
#   L40S datasheet: BF16 tensor 733 sparse -> 362.05 dense; FP32 91.6; 48 GB.
#   RTX 4090 (Ada Lovelace architecture whitepaper, GeForce RTX 4090 column): BF16 tensor with
#     FP32 accumulate 165.2 dense (330.4 sparse; GeForce runs FP32-accumulate at half the
#     FP16-accumulate rate, and PyTorch accumulates in FP32); FP32 82.6; 24 GB.
#   RTX 4070 Ti SUPER (nvidia.com spec page): 706 "AI TOPS" = FP8 with sparsity, so bf16 dense with
#     FP32 accumulate = 706 / 8 = 88.2 (the same /8 rule gives 1,321 / 8 = 165.2 for the 4090);
#     FP32 44.1 (66 SMs x 128 lanes x 2 x 2.61 GHz); 16 GB.
#
# MFU assumptions (fraction of the bf16 peak a run sustains), per fine-tuning mode:
#   full 0.40, lora 0.35: published anchors in REFERENCE.md §9: torchtune Llama-3.2-3B on an A100
#   reaches 7,075 tok/s packed full fine-tuning (x 6 x 3.2B FLOPs = 44% of 312 TFLOPS) and
#   8,210 tok/s LoRA (x ~4 x 3.2B = 34%); NeMo Llama-3-8B LoRA on one H100 ~41%.
#   qlora 0.23 = 0.65 x the LoRA figure: bitsandbytes dequantises every NF4 weight before each
#   matmul, forward and backward, which commonly costs ~30-40% of LoRA's speed.
#   The same values are used for every class: no comparable measurements exist for L40S / GeForce
#   cards, and this project's own GPU benchmark (bench/train_throughput.py, GPU mode) has not run
#   yet. Replace them with measured values when it has.
_MFU = {"full": 0.40, "lora": 0.35, "qlora": 0.23}

GPUS: dict[str, GPUClass] = {
    "h100": GPUClass("NVIDIA H100 SXM 80GB", 989.4, 67.0, 80, dict(_MFU)),
    "a100": GPUClass("NVIDIA A100 SXM 80GB", 312.0, 19.5, 80, dict(_MFU)),
    "l40s": GPUClass("NVIDIA L40S 48GB", 362.05, 91.6, 48, dict(_MFU)),
    "4090": GPUClass("NVIDIA GeForce RTX 4090 24GB", 165.2, 82.6, 24, dict(_MFU)),
    "4070ti-super": GPUClass("NVIDIA GeForce RTX 4070 Ti SUPER 16GB", 88.2, 44.1, 16, dict(_MFU)),
}
TARGETS = (*GPUS, "cpu")

# CPU: training runs at this fraction of the FLOPS of one model-shaped matmul (tokens of the
# largest micro-batch x hidden x intermediate) measured on the machine (`measure_matmul_flops`).
# The rest goes to the many small ops (norms, rotary, SiLU, dropout, the rank-16 LoRA matmuls, the
# softmax of the LM head, the optimizer) and to how two threads share the work. Fit on this
# project's 2-core AMD EPYC VM, where the SmolLM2 matmul (1,604 x 576 x 1,536 fp32) measures
# ~181 GFLOPS (2 x 90.5), against two demo-config trainings (SmolLM2-135M LoRA, training_info.json
# `train_seconds_all_sessions`, evaluation included): 160.0 s for the 81 sample rows (27,587
# tokens; BENCHMARKS.md "Demo time", idle machine) = 110 GFLOPS sustained by this FLOPs model,
# i.e. 0.61; and 144.7 s for a `reasonguard demo` split (65 rows, 22,118 tokens) = 97 GFLOPS,
# i.e. 0.54. 0.58 predicts both within 10%.
CPU_EFFICIENCY = 0.58

# Runtime memory beyond the counted tensors: the CUDA context and cuBLAS workspaces plus the
# caching allocator's fragmentation (about 10% on top); on a CPU, Python, torch and the data.
CUDA_CONTEXT_GIB = 1.0
ALLOCATOR_SLACK = 0.10
CPU_RUNTIME_GIB = 1.5

# Several GPUs (`--num-processes N --sharding S`, as `train` takes them; train/sharding.py and
# train/zero.py implement the strategies).
SHARDINGS = ("ddp", "fsdp", "zero2", "zero3")
STRATEGY_TEXT = {
    "ddp": "data parallel: a full replica of weights, gradients and AdamW state on every GPU",
    "zero2": "DeepSpeed ZeRO-2: the bf16 weights whole on every GPU; fp32 master weights, "
    "gradients and AdamW moments sharded",
    "fsdp": "PyTorch FSDP2: weights, gradients and AdamW state sharded; one block (and the "
    "embeddings / LM head) gathered at a time",
    "zero3": "DeepSpeed ZeRO-3: weights, gradients and AdamW state sharded; one block (and the "
    "embeddings / LM head) gathered at a time",
}
# ASSUMED, not measured (no multi-GPU run of this code has been timed): the fraction of N x the
# one-GPU rate that N GPUs of one node keep after communication. ddp sums the gradients once
# per optimizer step and ZeRO-2 reduce-scatters them in every backward; FSDP and ZeRO-3 also
# all-gather every block's weights in every forward and backward, more traffic to hide behind
# the compute, hence the lower figure. Replace them with measured values when there are some.
SCALING_EFFICIENCY = {"ddp": 0.90, "zero2": 0.90, "fsdp": 0.85, "zero3": 0.85}
# DeepSpeed's default reduce_bucket_size (elements): train/zero.py sets none, so it applies.
DEEPSPEED_REDUCE_BUCKET = 500_000_000
# The process counts the "does not fit" advice tries with fsdp / zero3 (GPUs of one node).
SHARDED_PROCESS_COUNTS = (2, 4, 8)


# --------------------------------------------------------------------------------------------
# Model architecture


@dataclass(frozen=True)
class Architecture:
    """The shapes of a Llama-style decoder (the numbers of its config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one layer, by its Llama module name."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def body_params(self) -> int:
        """Weights of the decoder layers' matmuls (what the FLOPs of a token scale with)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied to it."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def small_params(self) -> int:
        """Norm weights (two per layer plus the final one)."""
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.body_params + self.embedding_params + self.small_params

    def lora_params(self, rank: int, modules: list[str]) -> int:
        """Adapter weights: r x (in + out) per adapted projection per layer."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * sum(shapes[m]) for m in modules if m in shapes)

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab:,}"
            + (", tied embeddings" if self.tied_embeddings else "")
        )


# Public config.json numbers of the models the shipped configs name, so a hub id plans offline.
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-3.2-1B": Architecture(16, 2048, 8192, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B": Architecture(28, 3072, 8192, 24, 8, 128, 128256, True),
    "meta-llama/Llama-3.1-8B": Architecture(32, 4096, 14336, 32, 8, 128, 128256, False),
    "HuggingFaceTB/SmolLM2-135M": Architecture(30, 576, 1536, 9, 3, 64, 49152, True),
}


def architecture_from_config(config: dict[str, Any], source: str = "") -> Architecture:
    """A Llama-style `Architecture` from a Hugging Face config.json mapping.

    Raises:
        UserError: a key the model needs is missing.
    """
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return Architecture(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            # transformers' LlamaConfig defaults to untied; SmolLM2 and Llama 3.2 tie them.
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            source=source,
        )
    except KeyError as exc:
        raise UserError(f"{source}: config.json has no {exc.args[0]!r}") from None


def model_architecture(name: str) -> Architecture:
    """The architecture of a model name: a local folder or offline alias (its config.json), the
    local hub cache, the built-in table of known models, or (when reachable) the hub.

    Raises:
        UserError: the model is none of these.
    """
    from reasonguard.models import ALIASES, resolve_model

    if name in ALIASES or Path(name).expanduser().is_dir():
        folder = Path(resolve_model(name)).expanduser()
        if (folder / "adapter_config.json").is_file():
            base = json.loads((folder / "adapter_config.json").read_text())
            return model_architecture(str(base.get("base_model_name_or_path")))
        path = folder / "config.json"
        if not path.is_file():
            raise UserError(f"model {name!r}: no config.json in {folder}")
        return architecture_from_config(json.loads(path.read_text()), f"{path}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return architecture_from_config(json.loads(Path(cached).read_text()), "local hub cache")
    base = name.removesuffix("-Instruct")
    for known, arch in KNOWN_ARCHITECTURES.items():
        if base.lower() in (known.lower(), known.split("/")[-1].lower()):
            return Architecture(**{**arch.__dict__, "source": f"built-in table ({known})"})
    from reasonguard.train.dryrun import hub_reachable

    if hub_reachable():
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, "config.json")
        except Exception as exc:  # gated, missing, network: one message for all
            raise UserError(
                f"model {name!r}: cannot read its config.json from the hub: {exc}"
            ) from None
        return architecture_from_config(json.loads(Path(path).read_text()), "hub")
    known = ", ".join(KNOWN_ARCHITECTURES)
    raise UserError(
        f"model {name!r}: no local config.json and no hub access; use a local model folder or "
        f"one of the built-in architectures ({known}, with or without -Instruct)"
    )


# --------------------------------------------------------------------------------------------
# Tokens: from the real rows, or a sample matched to published statistics

# GuardReasonerTrain with the Llama 3 tokenizer (REFERENCE.md §2): mean ~570 tokens a row,
# p50 ~520, p95 ~930. The label (output) share, 0.54, is measured on the nine real rows in
# shared/data/train_samples (chat format: 1,948 of 3,591 tokens are output).
PUBLISHED_TOKENS = {
    "yueliu1999/GuardReasonerTrain": {"mean": 570, "p50": 520, "p95": 930, "label_share": 0.54}
}
SIMULATED_STEPS = 200  # steps of epoch 0 cut into micro-batches to measure padding / sizes


class _Row:
    """A row as the batching code sees it: a length (and its label count)."""

    __slots__ = ("n", "labels")

    def __init__(self, n: int, labels: int) -> None:
        self.n, self.labels = n, labels

    def __len__(self) -> int:
        return self.n


def _sample_lengths(rows: int, stats: dict[str, float], max_length: int, seed: int = 0) -> Any:
    """A seeded log-normal sample of row lengths with the published mean and the p50-p95 spread
    (sigma = ln(p95 / p50) / 1.645), cut at max_length."""
    import numpy as np

    sigma = math.log(stats["p95"] / stats["p50"]) / 1.645
    mu = math.log(stats["mean"]) - sigma**2 / 2  # so the mean, not the median, is exact
    lengths = np.random.default_rng(seed).lognormal(mu, sigma, size=rows)
    return np.minimum(np.maximum(lengths.round(), 16), max_length).astype(int)


def _rank_shares(rows: list[_Row], world_size: int) -> list[list[_Row]]:
    """Each rank's share of one step's rows, as `Processes.shard` cuts it: sorted longest first
    (ties in input order), every world_size-th row from the rank's position."""
    if world_size == 1:
        return [rows]
    ordered = sorted(rows, key=len, reverse=True)
    return [ordered[rank::world_size] for rank in range(world_size)]


def token_profile(
    lengths: Any,
    label_counts: Any,
    config: Any,
    budget: int,
    flash_varlen: bool,
    world_size: int = 1,
) -> dict[str, Any]:
    """Per-epoch token counts and micro-batch sizes of rows with these lengths, batched by the
    trainer's code on the first `SIMULATED_STEPS` steps of epoch 0 (scaled to the epoch).

    Args:
        lengths, label_counts: per training row, tokens and labelled tokens (after truncation).
        config: the run config (batch sizes, packing, seed).
        budget: tokens of one packed micro-batch.
        flash_varlen: attention runs per sample (flash-attention varlen); otherwise the kernel
            gets an explicit mask and computes the whole square of each (padded or packed) row.
        world_size: training processes; each step's rows (`rows_per_step(world_size)`) are
            shared out among them and each cuts its share into its own micro-batches. Token
            counts are summed over the processes; the largest micro-batch is any one's.

    Returns:
        `real_tokens`, `label_tokens`, `computed_tokens` (with padding) and `attention_keys`
        (sum over computed tokens of the keys each one is scored against) per epoch, and the
        largest micro-batch in tokens (`max_micro_tokens`) with its labels.
    """
    from reasonguard.train.data import micro_batches, pack, step_plan

    rows = [_Row(int(n), int(k)) for n, k in zip(lengths, label_counts, strict=True)]
    plan = step_plan(len(rows), config.rows_per_step(world_size), config.seed, 0)
    seen = plan[:SIMULATED_STEPS]
    computed = attention = seen_tokens = 0
    largest: list[_Row] = []
    largest_tokens = 0
    for indices in seen:
        step_rows = [rows[i] for i in indices]
        seen_tokens += sum(r.n for r in step_rows)
        groups = []
        for share in _rank_shares(step_rows, world_size):
            if config.packing:
                groups += pack(share, budget)
            else:
                groups += micro_batches(share, config.per_device_train_batch_size)
        for group in groups:
            if config.packing:
                width = sum(r.n for r in group)
                tokens, square = width, width * width
            else:
                width = max(r.n for r in group)
                tokens, square = width * len(group), width * width * len(group)
            computed += tokens
            if flash_varlen:
                attention += sum(r.n * (r.n + 1) // 2 for r in group)
            else:
                attention += square
            if tokens > largest_tokens:
                largest, largest_tokens = group, tokens
    real = int(sum(lengths))
    scale = real / seen_tokens
    labels_largest = sum(r.labels for r in largest)
    return {
        "real_tokens": real,
        "label_tokens": int(sum(label_counts)),
        "computed_tokens": round(computed * scale),
        "attention_keys": round(attention * scale),
        "padding_efficiency": seen_tokens / computed,
        "max_micro_tokens": largest_tokens,
        "max_micro_label_tokens": labels_largest,
        "simulated_steps": len(seen),
    }


# --------------------------------------------------------------------------------------------
# FLOPs and memory


def flops_per_token(
    arch: Architecture,
    finetuning: str,
    trainable_lora: int,
    checkpointing: bool,
    attention_keys_per_token: float,
) -> dict[str, float]:
    """Training FLOPs of one computed token (without the LM head, see `lm_head_flops`).

    `trainable_lora` is the adapter parameter count (ignored for full fine-tuning).

    - Projections: a forward pass is 2 x body params; full fine-tuning adds 4 x (input and
      weight gradients), a frozen base adds 2 x (input gradients only), and the adapters cost
      6 x their own params.
    - Gradient checkpointing recomputes the forward pass once more: + 2 x params (+33% of full
      fine-tuning's 6x, +50% of frozen-base LoRA's 4x).
    - Attention scores and mixing: 4 x q_dim FLOPs per key per layer forward, x3 with the
      backward, x4 with recomputation.
    """
    body = arch.body_params
    if finetuning == "full":
        projections = 6.0 * body
        adapters = 0.0
        trainable_lora = 0
    else:
        projections = 4.0 * body
        adapters = 6.0 * trainable_lora
    recompute = 2.0 * (body + trainable_lora) if checkpointing else 0.0
    attention = 4.0 * arch.q_dim * arch.layers * attention_keys_per_token
    attention *= 4.0 if checkpointing else 3.0
    return {
        "projections": projections,
        "adapters": adapters,
        "recompute": recompute,
        "attention": attention,
    }


def lm_head_flops(arch: Architecture, finetuning: str) -> float:
    """FLOPs of the LM head per labelled token: forward, input gradient, and the weight gradient
    when the head trains (full fine-tuning). It runs only at label positions."""
    return (6.0 if finetuning == "full" else 4.0) * arch.hidden * arch.vocab


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
    modules = _lora_modules(config.lora_target_modules)
    trainable = arch.total_params if mode == "full" else arch.lora_params(config.lora_r, modules)
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
    modules = _lora_modules(config.lora_target_modules)

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


def _both_memories(
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
    run whose training rows have these lengths: what `train.decisions` decides `auto` with.

    Args:
        config: the run config (its model, fine-tuning mode, batching).
        lengths, label_counts: tokens and labelled tokens of each training row.
        budget: tokens of one packed micro-batch (None: the longest row).
        bf16, on_gpu: the precision and device of the run.

    Raises:
        UserError: the model's shapes cannot be found (`model_architecture`).
    """
    arch = model_architecture(config.model_name_or_path)
    flash = config.attn_implementation == "flash_attention_2" and on_gpu
    profile = token_profile(lengths, label_counts, config, budget or max(lengths), flash)
    return _both_memories(arch, config, bf16, profile, on_gpu)


def _lora_modules(modules: list[str]) -> list[str]:
    from reasonguard.train.config import LLAMA_TARGET_MODULES

    return list(LLAMA_TARGET_MODULES) if "all-linear" in modules else list(modules)


# --------------------------------------------------------------------------------------------
# CPU calibration


@lru_cache(maxsize=8)
def measure_matmul_flops(
    m: int, k: int, n: int, dtype: str = "float32", seconds: float = 0.5
) -> float:
    """FLOPS this CPU gives an (m x k) @ (k x n) matmul with torch's thread count (as training).

    Timed on ONE thread against the CPU time that thread used (`time.process_time`), then
    multiplied by the thread count: when other processes share the cores, wall-clock timing
    measures the share they leave us, while CPU-time timing still measures what a core does,
    and the plan is for a run that has the machine to itself. How well the threads scale
    together is folded into `CPU_EFFICIENCY`. Cached per process.
    """
    import torch

    dt = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(dt)
    w = torch.randn(k, n, generator=generator).to(dt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x @ w  # warm-up
        count, start = 0, time.process_time()
        while (used := time.process_time() - start) < seconds or count < 2:
            x @ w
            count += 1
    finally:
        torch.set_num_threads(threads)
    return 2.0 * m * k * n * count / used * threads


def this_machine() -> str:
    """The target for `--gpu` left out: the local GPU's class, or `cpu` without CUDA.

    Raises:
        UserError: a CUDA GPU that is none of the known classes.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower().replace(" ", "")
    for key in ("h100", "a100", "l40s", "4090", "4070tisuper"):
        if key in name:
            return "4070ti-super" if key == "4070tisuper" else key
    raise UserError(
        f"this GPU ({torch.cuda.get_device_name(0)}) is not in the plan's table; pass "
        f"--gpu {'|'.join(TARGETS)} (the closest class) or --tokens-per-second"
    )


# --------------------------------------------------------------------------------------------
# The plan


def plan_training(
    config: Any,
    gpu: str | None = None,
    tokens_per_second: float | None = None,
    cpu_flops: float | None = None,
    num_processes: int = 1,
    sharding: str = "ddp",
) -> dict[str, Any]:
    """Tokens, steps, memory and wall time of an SFT config on a GPU class or this CPU.

    Args:
        config: a loaded `SFTConfig`.
        gpu: one of `TARGETS`; None means this machine (`this_machine`).
        tokens_per_second: a measured training rate (real, non-pad tokens per second, as
            `reasonguard train` logs it: of the whole run, with this `num_processes` and
            `sharding`) that replaces the throughput model; it is not scaled.
        cpu_flops: the CPU matmul rate to use instead of timing one (tests).
        num_processes: GPUs (one training process each) of one node.
        sharding: one of `SHARDINGS` (with one process only `ddp`). Memory is then per GPU
            (`parameter_memory`); time is the one-GPU time / (N x `SCALING_EFFICIENCY`), the
            optimizer steps are the trainer's for N processes (`SFTConfig.rows_per_step`).

    Returns:
        A JSON-ready dict (see `format_training_plan` for what it holds).

    Raises:
        UserError: an unknown `gpu`, a non-positive `tokens_per_second`, a process count or
            sharding that cannot run (see `check_parallel`), or what `plan_sft` and
            `model_architecture` raise.
    """
    from reasonguard.train.data import PUBLISHED_P95_TOKENS, prepare
    from reasonguard.train.dryrun import plan_sft

    target = gpu if gpu is not None else this_machine()
    if target not in TARGETS:
        raise UserError(f"--gpu {target!r} is not known; choose one of: {', '.join(TARGETS)}")
    if tokens_per_second is not None and not tokens_per_second > 0:
        raise UserError(f"--tokens-per-second must be positive, got {tokens_per_second}")
    c = config
    on_gpu = target != "cpu"
    check_parallel(c, target, num_processes, sharding)
    n = num_processes
    bf16 = on_gpu if c.bf16 == "auto" else bool(c.bf16)
    arch = model_architecture(c.model_name_or_path)
    modules = _lora_modules(c.lora_target_modules)
    trainable = arch.total_params if c.finetuning == "full" else arch.lora_params(c.lora_r, modules)
    notes: list[str] = []

    captured: dict[str, Any] = {}

    def keep(cfg: Any, tokenizer: Any) -> Any:
        captured["data"] = prepare(cfg, tokenizer)
        return captured["data"]

    data_plan = plan_sft(c, prepare_fn=keep, world_size=n)
    notes.extend(data_plan["notes"])
    max_length = data_plan["max_length"] or 2048
    budget = c.pack_tokens or max_length
    flash = c.attn_implementation == "flash_attention_2" and on_gpu
    data = captured.get("data")
    if data is not None:
        lengths = [len(e) for e in data.train]
        labels = [e.num_labels for e in data.train]
        eval_tokens = sum(len(e) for e in data.eval)
        eval_labels = sum(e.num_labels for e in data.eval)
        token_source = "measured: every training row, tokenized"
        estimated = False
    else:
        stats = PUBLISHED_TOKENS.get(c.dataset)
        if stats is None:
            raise UserError(
                f"cannot plan tokens: the rows of {c.dataset!r} were counted but not tokenized "
                "(tokenizer not reachable) and no published token statistics are known for it"
            )
        lengths = _sample_lengths(data_plan["train_rows"], stats, max_length, seed=c.seed)
        labels = [round(n * stats["label_share"]) for n in lengths]
        eval_tokens = round(data_plan["eval_rows"] * stats["mean"])
        eval_labels = round(eval_tokens * stats["label_share"])
        token_source = (
            f"ESTIMATED: a seeded log-normal sample of row lengths with the published mean "
            f"{stats['mean']}, p50 {stats['p50']}, p95 {stats['p95']} (Llama 3 tokenizer), "
            f"{stats['label_share']:.0%} of tokens labelled"
        )
        estimated = True
        if c.dataset in PUBLISHED_P95_TOKENS and c.max_length == "auto":
            notes.append("max_length auto decided from the published p95 (ESTIMATED)")
    profile = token_profile(lengths, labels, c, budget, flash, n)
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
    memory = _both_memories(arch, c, bf16, profile, on_gpu, sharding, n)
    capacity = GPUS[target].memory_gib * GIB if on_gpu else _ram_bytes()
    setting = c.gradient_checkpointing
    if setting == "auto":
        # The training run's own rule (train/decisions.py): on a GPU, on only when it must be;
        # train estimates a single process's replica (`run_memory`), so the plan does too.
        replica = memory
        if n > 1:
            one = token_profile(lengths, labels, c, budget, flash)
            replica = _both_memories(arch, c, bf16, one, on_gpu)
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

        lora = _both_memories(arch, dataclasses.replace(c, finetuning="lora"), True, profile, True)
        key = "with_checkpointing" if setting is True else "without_checkpointing"
        decided = quantization_decision("qlora", "auto", lora[key]["total"], capacity, bf16)
        notes.append(
            f"qlora_fallback_to_lora {decided.reason}"
            + (" (this plan's numbers are for NF4)" if decided.value == "bf16" else "")
        )
    chosen = memory["with_checkpointing" if checkpointing else "without_checkpointing"]

    # FLOPs of the whole run (training steps plus the held-out evaluations).
    keys_per_token = profile["attention_keys"] / profile["computed_tokens"]
    parts = flops_per_token(arch, c.finetuning, trainable, checkpointing, keys_per_token)
    per_computed = sum(parts.values())
    head = lm_head_flops(arch, c.finetuning)
    train_flops = epochs_run * (
        profile["computed_tokens"] * per_computed + profile["label_tokens"] * head
    )
    forward = 2.0 * (arch.body_params + trainable * (c.finetuning != "full"))
    forward += 4.0 * arch.q_dim * arch.layers * keys_per_token
    n_evals = _eval_count(c, total_steps, steps_epoch) if data_plan["eval_rows"] else 0
    eval_flops = n_evals * (eval_tokens * forward + eval_labels * 2.0 * arch.hidden * arch.vocab)
    run_tokens = epochs_run * profile["real_tokens"]

    if tokens_per_second is not None:
        sustained = tokens_per_second * train_flops / run_tokens
        throughput = {"source": "given", "tokens_per_second": tokens_per_second}
    elif on_gpu:
        cls = GPUS[target]
        peak = (cls.bf16_tflops if bf16 else cls.fp32_tflops) * 1e12
        mfu = cls.mfu[c.finetuning]
        sustained = peak * mfu
        throughput = {
            "source": "model",
            "peak_flops": peak,
            "precision": "bf16" if bf16 else "fp32",
            "mfu": mfu,
        }
    else:
        m = min(profile["max_micro_tokens"], 2048)
        dtype = "bfloat16" if bf16 else "float32"
        measured = cpu_flops or measure_matmul_flops(m, arch.hidden, arch.intermediate, dtype)
        sustained = measured * CPU_EFFICIENCY
        throughput = {
            "source": "cpu-calibrated",
            "matmul_flops": measured,
            "matmul_shape": [m, arch.hidden, arch.intermediate],
            "matmul_dtype": dtype,
            "threads": _torch_threads(),
            "efficiency": CPU_EFFICIENCY,
        }
    # N GPUs share every step's rows (and the evaluations'): the run's tokens are the same,
    # each GPU computes 1/N of them, at the assumed scaling efficiency. A given rate is
    # measured on the whole run, so it is not scaled.
    efficiency = None if throughput["source"] == "given" else scaling_efficiency(sharding, n)
    speedup = 1.0 if efficiency is None else n * efficiency
    throughput["sustained_flops"] = sustained
    throughput.setdefault("tokens_per_second", run_tokens * sustained * speedup / train_flops)
    throughput.update(processes=n, scaling_efficiency=efficiency)
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
        "device": GPUS[target].label if on_gpu else _cpu_label(),
        "parallel": {
            "num_processes": n,
            "sharding": sharding,
            "strategy": STRATEGY_TEXT[sharding],
            "scaling_efficiency": efficiency,
            "scaling_efficiency_source": "assumed (not measured on GPUs)"
            if efficiency is not None and n > 1
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
        "compute": {
            "flops_per_computed_token": parts,
            "lm_head_flops_per_label_token": head,
            "train_flops": train_flops,
            "eval_flops": eval_flops,
        },
        "throughput": throughput,
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
        plan["memory"]["would_fit"] = _alternatives(
            arch, c, bf16, profile, checkpointing, on_gpu, capacity, sharding, n
        )
        if on_gpu and c.finetuning != "qlora":
            shards = (lengths, labels, budget, flash)
            plan["memory"]["sharded_fit"] = _sharded_fit(
                arch, c, bf16, shards, checkpointing, capacity, (sharding, n)
            )
    return plan


def check_parallel(config: Any, target: str, num_processes: int, sharding: str) -> None:
    """Refuse a process count / sharding the trainer would refuse, or the plan cannot model.

    Raises:
        UserError: N < 1, an unknown sharding, a sharding other than ddp on one process,
            several processes on the CPU, or QLoRA sharded (train refuses it).
    """
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    if sharding not in SHARDINGS:
        raise UserError(
            f"--sharding {sharding!r} is not known; choose one of: {', '.join(SHARDINGS)}"
        )
    if sharding != "ddp" and num_processes == 1:
        raise UserError(
            f"--sharding {sharding} shards over several GPUs: give --num-processes N (N >= 2)"
        )
    if num_processes > 1 and target == "cpu":
        raise UserError(
            "--num-processes N > 1 plans N GPUs; CPU processes share one machine's cores and "
            "memory, which the plan does not model: choose a --gpu class"
        )
    if sharding != "ddp" and config.finetuning == "qlora":
        raise UserError(
            f"finetuning qlora cannot be sharded with {sharding} (train refuses it: its 4-bit "
            "weights are not shardable); plan it with --sharding ddp, or use finetuning=lora"
        )


def scaling_efficiency(sharding: str, processes: int) -> float:
    """The assumed fraction of N x the one-GPU rate kept on N GPUs (1 for one GPU)."""
    return 1.0 if processes == 1 else SCALING_EFFICIENCY[sharding]


def _sharded_fit(
    arch: Architecture,
    c: Any,
    bf16: bool,
    rows: tuple[Any, Any, int, bool],
    checkpointing: bool,
    capacity: float,
    current: tuple[str, int],
) -> dict[str, Any]:
    """The smallest process count of `SHARDED_PROCESS_COUNTS` at which fsdp or zero3 fits,
    with the per-GPU estimate of each that does (the current strategy and count left out).

    `rows` are the training rows' (lengths, label counts, pack budget, flash varlen): each count
    shares every step's rows out anew, which sets its largest micro-batch. Checkpointing is the
    run's: train decides `auto` from one process's full replica, the same for every count.

    Returns:
        {"num_processes": N or None, "options": [{"sharding", "total_bytes"}...],
        "tried": the counts tried}.
    """
    lengths, labels, budget, flash = rows
    for n in SHARDED_PROCESS_COUNTS:
        profile = token_profile(lengths, labels, c, budget, flash, n)
        options = []
        for sharding in ("fsdp", "zero3"):
            if (sharding, n) == current:
                continue
            total = memory_estimate(
                arch,
                c,
                bf16,
                profile["max_micro_tokens"],
                profile["max_micro_label_tokens"],
                checkpointing,
                True,
                sharding,
                n,
            )["total"]
            if total <= capacity:
                options.append({"sharding": sharding, "total_bytes": total})
        if options:
            return {"num_processes": n, "options": options, "tried": list(SHARDED_PROCESS_COUNTS)}
    return {"num_processes": None, "options": [], "tried": list(SHARDED_PROCESS_COUNTS)}


def _eval_count(c: Any, total_steps: int, steps_epoch: int) -> int:
    """Held-out evaluations of a run: by schedule, plus the final one at the end when the last
    step is not already an eval step (what `sft.run_sft` does)."""
    if c.eval_strategy == "no":
        return 0
    every = c.eval_steps if c.eval_strategy == "steps" else steps_epoch
    return total_steps // every + (1 if total_steps % every else 0)


def _alternatives(
    arch: Architecture,
    c: Any,
    bf16: bool,
    profile: dict[str, Any],
    checkpointing: bool,
    on_gpu: bool,
    capacity: float,
    sharding: str = "ddp",
    processes: int = 1,
    limit: int = 4,
) -> list[dict[str, Any]]:
    """Override sets whose memory estimate fits: each a combination of checkpointing on, a
    smaller micro-batch, and a frozen (LoRA) or 4-bit (QLoRA) base, fewest changes first, then
    the cheapest in speed (checkpointing, micro-batch, LoRA, QLoRA); a set that contains a
    fitting smaller set is left out. Estimated per GPU under `sharding` over `processes` (QLoRA
    only with ddp: it cannot be sharded)."""
    import dataclasses
    import itertools

    share = profile["max_micro_label_tokens"] / max(1, profile["max_micro_tokens"])
    tokens = profile["max_micro_tokens"]
    ckpt_choices: list[list[str]] = [[]] + (
        [] if checkpointing else [["gradient_checkpointing=true"]]
    )
    # A smaller micro-batch: a smaller token budget (packed), or fewer rows (padded) with more
    # accumulation so the rows per optimizer step stay the same.
    base = (c.pack_tokens or tokens) if c.packing else c.per_device_train_batch_size
    sizes, size = [base], base
    while size > (256 if c.packing else 1):
        size //= 2
        if c.packing or c.samples_per_step % size == 0:
            sizes.append(size)

    def resize(size: int) -> list[str]:
        if c.packing:
            return [f"pack_tokens={size}"]
        if c.effective_batch_size is not None:  # the accumulation is derived from it
            return [f"per_device_train_batch_size={size}"]
        accumulation = c.samples_per_step // size
        return [
            f"per_device_train_batch_size={size}",
            f"gradient_accumulation_steps={accumulation}",
        ]

    modes = [c.finetuning] + [
        m
        for m in ("lora", "qlora")
        if m != c.finetuning
        and c.finetuning != "qlora"
        and (m == "lora" or (on_gpu and sharding == "ddp"))
    ]
    # Each axis is ordered from mild to drastic; a candidate at least as drastic as a fitting
    # one on every axis adds nothing.
    candidates = []
    for (mi, mode), (si, size), ckpt in itertools.product(
        enumerate(modes), enumerate(sizes), ckpt_choices
    ):
        overrides = list(ckpt)
        overrides += resize(size) if si else []
        overrides += [f"finetuning={mode}"] if mi else []
        rank = (len(ckpt), si, mi)
        changes = len(ckpt) + (si > 0) + (mi > 0)
        candidates.append(((changes, mi, si, len(ckpt)), rank, overrides, mode, size))
    fitting: list[dict[str, Any]] = []
    ranks: list[tuple[int, int, int]] = []
    for _, rank, overrides, mode, size in sorted(candidates, key=lambda x: x[0]):
        if not overrides or any(all(f <= r for f, r in zip(fr, rank, strict=True)) for fr in ranks):
            continue
        cfg = dataclasses.replace(c, finetuning=mode)
        micro = max(1, tokens * size // base)
        ckpt = checkpointing or rank[0] > 0
        total = memory_estimate(
            arch, cfg, bf16, micro, round(micro * share), ckpt, on_gpu, sharding, processes
        )
        if total["total"] <= capacity:
            fitting.append({"overrides": overrides, "total_bytes": total["total"]})
            ranks.append(rank)
    return fitting[:limit]


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return float("inf")


def _cpu_label() -> str:
    return f"this machine's CPU ({os.cpu_count()} cores, {_ram_bytes() / GIB:.0f} GiB RAM)"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Text


def hours_text(seconds: float) -> str:
    """`about N hours` with a precision that suits the size (minutes when under an hour).

    Examples:
        >>> hours_text(972_000), hours_text(9_000), hours_text(150)
        ('about 270 hours', 'about 2.5 hours', 'about 0.04 hours (2.5 minutes)')
    """
    hours = seconds / 3600
    if hours >= 10:
        return f"about {hours:.0f} hours"
    if hours >= 1:
        return f"about {hours:.1f} hours"
    return f"about {hours:.2f} hours ({seconds / 60:.1f} minutes)"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _count(n: float) -> str:
    """A parameter or FLOP count with a K/M/B suffix (`3.21B`)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


# What each strategy does to a memory component: held whole on every GPU, or 1/N of it.
_WHOLE_WEIGHTS = ("ddp", "zero2")
_TRANSIENT_LABEL = {
    "zero2": "reduce bucket",
    "zero3": "gathered + reduce bucket",
    "fsdp": "gathered",
}


def _memory_line(label: str, part: dict[str, float], parallel: dict[str, Any], chosen: str) -> str:
    """One `memory ... checkpointing` line; with several GPUs, per GPU and marked whole / 1/N."""
    n, sharding = parallel["num_processes"], parallel["sharding"]
    if n == 1:
        return (
            f"memory {label:<7} checkpointing: {_gib(part['total'])} = weights "
            f"{_gib(part['weights'])} + trainable/AdamW {_gib(part['trainable_and_optimizer'])} "
            f"+ activations {_gib(part['activations'])} + LM head {_gib(part['lm_head'])} + "
            f"runtime {_gib(part['runtime'])}{chosen}"
        )
    share = f" (1/{n})"
    weights = " (whole)" if sharding in _WHOLE_WEIGHTS else share
    optimizer = " (whole)" if sharding == "ddp" else share
    transient = (
        f" + {_TRANSIENT_LABEL[sharding]} {_gib(part['sharding_transient'])}"
        if sharding in _TRANSIENT_LABEL
        else ""
    )
    return (
        f"memory {label:<7} checkpointing: {_gib(part['total'])} per GPU = weights "
        f"{_gib(part['weights'])}{weights} + trainable/AdamW "
        f"{_gib(part['trainable_and_optimizer'])}{optimizer}{transient} + activations "
        f"{_gib(part['activations'])} + LM head {_gib(part['lm_head'])} + runtime "
        f"{_gib(part['runtime'])}{chosen}"
    )


def _sharded_advice(sharded: dict[str, Any] | None) -> str:
    """The fsdp / zero3 part of the does-not-fit warning ('' when not tried)."""
    if sharded is None:
        return ""
    counts = ", ".join(str(n) for n in sharded["tried"])
    if sharded["num_processes"] is None:
        return f"; as it is, none of --num-processes {counts} with --sharding fsdp or zero3 fits"
    options = " or ".join(
        f"--sharding {o['sharding']} ({_gib(o['total_bytes'])} per GPU)" for o in sharded["options"]
    )
    return f"; as it is, it fits with --num-processes {sharded['num_processes']} {options}"


def format_training_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines `reasonguard plan` prints."""
    c, d, m, s = plan["config"], plan["data"], plan["model"], plan["steps"]
    mem, t, tp, comp = plan["memory"], plan["time"], plan["throughput"], plan["compute"]
    method = c["finetuning"] + ("" if c["finetuning"] == "full" else f" r={c['lora_r']}")
    batching = (
        f"packed into {c['pack_tokens']}-token micro-batches"
        if c["packing"]
        else f"padded micro-batches of {c['per_device_train_batch_size']} rows"
    )
    est = " (ESTIMATED)" if d["estimated"] else ""
    par = plan["parallel"]
    n = par["num_processes"]
    device = plan["device"] if n == 1 else f"{n} x {plan['device']} ({par['sharding']})"
    shared = "" if n == 1 else f" shared by {n} GPUs"
    lines = [f"plan           {c['model']} [{method}] on {device}"]
    if n > 1:
        lines.append(
            f"gpus           {n} processes, one per GPU; {par['sharding']} = {par['strategy']}; "
            "memory is per GPU"
        )
    lines += [
        f"model          {_count(m['total_params'])} params ({m['shape']}; {m['source']}); "
        f"trainable {_count(m['trainable_params'])}",
        f"tokens         {d['tokens_per_epoch']:,} per epoch{est} in {d['train_rows']:,} rows, "
        f"{d['label_share']:.0%} labelled; max length {d['max_length']}",
        f"               {d['token_source']}",
        f"batching       {c['samples_per_step']} rows per step{shared}, {batching}: "
        f"{d['padding_efficiency']:.3f} real/computed tokens, largest micro-batch "
        f"{d['largest_micro_batch_tokens']:,} tokens",
        f"steps          {s['per_epoch']:,} per epoch, {s['total']:,} in all "
        f"({s['epochs']:g} epoch{'' if s['epochs'] == 1 else 's'}); {s['evaluations']} held-out "
        f"evaluation{'' if s['evaluations'] == 1 else 's'} of "
        f"{d['eval_rows']:,} rows",
    ]
    for key, label in (("without_checkpointing", "without"), ("with_checkpointing", "with")):
        part = mem[key]
        chosen = "  <- this run" if mem["checkpointing"] == (key == "with_checkpointing") else ""
        lines.append(_memory_line(label, part, par, chosen))
    parts = comp["flops_per_computed_token"]
    lines.append(
        f"compute        {_count(sum(parts.values()))} FLOPs per computed token (projections "
        f"{_count(parts['projections'])}, adapters {_count(parts['adapters'])}, recompute "
        f"{_count(parts['recompute'])}, attention {_count(parts['attention'])}) + LM head "
        f"{_count(comp['lm_head_flops_per_label_token'])} per label token: "
        f"{comp['train_flops']:.3g} FLOPs training, {comp['eval_flops']:.3g} eval"
    )
    if tp["source"] == "given":
        rate = f"given: {tp['tokens_per_second']:,.0f} tokens/s"
        rate += "" if n == 1 else f" (the whole run's over {n} GPUs; not scaled)"
    elif tp["source"] == "model" and n > 1:
        eff = tp["scaling_efficiency"]
        rate = (
            f"{tp['peak_flops'] / 1e12:,.1f} TFLOPS {tp['precision']} peak x MFU {tp['mfu']:.2f}"
            f" = {tp['sustained_flops'] / 1e12:,.1f} TFLOPS -> "
            f"{tp['tokens_per_second'] / (n * eff):,.0f} tokens/s per GPU; x {n} GPUs x "
            f"{eff:.2f} {par['sharding']} scaling efficiency (ASSUMED, not measured) -> "
            f"{tp['tokens_per_second']:,.0f} tokens/s"
        )
    elif tp["source"] == "model":
        rate = (
            f"{tp['peak_flops'] / 1e12:,.1f} TFLOPS {tp['precision']} peak x MFU {tp['mfu']:.2f}"
            f" = {tp['sustained_flops'] / 1e12:,.1f} TFLOPS -> "
            f"{tp['tokens_per_second']:,.0f} tokens/s"
        )
    else:
        shape = "x".join(str(n) for n in tp["matmul_shape"])
        rate = (
            f"{tp['matmul_dtype']} {shape} matmul measured at {tp['matmul_flops'] / 1e9:,.1f} "
            f"GFLOPS (one thread per CPU second x {tp['threads']} threads) x efficiency "
            f"{tp['efficiency']:.2f} = "
            f"{tp['sustained_flops'] / 1e9:,.1f} GFLOPS -> {tp['tokens_per_second']:,.0f} tokens/s"
        )
    lines.append(f"throughput     {rate}")
    lines.append(
        f"time           {hours_text(t['total_seconds'])}: training "
        f"{_duration(t['train_seconds'])} + evaluation {_duration(t['eval_seconds'])} "
        "(model loading and checkpoint writes not included)"
    )
    for note in plan["notes"]:
        lines.append(f"note           {note}")
    for problem in plan["problems"]:
        lines.append(f"this machine   cannot run it: {problem}")
    if not mem["fits"]:
        chosen = mem["with_checkpointing" if mem["checkpointing"] else "without_checkpointing"]
        fixes = "; ".join(
            f"{' '.join(f['overrides'])} ({_gib(f['total_bytes'])})"
            for f in mem.get("would_fit", [])
        )
        per_gpu = "" if n == 1 else " per GPU"
        sharded = mem.get("sharded_fit")
        advice = (
            f"would fit: {fixes}"
            if fixes
            else "no combination of checkpointing, a smaller micro-batch, LoRA or QLoRA fits"
        ) + _sharded_advice(sharded)
        if not fixes and not (sharded and sharded["num_processes"]):
            advice += ": use a larger GPU" if plan["target"] != "cpu" else ": use more memory"
        lines.append(
            f"WARNING        the memory estimate {_gib(chosen['total'])}{per_gpu} exceeds the "
            f"{_gib(mem['capacity_bytes'])} of {plan['device']}; {advice}"
        )
    return "\n".join(lines)
