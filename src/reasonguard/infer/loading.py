"""Loading a generation backend by name: `load_backend("smollm2", "hf")`.

This module sits above both implementations (`hf.py`, `vllm/backend.py`), which import only the
interface in `backends.py`; neither imports torch, transformers or vLLM at module level, so
importing this module stays cheap.

Example:
    >>> from reasonguard.infer.loading import load_backend
    >>> backend = load_backend("smollm2", "hf", prompt_format="raw")
    >>> type(backend).__name__
    'HFBackend'
"""

from __future__ import annotations

from typing import Any

from reasonguard.classifier.kinds import is_classifier
from reasonguard.errors import UserError
from reasonguard.infer.backends import (
    BACKENDS,
    Backend,
    recorded_fast_marker,
    resolve_prompt_format,
)
from reasonguard.infer.hf import DEFAULT_BATCH_SIZE as HF_BATCH
from reasonguard.infer.hf import HFBackend
from reasonguard.infer.vllm.backend import DEFAULT_BATCH_SIZE as VLLM_BATCH
from reasonguard.infer.vllm.backend import VLLMBackend
from reasonguard.models import resolve_model


def planned_window_size(backend: str, batch_size: int | None = None) -> int:
    """The `window_size` the backend will have once loaded, without loading a model:
    data-parallel shards begin on multiples of it (a worker checks that its model agrees).

    Raises:
        UserError: a batch size below 1.
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if backend == "vllm":
        return batch_size or VLLM_BATCH  # VLLMBackend.window_size: one call per window
    return (batch_size or HF_BATCH) * 4  # Backend.window_size


def load_backend(
    model: str,
    backend: str = "hf",
    prompt_format: str | None = None,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    trust_remote_code: bool = False,
    max_new_tokens: int | None = None,
    **kwargs: Any,
) -> Backend:
    """Load a model for generation.

    Args:
        model: an offline alias (`smollm2`, `tiny-llama`), a hub id, a saved full model folder,
            a LoRA output folder (adapter + tokenizer + `reasonguard.json`), or a classifier
            folder from `reasonguard train classifier` (`classifier.ClassifierBackend`).
        backend: `hf` or `vllm`.
        prompt_format: for models without a guard record (hub ids); see `resolve_prompt_format`.
        device: HF only: `cpu`, `cuda`, `cuda:1`; default CUDA when available.
        batch_size: prompts per batch (HF default 8; vLLM schedules itself, default 256).
        trust_remote_code: allow model code from the hub (off: it runs arbitrary code).
        max_new_tokens: vLLM: the token budget its engine's context is sized for (default
            2048; see `vllm.context_length`); a generation may ask for no more.
        **kwargs: backend options (both: `dtype`; HF: `load_in_4bit` (default: as trained),
            `threads`; vLLM: `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`,
            `kv_cache_gib`).

    Raises:
        UserError: unknown backend, vLLM not installed, model not found, bad prompt format.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    path = resolve_model(model)
    if is_classifier(path):
        return _load_classifier(model, path, backend, prompt_format, device, batch_size, kwargs)
    fmt = resolve_prompt_format(path, prompt_format)
    loaded: Backend
    if backend == "vllm":
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        loaded = VLLMBackend(
            model, path, fmt, batch_size=batch_size, trust_remote_code=trust_remote_code, **kwargs
        )
    else:
        loaded = HFBackend(
            model,
            path,
            fmt,
            device=device,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    loaded.fast_mode_marker = recorded_fast_marker(path)
    return loaded


def _load_classifier(
    model: str,
    path: str,
    backend: str,
    prompt_format: str | None,
    device: str | None,
    batch_size: int | None,
    options: dict[str, Any],
) -> Backend:
    """A classifier folder's backend; the options of a generating model are refused by name."""
    from reasonguard.infer.classifier import ClassifierBackend

    if backend != "hf":
        raise UserError(
            f"{model} is an encoder classifier: it runs on transformers (--backend hf), not "
            f"{backend} (nothing is generated, so vLLM has nothing to add)"
        )
    if prompt_format is not None:
        raise UserError(f"{model} is an encoder classifier: it has no --prompt-format")
    unknown = sorted(k for k, v in options.items() if k != "threads" and v not in (None, False))
    if unknown:
        raise UserError(
            f"{model} is an encoder classifier: {', '.join(unknown)} apply to generating models"
        )
    return ClassifierBackend(
        model, path, device=device, batch_size=batch_size, threads=options.get("threads")
    )
