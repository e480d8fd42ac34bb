"""The training defaults a run resolves before its model loads, each with a one-line reason.

A config may leave a speed/memory trade-off to the machine (`gradient_checkpointing: auto`,
`qlora_fallback_to_lora: auto`, `use_liger_kernel: auto`, `bf16: auto`, `attn_implementation: auto`)
or fix it. Either way the run decides once, in `Recipe.setup` before the weights load, prints the decisions and records
them in training_info.json (`model.decisions`); `--dry-run` shows those it can decide without
the weights. The rules are small pure functions of numbers and flags, so tests check them
without a GPU; `resolve` gathers the machine's facts (CUDA, device memory, installed packages,
the memory estimate of `plan.memory`) and calls them.

Rules:
- checkpointing `auto`: on only when the plan's memory estimate without checkpointing exceeds the
  CUDA device's total memory; off on CPU (RAM is plentiful, recomputation costs ~30% compute).
- quantization (`finetuning: qlora`): `qlora_fallback_to_lora: auto` trains bf16 LoRA instead of
  NF4 when the bf16 LoRA estimate is at most `QLORA_FALLBACK_HEADROOM` of the device memory.
- liger `auto`: on with CUDA and `liger_kernel` installed (SFT's fused cross-entropy; DPO's
  per-token log-probs where liger-kernel >= 0.8.2 computes their gradient right, else chunked).
- compile: `torch_compile` as configured (off unless asked for).
- attention `auto`: on CUDA, flash-attention's variable-length kernel for packed rows when
  flash-attn is installed, else SDPA; on CPU, SDPA run per sample in packed rows
  (`train.packed_attention`).

Example:
    >>> from reasonguard.plan.decisions import GIB, checkpointing_decision
    >>> checkpointing_decision("auto", estimate_bytes=18.3 * GIB, device_bytes=23.6 * GIB).value
    False
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
# A bf16 LoRA run replaces NF4 only when its estimate leaves this share of the device unused
# by the estimate: the memory model counts the big tensors and has not been checked against a
# measured peak (plan/memory.py), so a run that "just fits" would risk out-of-memory mid-run.
QLORA_FALLBACK_HEADROOM = 0.80
CHECKPOINTING_COST = "~30% more compute"


@dataclass(frozen=True)
class Decision:
    """One resolved setting: the value the run uses and why."""

    value: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "reason": self.reason}


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def checkpointing_decision(
    setting: bool | str, estimate_bytes: float | None, device_bytes: float | None
) -> Decision:
    """Gradient checkpointing on or off.

    Args:
        setting: the config's `gradient_checkpointing` (true, false or `auto`).
        estimate_bytes: the plan's peak memory estimate without checkpointing (None: unknown).
        device_bytes: the CUDA device's total memory; None on CPU.

    Examples:
        >>> checkpointing_decision("auto", 30 * GIB, 24 * GIB).value
        True
        >>> checkpointing_decision("auto", 30 * GIB, None).value
        False
    """
    if setting is True or setting is False:
        return Decision(
            setting, f"set in the config (gradient_checkpointing: {str(setting).lower()})"
        )
    if device_bytes is None:
        return Decision(
            False,
            f"auto: off on CPU (memory is plentiful; checkpointing costs {CHECKPOINTING_COST})",
        )
    if estimate_bytes is None:
        return Decision(True, "auto: no memory estimate for this model -> on (the safe choice)")
    over = estimate_bytes > device_bytes
    return Decision(
        over,
        f"auto: {_gib(estimate_bytes)} estimated without checkpointing > {_gib(device_bytes)} "
        f"device? {'yes -> on' if over else 'no -> off'}",
    )


def quantization_decision(
    finetuning: str,
    fallback: str,
    lora_bytes: float | None,
    device_bytes: float | None,
    bf16: bool = True,
) -> Decision:
    """How the frozen base is stored: `nf4` (QLoRA), `bf16` / `fp32` (LoRA), or `none` (full).

    Args:
        finetuning: the config's `finetuning`.
        fallback: `qlora_fallback_to_lora` (`auto` or `never`).
        lora_bytes: the memory estimate of the same run as bf16 LoRA (None: unknown).
        device_bytes: the CUDA device's total memory; None on CPU.
        bf16: whether the run trains in bf16 (a LoRA base without it would be fp32).

    Examples:
        >>> quantization_decision("qlora", "auto", 10 * GIB, 80 * GIB).value
        'bf16'
        >>> quantization_decision("qlora", "never", 10 * GIB, 80 * GIB).value
        'nf4'
    """
    if finetuning == "full":
        return Decision("none", "finetuning: full trains every weight (no frozen base)")
    if finetuning == "lora":
        dtype = "bf16" if bf16 else "fp32"
        return Decision(dtype, f"finetuning: lora: frozen base in {dtype}")
    if fallback == "never":
        return Decision("nf4", "finetuning: qlora with qlora_fallback_to_lora: never -> NF4 base")
    if device_bytes is None:
        return Decision("nf4", "auto: no CUDA device to measure -> NF4 base")
    if not bf16:
        return Decision("nf4", "auto: bf16 is off, a LoRA base would be fp32 -> NF4 base")
    if lora_bytes is None:
        return Decision("nf4", "auto: no memory estimate for this model -> NF4 base")
    limit = QLORA_FALLBACK_HEADROOM * device_bytes
    fits = lora_bytes <= limit
    return Decision(
        "bf16" if fits else "nf4",
        f"auto: bf16 LoRA estimated at {_gib(lora_bytes)} <= {QLORA_FALLBACK_HEADROOM:.0%} of "
        f"{_gib(device_bytes)} device ({_gib(limit)})? "
        + ("yes -> bf16 LoRA base (no NF4 dequantisation: faster)" if fits else "no -> NF4 base"),
    )


def liger_decision(
    setting: bool | str, cuda: bool, installed: bool, stage_supports: bool = True
) -> Decision:
    """Liger-Kernel's fused linear cross-entropy on or off (`true` without CUDA or the package
    is stopped earlier, by `modeling.environment_problems`)."""
    if setting is False:
        return Decision(False, "set in the config (use_liger_kernel: false)")
    if not stage_supports:
        return Decision(False, "not used by this stage (its loss needs per-sequence log-probs)")
    if setting is True:
        return Decision(True, "set in the config (use_liger_kernel: true)")
    if not cuda:
        return Decision(False, "auto: no CUDA -> off (liger-kernel is a GPU kernel)")
    if not installed:
        return Decision(False, "auto: liger_kernel is not installed -> off")
    return Decision(True, "auto: CUDA and liger_kernel present -> fused linear cross-entropy")


def compile_decision(setting: bool) -> Decision:
    """`torch.compile` of the decoder: opt-in only."""
    if setting:
        return Decision(True, "torch_compile: true (opt-in) -> the decoder is compiled")
    return Decision(False, "the default (opt in with torch_compile: true)")


PER_SAMPLE = "sdpa, per sample in packed rows"  # the value of the CPU packing kernel


def attention_decision(
    setting: str, packing: bool, cuda: bool = False, flash_installed: bool = False
) -> Decision:
    """The attention kernel the run uses, and what packed rows get from it.

    Our per-sample SDPA (`train.packed_attention`) is the CPU kernel for packed rows: it splits
    each row on the host and runs one SDPA call per sample, which on a GPU would mean a
    device-to-host sync per layer and many small kernels, so CUDA gets flash-attention's
    variable-length kernel (flash-attn installed) or transformers' SDPA with the block-diagonal
    mask it builds from the position_ids restarts.
    """
    if setting == "auto":
        if cuda and packing and flash_installed:
            return Decision(
                "flash_attention_2",
                "auto: CUDA, packing, flash-attn installed -> flash-attention's variable-length "
                "kernel (sample boundaries from position_ids)",
            )
        if cuda:
            note = (
                "; packed rows get a block-diagonal mask over the whole row (install flash-attn "
                "for the variable-length kernel)"
                if packing
                else ""
            )
            return Decision("sdpa", f"auto: CUDA -> SDPA{note}")
        setting = "sdpa"
    if not packing:
        return Decision(setting, "as configured (no packing: padded rows)")
    if setting == "sdpa" and not cuda:
        return Decision(
            PER_SAMPLE,
            "packing with sdpa on CPU -> causal SDPA per sample of each packed row "
            "(train/packed_attention.py): no attention across samples",
        )
    if setting == "flash_attention_2":
        return Decision(
            setting,
            "as configured; packed rows run flash-attention's variable-length kernel "
            "(sample boundaries from position_ids)",
        )
    return Decision(
        setting,
        "as configured; packed rows get transformers' causal mask from the position_ids "
        "restarts (block-diagonal, computed over the whole row)",
    )


def bf16_decision(setting: bool | str, cuda: bool, supported: bool) -> Decision:
    """bf16 autocast (the rule of `modeling.use_bf16`, with its reason)."""
    if setting is True or setting is False:
        return Decision(setting, f"set in the config (bf16: {str(setting).lower()})")
    if not cuda:
        return Decision(False, "auto: CPU -> off (slow without native bf16 instructions)")
    if not supported:
        return Decision(False, "auto: this GPU has no bf16 support -> off")
    return Decision(True, "auto: the GPU supports bf16 -> on")


def allocator_decision() -> Decision:
    """The glibc allocator set-up of this process (`launch.allocenv`)."""
    from reasonguard.launch.allocenv import decision

    found = decision()
    values = " ".join(f"{k}={v}" for k, v in found["env"].items() if v is not None)
    return Decision(bool(values), found["action"] + (f" ({values})" if values else ""))


def labels_without_response_decision(setting: str, rows: int) -> Decision:
    """What the run trains on its `rows` rows with response labels but no response.

    Examples:
        >>> labels_without_response_decision("none", 4).reason
        'set in the config: the Completion/Response labels of 4 rows with no response are None'
    """
    if setting == "none":
        return Decision(
            "none",
            f"set in the config: the Completion/Response labels of {rows} rows with no "
            "response are None",
        )
    return Decision(
        "keep",
        f"{rows} rows with no response keep their Completion/Response labels, as published "
        "(labels_without_response: none sets them to None)",
    )


def device_memory_bytes() -> float | None:
    """Total memory of the current CUDA device, or None on CPU."""
    from reasonguard.train.modeling import cuda_available

    if not cuda_available():
        return None
    import torch

    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(
    config: Any,
    bf16: bool,
    lengths: list[int] | None = None,
    label_counts: list[int] | None = None,
    budget: int | None = None,
    stage_supports_liger: bool = True,
) -> dict[str, Decision]:
    """Every decision of a run on this machine, before its weights load.

    Args:
        config: the run config.
        bf16: the resolved `bf16` (`modeling.use_bf16`).
        lengths, label_counts: tokens and labelled tokens of each training row, for the memory
            estimate (needed on CUDA only; None leaves it unknown).
        budget: tokens of one packed micro-batch.
        stage_supports_liger: whether the stage's loss can use the fused cross-entropy.

    Returns:
        `checkpointing`, `quantization`, `liger`, `compile`, `attention`, `bf16` and
        `cpu_allocator` decisions, in that order.
    """
    from reasonguard.train.modeling import cuda_available

    cuda = cuda_available()
    device_bytes = device_memory_bytes()
    c = config
    estimates: dict[str, Any] = {}
    needs_estimate = device_bytes is not None and (
        c.gradient_checkpointing == "auto"
        or (c.finetuning == "qlora" and c.qlora_fallback_to_lora == "auto")
    )
    if needs_estimate and lengths:
        estimates = _estimates(c, bf16, lengths, label_counts or [0] * len(lengths), budget)
    quantization = quantization_decision(
        c.finetuning,
        c.qlora_fallback_to_lora,
        estimates.get("lora", {}).get(_ckpt_key(c.gradient_checkpointing)),
        device_bytes,
        bf16,
    )
    mode = "lora" if c.finetuning == "qlora" and quantization.value == "bf16" else "run"
    without = estimates.get(mode, {}).get("without_checkpointing")
    supported = bool(cuda) and _bf16_supported()
    return {
        "checkpointing": checkpointing_decision(c.gradient_checkpointing, without, device_bytes),
        "quantization": quantization,
        "liger": liger_decision(c.use_liger_kernel, cuda, liger_installed(), stage_supports_liger),
        "compile": compile_decision(c.torch_compile),
        "attention": attention_decision(c.attn_implementation, c.packing, cuda, _flash_installed()),
        "bf16": Decision(bf16, bf16_decision(c.bf16, cuda, supported).reason),
        "cpu_allocator": allocator_decision(),
    }


def _flash_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _ckpt_key(setting: bool | str) -> str:
    # An `auto` run falls back to LoRA only if LoRA fits without checkpointing: the fallback
    # must not buy its speed with recomputation.
    return "with_checkpointing" if setting is True else "without_checkpointing"


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _estimates(
    config: Any, bf16: bool, lengths: list[int], label_counts: list[int], budget: int | None
) -> dict[str, Any]:
    """The plan's memory estimates ({`run`, `lora`} x with/without checkpointing, bytes), or
    an empty mapping when the model's shapes are unknown."""
    import dataclasses

    from reasonguard.errors import UserError
    from reasonguard.plan.memory import run_memory

    out: dict[str, Any] = {}
    try:
        out["run"] = run_memory(config, lengths, label_counts, budget, bf16, on_gpu=True)
        if config.finetuning == "qlora":
            lora = dataclasses.replace(config, finetuning="lora")
            out["lora"] = run_memory(lora, lengths, label_counts, budget, True, on_gpu=True)
    except (UserError, OSError, ValueError, KeyError):
        return {}
    return {k: {kk: vv["total"] for kk, vv in v.items()} for k, v in out.items()}


def format_decisions(decisions: dict[str, Decision]) -> list[str]:
    """One `name  value  (reason)` line per decision, as setup and --dry-run print them."""
    lines = []
    for name, d in decisions.items():
        value = ("on" if d.value else "off") if isinstance(d.value, bool) else d.value
        lines.append(f"  {name:<14} {value}: {d.reason}")
    return lines


def effective_config(config: Any, decisions: dict[str, Decision]) -> Any:
    """A copy of `config` with the decided values in place of `auto` (what the model loader
    reads): checkpointing as a bool, and `finetuning: lora` when qlora fell back to bf16 LoRA."""
    import dataclasses

    changes: dict[str, Any] = {"gradient_checkpointing": bool(decisions["checkpointing"].value)}
    if "attention" in decisions:
        attention = decisions["attention"].value
        changes["attn_implementation"] = "sdpa" if attention == PER_SAMPLE else attention
    if config.finetuning == "qlora" and decisions["quantization"].value == "bf16":
        changes["finetuning"] = "lora"
    return dataclasses.replace(config, **changes)
