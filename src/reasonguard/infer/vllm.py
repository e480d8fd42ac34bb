"""The vLLM backend: high-throughput generation on CUDA GPUs, same interface as `hf.HFBackend`.

vLLM is imported only here, so the rest of reasonguard runs without it. Prefix caching is on:
every guard prompt starts with the same 490-character instruction, so its KV blocks are computed
once. Prompts are tokenized by our tokenizer (exactly as training did) and passed as token ids,
so vLLM never adds a second BOS. A LoRA folder is served as base model + LoRA request.

Sampling is reproducible per prompt: prompt `i` of a call gets seed `seed + i`, whatever else is
in the batch.

Example:
    >>> from reasonguard.infer.backends import load_backend
    >>> backend = load_backend("runs/sft-3b/final", "vllm", tensor_parallel_size=2)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.infer.backends import Backend, BatchCallback, Generation, check_sampling
from reasonguard.infer.hf import ADAPTER_CONFIG, base_model_of, tokenizer_source
from reasonguard.models import end_of_turn_ids, load_tokenizer

DEFAULT_BATCH_SIZE = 256  # prompts handed to vLLM per call; its scheduler batches inside


MISSING = (
    "the vllm backend needs the `vllm` package (CUDA GPU): pip install 'reasonguard[vllm]', "
    "or use --backend hf"
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise UserError(MISSING) from None
    return vllm


class VLLMBackend(Backend):
    """Generation with `vllm.LLM` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        path: str,
        prompt_format: str,
        *,
        batch_size: int | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
    ) -> None:
        vllm = _import_vllm()
        self.name, self.path, self.prompt_format = name, path, prompt_format
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.tokenizer = load_tokenizer(tokenizer_source(path), trust_remote_code=trust_remote_code)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        folder = Path(path)
        self.lora = None
        model = path
        options: dict[str, Any] = {}
        if (folder / ADAPTER_CONFIG).is_file():
            from vllm.lora.request import LoRARequest

            model = base_model_of(folder)
            rank = json.loads((folder / ADAPTER_CONFIG).read_text()).get("r", 16)
            options.update(enable_lora=True, max_lora_rank=max(8, int(rank)))
            self.lora = LoRARequest("guard", 1, str(folder))
        self.llm = vllm.LLM(
            model=model,
            tokenizer=tokenizer_source(path),
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True,
            dtype="bfloat16",
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            **options,
        )

    def window_size(self) -> int:
        return self.batch_size  # vLLM schedules a whole call at once; one call per window

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 2048,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        on_batch: BatchCallback | None = None,
        deadline: float | None = None,  # ignored: a vLLM generate call cannot be interrupted
    ) -> list[list[Generation]]:
        from vllm import SamplingParams

        check_sampling(temperature, top_p, num_samples, max_new_tokens)
        encoded = self.encode(prompts)
        results: list[list[Generation]] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            params = [
                SamplingParams(
                    n=num_samples,
                    temperature=max(temperature, 0.0),
                    top_p=top_p if temperature > 0 else 1.0,
                    max_tokens=max_new_tokens,
                    stop_token_ids=self.stop_ids,
                    seed=seed + start + i if temperature > 0 else None,
                    skip_special_tokens=True,
                )
                for i in range(len(chunk))
            ]
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in chunk],
                params,
                use_tqdm=False,
                lora_request=self.lora,
            )
            batch = [
                [
                    Generation(
                        text=o.text,
                        # vLLM keeps the stop token id in token_ids; it is not generated text.
                        num_tokens=len([t for t in o.token_ids if t not in self.stop_ids]),
                        hit_token_limit=o.finish_reason == "length",
                    )
                    for o in request.outputs
                ]
                for request in outputs
            ]
            results.extend(batch)
            if on_batch is not None:
                on_batch(list(range(start, start + len(chunk))), batch)
        return results
