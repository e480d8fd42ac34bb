"""The time model of a training run: FLOPs per token, sustained FLOPS of the target, wall time.

- `flops_per_token`, `lm_head_flops`: training FLOPs of one computed token and of one label
  token; `run_flops` sums them over a run (training steps and held-out evaluations).
- `throughput`: the sustained FLOPS and tokens/s of a target: peak dense TFLOPS of the GPU
  class x an assumed MFU per fine-tuning mode (`hardware.GPUS`), or, for `cpu`, a matmul timed
  on this machine (`measure_matmul_flops`) x `CPU_EFFICIENCY`, or a given measured rate; N GPUs
  multiply it by N x an assumed scaling efficiency (`SCALING_EFFICIENCY`).

Accuracy: the MFU values and scaling efficiencies are assumptions from published anchors, not
measurements of this code on these GPUs.

Example:
    >>> from reasonguard.plan.hardware import KNOWN_ARCHITECTURES
    >>> from reasonguard.plan.timing import flops_per_token
    >>> arch = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-3B"]
    >>> parts = flops_per_token(arch, "full", 0, checkpointing=False, attention_keys_per_token=300)
    >>> parts["projections"] == 6 * arch.body_params
    True
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from reasonguard.plan.hardware import GPUS, Architecture

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

# ASSUMED, not measured (no multi-GPU run of this code has been timed): the fraction of N x the
# one-GPU rate that N GPUs of one node keep after communication. ddp sums the gradients once
# per optimizer step and ZeRO-2 reduce-scatters them in every backward; FSDP and ZeRO-3 also
# all-gather every block's weights in every forward and backward, more traffic to hide behind
# the compute, hence the lower figure. Replace them with measured values when there are some.
SCALING_EFFICIENCY = {"ddp": 0.90, "zero2": 0.90, "fsdp": 0.85, "zero3": 0.85}


def flops_per_token(
    arch: Architecture,
    finetuning: str,
    trainable_lora: int,
    checkpointing: bool,
    attention_keys_per_token: float,
) -> dict[str, float]:
    """Training FLOPs of one computed token (without the LM head, see `lm_head_flops`).

    `trainable_lora` is the adapter parameter count (ignored for full fine-tuning).
    `attention_keys_per_token` is the mean number of keys a computed token is scored against,
    as the run's attention kernel computes them (`batch_profile.token_profile`: per sample for
    packed rows under SDPA or flash-attention, so a packed row costs the sum of its samples).

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


def run_flops(
    arch: Architecture,
    finetuning: str,
    trainable: int,
    checkpointing: bool,
    profile: dict[str, Any],
    epochs: float,
    evaluations: int,
    eval_tokens: float,
    eval_label_tokens: float,
) -> dict[str, Any]:
    """FLOPs of a whole run: `epochs` of the training rows of `profile`
    (`batch_profile.token_profile`) and `evaluations` forward passes over the held-out rows.

    Returns:
        `flops_per_computed_token` (`flops_per_token`'s parts), `lm_head_flops_per_label_token`,
        `train_flops`, `eval_flops` and `attention_keys_per_token`.
    """
    keys_per_token = profile["attention_keys"] / profile["computed_tokens"]
    parts = flops_per_token(arch, finetuning, trainable, checkpointing, keys_per_token)
    per_computed = sum(parts.values())
    head = lm_head_flops(arch, finetuning)
    train_flops = epochs * (
        profile["computed_tokens"] * per_computed + profile["label_tokens"] * head
    )
    forward = 2.0 * (arch.body_params + trainable * (finetuning != "full"))
    forward += 4.0 * arch.q_dim * arch.layers * keys_per_token
    eval_flops = evaluations * (
        eval_tokens * forward + eval_label_tokens * 2.0 * arch.hidden * arch.vocab
    )
    return {
        "flops_per_computed_token": parts,
        "lm_head_flops_per_label_token": head,
        "train_flops": train_flops,
        "eval_flops": eval_flops,
        "attention_keys_per_token": keys_per_token,
    }


def scaling_efficiency(sharding: str, processes: int) -> float:
    """The assumed fraction of N x the one-GPU rate kept on N GPUs (1 for one GPU)."""
    return 1.0 if processes == 1 else SCALING_EFFICIENCY[sharding]


def throughput(
    target: str,
    arch: Architecture,
    bf16: bool,
    finetuning: str,
    max_micro_tokens: int,
    train_flops: float,
    run_tokens: float,
    tokens_per_second: float | None = None,
    cpu_flops: float | None = None,
    sharding: str = "ddp",
    processes: int = 1,
    device: Any = None,
) -> tuple[dict[str, Any], float]:
    """The sustained rate of a run on `target` (a `hardware.TARGETS` key).

    Args:
        target, arch, bf16, finetuning: the device, model, precision and fine-tuning mode.
        max_micro_tokens: tokens of the largest micro-batch (the CPU matmul's row count).
        train_flops, run_tokens: FLOPs and real tokens of the training steps (`run_flops`).
        tokens_per_second: a measured rate of the whole run, used as given (not scaled).
        cpu_flops: the CPU matmul rate to use instead of timing one.
        sharding, processes: N GPUs keep N x `scaling_efficiency` of one GPU's rate.
        device: the GPU class to use instead of `GPUS[target]` (a GPU described by its memory
            and TFLOPS).

    Returns:
        The plan's `throughput` mapping (`source`, `sustained_flops` of one GPU,
        `tokens_per_second` of the run, ...) and the speed-up over one GPU (1 with a given rate).
    """
    n = processes
    if tokens_per_second is not None:
        sustained = tokens_per_second * train_flops / run_tokens
        rate: dict[str, Any] = {"source": "given", "tokens_per_second": tokens_per_second}
    elif target != "cpu":
        cls = device or GPUS[target]
        peak = (cls.bf16_tflops if bf16 else cls.fp32_tflops) * 1e12
        mfu = cls.mfu[finetuning]
        sustained = peak * mfu
        rate = {
            "source": "model",
            "peak_flops": peak,
            "precision": "bf16" if bf16 else "fp32",
            "mfu": mfu,
        }
    else:
        m = min(max_micro_tokens, 2048)
        dtype = "bfloat16" if bf16 else "float32"
        measured = cpu_flops or measure_matmul_flops(m, arch.hidden, arch.intermediate, dtype)
        sustained = measured * CPU_EFFICIENCY
        rate = {
            "source": "cpu-calibrated",
            "matmul_flops": measured,
            "matmul_shape": [m, arch.hidden, arch.intermediate],
            "matmul_dtype": dtype,
            "threads": torch_threads(),
            "efficiency": CPU_EFFICIENCY,
        }
    # N GPUs share every step's rows (and the evaluations'): the run's tokens are the same,
    # each GPU computes 1/N of them, at the assumed scaling efficiency. A given rate is
    # measured on the whole run, so it is not scaled.
    efficiency = None if rate["source"] == "given" else scaling_efficiency(sharding, n)
    speedup = 1.0 if efficiency is None else n * efficiency
    rate["sustained_flops"] = sustained
    rate.setdefault("tokens_per_second", run_tokens * sustained * speedup / train_flops)
    rate.update(processes=n, scaling_efficiency=efficiency)
    return rate, speedup


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


def torch_threads() -> int:
    """torch's intra-op thread count (what training and `measure_matmul_flops` use)."""
    import torch

    return torch.get_num_threads()
