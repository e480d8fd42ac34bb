"""Model-side setup shared by the training stages: machine checks, tokenizer, model, optimizer.

`environment_problems` runs before anything is loaded, so a config that needs a missing package
or CUDA fails in a second with a message instead of after a model download (QLoRA's NF4 base and
the bitsandbytes optimizers need bitsandbytes, not CUDA: they run on CPU too). `load_model`
expects a config whose `auto` values are resolved (`plan.decisions.effective_config`); the
optimizer and schedule are transformers' (`optim`, `lr_scheduler_type`, built by the Trainer).

Example:
    >>> from reasonguard.train.config import SFTConfig
    >>> from reasonguard.train.modeling import environment_problems
    >>> environment_problems(SFTConfig(finetuning="qlora", use_liger_kernel=True))  # no CUDA
    ['use_liger_kernel: true needs a CUDA GPU (liger-kernel is a Triton GPU kernel); use use_liger_kernel: auto or false on this machine']
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError

BNB_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit")


def cuda_available() -> bool:
    """A CUDA GPU is usable and the launcher did not ask for CPU processes (`--cpu`)."""
    import torch

    from reasonguard.launch.command import forced_cpu

    return torch.cuda.is_available() and not forced_cpu()


def environment_problems(config: Any) -> list[str]:
    """What stops this config on this machine (empty when it can run). Loads nothing."""
    problems = []
    cuda = cuda_available()
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    # bitsandbytes (>= 0.50) runs its NF4 layers and its optimizers on CUDA and on CPU.
    if config.finetuning == "qlora" and not has_bnb:
        problems.append("finetuning: qlora needs bitsandbytes: pip install 'reasonguard[qlora]'")
    if config.optim in BNB_OPTIMIZERS and not has_bnb:
        problems.append(
            f"optim: {config.optim} needs bitsandbytes: pip install 'reasonguard[qlora]'"
        )
    if config.bf16 is True and cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            problems.append("bf16: true, but this GPU has no bf16 support; use bf16: false")
    if config.use_liger_kernel is True:
        if not cuda:
            problems.append(
                "use_liger_kernel: true needs a CUDA GPU (liger-kernel is a Triton GPU kernel); "
                "use use_liger_kernel: auto or false on this machine"
            )
        elif importlib.util.find_spec("liger_kernel") is None:
            problems.append(
                "use_liger_kernel: true needs the liger_kernel package: pip install liger-kernel "
                "(or use_liger_kernel: auto)"
            )
    if config.attn_implementation == "flash_attention_2" and (
        not cuda or importlib.util.find_spec("flash_attn") is None
    ):
        problems.append(
            "attn_implementation: flash_attention_2 needs CUDA and flash-attn; use sdpa"
        )
    return problems


def use_bf16(config: Any) -> bool:
    """Whether to train under bf16 autocast: `auto` means on a CUDA GPU that supports it.

    `bf16: true` on a CPU is honoured (PyTorch has CPU bf16 autocast), but it is slow on CPUs
    without native bf16 instructions, so `auto` leaves it off there.
    """
    if config.bf16 == "auto":
        if not cuda_available():
            return False
        import torch

        return torch.cuda.is_bf16_supported()
    return bool(config.bf16)


def device() -> Any:
    """CUDA (the current device: each training process sets its own) or CPU."""
    import torch

    return torch.device("cuda" if cuda_available() else "cpu")


def load_training_tokenizer(config: Any) -> Any:
    """The tokenizer of a run, with the configured chat template if one is set."""
    from reasonguard.models import LLAMA3_CHAT_TEMPLATE, load_tokenizer

    tokenizer = load_tokenizer(
        config.tokenizer_name_or_path or config.model_name_or_path,
        trust_remote_code=config.trust_remote_code,
    )
    if config.chat_template == "llama3":
        tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    if config.prompt_format != "raw" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"prompt_format: {config.prompt_format} needs a chat template, and the tokenizer of "
            f"{config.model_name_or_path} has none; set chat_template: llama3 or prompt_format: raw"
        )
    return tokenizer


def load_model(config: Any, bf16: bool, checkpoint: Path | None = None) -> Any:
    """The model to train: full weights, or a frozen base with (new or resumed) LoRA adapters.

    Args:
        config: the run config.
        bf16: train under bf16 autocast; frozen LoRA base weights are then stored in bf16.
        checkpoint: resume from this checkpoint folder (full weights or an adapter).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from reasonguard.models import resolve_model

    kwargs: dict[str, Any] = {
        # `auto` is decided before loading (plan.decisions); a caller that skipped that gets SDPA.
        "attn_implementation": "sdpa"
        if config.attn_implementation == "auto"
        else config.attn_implementation,
        "trust_remote_code": config.trust_remote_code,
    }
    base = resolve_model(config.model_name_or_path)
    start_adapter = base if is_adapter_dir(base) else None
    if start_adapter is not None:
        # Stage 2 starting from an R-SFT LoRA output: its base model, plus that adapter below.
        from reasonguard.models import base_model_of

        base = resolve_model(base_model_of(Path(start_adapter)))
    if config.finetuning == "full":
        # fp32 master weights even under bf16: autocast runs the matmuls in bf16, the optimizer
        # updates stay exact (what mixed precision means in HF Trainer / DeepSpeed).
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint) if checkpoint else base, dtype=torch.float32, **kwargs
        )
        if start_adapter is not None and checkpoint is None:
            model = _merged(model, start_adapter)
        _enable_checkpointing(model, config)
        _place(model)
    else:
        dtype = torch.bfloat16 if bf16 else torch.float32
        if config.finetuning == "qlora":
            kwargs["quantization_config"] = _nf4_config(bf16)
            # bitsandbytes quantises the weights on the device they are placed on: this
            # process's GPU, or the CPU (no `.to()` afterwards: 4-bit weights cannot move).
            on_cuda = cuda_available()
            kwargs["device_map"] = {"": torch.cuda.current_device() if on_cuda else "cpu"}
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kwargs)
        if start_adapter is not None and init_adapter(config) == "merge":
            model = _merged(model, start_adapter)
            start_adapter = None
        if config.finetuning == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=config.gradient_checkpointing is True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        else:
            _enable_checkpointing(model, config)
            _place(model)
        model = _with_adapters(model, config, checkpoint or start_adapter)
    model.config.use_cache = False  # a KV cache is useless in training and costs memory
    if config.packing and not cuda_available():
        from reasonguard.train.packed_attention import use_packed_attention

        # Per-sample attention inside packed rows (train/packed_attention.py): the SDPA path's
        # block-diagonal mask over the whole row costs up to several times the attention work.
        use_packed_attention(model)
    if config.torch_compile:
        # In place (nn.Module.compile), so the peft wrapper and the loss keep calling the same
        # module; compiled lazily on the first forward pass.
        model.get_decoder().compile()
    return model


def _place(model: Any) -> None:
    """Move the model to this process's device, unless a sharding engine places it: FSDP
    loads weights on rank 0 only (`cpu_ram_efficient_loading`, the others hold meta tensors)
    and DeepSpeed ZeRO-3 has partitioned them at load (`zero.Init`)."""
    from reasonguard.launch.command import _true

    if _true(os.environ.get("ACCELERATE_USE_FSDP")) or _true(
        os.environ.get("ACCELERATE_USE_DEEPSPEED")
    ):
        return
    model.to(device())


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a local folder holds a LoRA adapter (not full weights)."""
    return (Path(path) / "adapter_config.json").is_file()


def init_adapter(config: Any) -> str:
    """How a LoRA run starting from a LoRA output treats that adapter: `continue` training it,
    or `merge` it into the base and train a fresh adapter (SFT configs have no choice: merge)."""
    return getattr(config, "init_adapter", "merge")


def _merged(model: Any, adapter_dir: str) -> Any:
    """The base model with a LoRA adapter folded into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def _enable_checkpointing(model: Any, config: Any) -> None:
    if config.gradient_checkpointing is not True:  # `auto` is resolved before (plan.decisions)
        return
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without extra hooks.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _nf4_config(bf16: bool) -> Any:
    """The QLoRA base: 4-bit NF4 with double quantisation (the QLoRA paper's setup).

    The compute dtype follows the run's precision on any device: bf16 under bf16 autocast, as
    in the QLoRA paper; fp32 otherwise. bitsandbytes dequantises each weight to this dtype and
    casts the layer input to it, so with bf16 off (fp32 activations, the `auto` choice on CPU)
    an fp32 compute dtype keeps the matmuls and their gradients in fp32 instead of rounding
    every activation to bf16 and back, and avoids bf16 matmuls on CPUs without native bf16.
    The same settings are recorded with the adapter (`nf4_record`), for serving.
    """
    from reasonguard.models import nf4_config

    return nf4_config(nf4_base_record(bf16))


def nf4_base_record(bf16: bool) -> dict[str, Any]:
    """The `quantization` record of a QLoRA run's base (see `_nf4_config`)."""
    from reasonguard.models import nf4_record

    return nf4_record("bfloat16" if bf16 else "float32")


def _with_adapters(model: Any, config: Any, checkpoint: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
        _set_lora_dropout(model, config.lora_dropout)
        return model
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"config key 'lora_target_modules': {exc}") from exc


def _set_lora_dropout(model: Any, p: float) -> None:
    """Use the config's LoRA dropout on a loaded adapter (peft keeps the value saved with it,
    e.g. the R-SFT run's, when stage 2 continues that adapter)."""
    from torch import nn

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for key in list(dropouts.keys()):
                dropouts[key] = nn.Dropout(p) if p > 0 else nn.Identity()
    for adapter in getattr(model, "peft_config", {}).values():
        adapter.lora_dropout = p


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable and total parameter counts (whole tensors, also when sharded: a DTensor's
    numel is global, a ZeRO-3 parameter's local data is empty and `ds_numel` holds its size)."""

    def size(p: Any) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return {"trainable": trainable, "total": total}


def warmup_steps(config: Any, num_steps: int) -> int:
    """Warmup in steps: an int as given, a float as a fraction of `num_steps` (rounded up)."""
    if isinstance(config.warmup_steps, float):
        import math

        return math.ceil(config.warmup_steps * num_steps)
    return config.warmup_steps
