"""The Hugging Face transformers backend: batched generation on CPU or GPU.

Prompts are sorted by length (longest first) and decoded with continuous batching
(`batching.decode`): up to `batch_size` rows share a KV cache, each row stops on an end-of-turn
token (`models.end_of_turn_ids`) or at `max_new_tokens`, and a finished row's slot goes to the
next prompt at once instead of idling until the batch's longest row is done. Batched greedy
output equals one-at-a-time output token for token (tests/test_infer_hf.py,
tests/test_infer_batching.py). A `deadline` stops generation early, the outputs marked.

A LoRA output folder (adapter + `reasonguard.json`) is loaded on its base model and the adapter
merged into the weights, so inference costs what the base model costs. A QLoRA adapter runs, as
trained, on the 4-bit NF4 base its `reasonguard.json` records (bitsandbytes, on CUDA or CPU), the
adapter kept separate, as merging into 4-bit weights loses precision (`load_model`).

Example:
    >>> from reasonguard.infer.hf import HFBackend
    >>> backend = HFBackend("tiny-llama", resolve_model("tiny-llama"), "raw", batch_size=4)
    >>> out = backend.generate([backend.build_prompt(render_input("hi"))], max_new_tokens=8)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import TASK_FIELD, render_input
from reasonguard.infer.backends import Backend, BatchCallback, Generation, check_sampling
from reasonguard.infer.scores import ScoreQuery, empty_scores, normalised, score_queries
from reasonguard.models import (
    ADAPTER_CONFIG,
    base_model_of,
    end_of_turn_ids,
    load_tokenizer,
    nf4_config,
    nf4_record,
    read_guard_config,
    tokenizer_source,
)

DEFAULT_BATCH_SIZE = 8


def _pick_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available")
    return device


def base_quantization(path: str, load_in_4bit: bool | None, device: str) -> dict[str, Any] | None:
    """How to load the base weights of `path`: an NF4 record (`models.nf4_record`) or None
    for full precision.

    `load_in_4bit=None` means as trained: a QLoRA adapter gets the NF4 base its
    `reasonguard.json` records, everything else full precision. When bitsandbytes is missing a
    QLoRA adapter falls back to a full-precision base with a one-line notice; asking for
    `load_in_4bit=True` without it is an error.

    Raises:
        UserError: 4-bit asked for without bitsandbytes.
    """
    import importlib.util

    folder = Path(path)
    record = read_guard_config(folder) if folder.is_dir() else None
    trained_nf4 = (record or {}).get("finetuning") == "qlora"
    if load_in_4bit is False or (load_in_4bit is None and not trained_nf4):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        if load_in_4bit:
            raise UserError("load_in_4bit needs bitsandbytes: pip install 'reasonguard[qlora]'")
        print(
            f"note: {path} was trained on a 4-bit NF4 base (QLoRA); bitsandbytes is not "
            "installed, so its base runs in full precision (pip install 'reasonguard[qlora]')",
            file=sys.stderr,
        )
        return None
    recorded = (record or {}).get("quantization")
    # Folders trained before the record existed: the training defaults (bf16 compute on a GPU).
    return recorded or nf4_record("bfloat16" if device.startswith("cuda") else "float32")


def load_model(
    path: str,
    device: str,
    trust_remote_code: bool = False,
    load_in_4bit: bool | None = None,
    dtype: str | None = None,
) -> Any:
    """Load a full model, or a base model plus the LoRA adapter in `path`, ready for inference.

    Weights in `dtype`: by default float32 on CPU (bf16 matmuls are slow there and change
    results), bfloat16 on CUDA; `auto` is the checkpoint's. The base runs on 4-bit NF4 weights
    as `base_quantization` decides; the adapter is then kept separate (merging into 4-bit
    weights would round it away), otherwise merged.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    options: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quantization = base_quantization(path, load_in_4bit, device)
    if quantization is not None:
        options["quantization_config"] = nf4_config(quantization)
        # bitsandbytes quantises on the device the weights are placed on (CUDA or CPU); 4-bit
        # weights cannot be moved afterwards.
        options["device_map"] = {"": device}
    folder = Path(path)
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_model_of(folder) if is_adapter else path, **options
        )
        if is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
            if quantization is None:
                model = model.merge_and_unload()
    except OSError as exc:
        raise UserError(f"cannot load model {path}: {exc}") from None
    if quantization is None:
        model = model.to(device)
    model.eval()
    return model


def _generator(seed: int, index: int, sample: int) -> Any:
    """The random generator of one sampled continuation: the same seed, prompt position and
    sample number give the same draws, whatever else is in the batch."""
    import torch

    return torch.Generator().manual_seed((seed + index) * 1009 + sample)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: str = "cpu") -> tuple[Any, Any]:
    """(input_ids, attention_mask) tensors with every row padded on the left to the longest, so
    the next token of every row is predicted at the last position."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, attention


class HFBackend(Backend):
    """Generation with `transformers` `generate` (see the module docstring)."""

    supports_fast = True

    def __init__(
        self,
        name: str,
        path: str,
        prompt_format: str,
        *,
        device: str | None = None,
        batch_size: int | None = None,
        trust_remote_code: bool = False,
        load_in_4bit: bool | None = None,
        dtype: str | None = None,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            import torch

            if threads < 1:
                raise UserError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self.name, self.path, self.prompt_format = name, path, prompt_format
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.device = _pick_device(device)
        try:
            self.tokenizer = load_tokenizer(
                tokenizer_source(path), trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise UserError(f"cannot load the tokenizer of {name}: {exc}") from None
        self.model = load_model(path, self.device, trust_remote_code, load_in_4bit, dtype)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self._reference_ids: list[int] | None = None
        self._fast_prefix: Any = None  # fast.SharedPrefix, made on the first fast verdict
        from reasonguard.infer.batching import model_supported, use_ragged_attention

        if not model_supported(self.model.config):
            raise UserError(
                f"{name}: sliding-window attention is not supported by the HF backend's "
                "continuous batching; use --backend vllm"
            )
        if self.device == "cpu":
            use_ragged_attention(self.model)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 2048,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        on_batch: BatchCallback | None = None,
        deadline: float | None = None,
        with_scores: bool = False,  # scores come from their own forward pass (`answer_scores`)
    ) -> list[list[Generation]]:
        from reasonguard.infer.batching import Sequence as Row
        from reasonguard.infer.batching import decode

        check_sampling(temperature, top_p, num_samples, max_new_tokens)
        encoded = self.encode(prompts)
        # Longest first: the widest cache comes first (running out of memory shows at once), and
        # each later prompt fits inside the live rows' width without widening the cache.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        rows = [
            Row(i, j, encoded[i], _generator(seed, i, j) if temperature > 0 else None)
            for i in order
            for j in range(num_samples)
        ]
        results: list[list[Generation | None]] = [[None] * num_samples for _ in encoded]
        left = [num_samples] * len(encoded)

        def finished(done: list[Row]) -> None:
            complete = []
            for row in done:
                results[row.index][row.sample] = self._generation(row, max_new_tokens)
                left[row.index] -= 1
                if left[row.index] == 0:
                    complete.append(row.index)
            if complete and on_batch is not None:
                on_batch(complete, [list(results[i]) for i in complete])  # type: ignore[misc]

        decode(
            self.model,
            rows,
            slots=self.batch_size * num_samples,
            max_new_tokens=max_new_tokens,
            stop_ids=frozenset(self.stop_ids),
            temperature=temperature,
            top_p=top_p,
            reference=self._reference(),
            deadline=deadline,
            on_done=finished,
        )
        return [list(r) for r in results]  # type: ignore[misc]

    def fast_verdicts(self, prompts: Sequence[str], tasks: Sequence[Sequence[str]]) -> list[Any]:
        """Fast-mode verdicts (see `fast.py`): the answer block forced after each prompt."""
        from reasonguard.infer.fast import fast_verdicts

        return fast_verdicts(
            self.model,
            self.tokenizer,
            self.encode(prompts),
            tasks,
            batch_size=self.batch_size,
            device=self.device,
            prefix=self.fast_prefix(),
        )

    def fast_prefix(self) -> Any:
        """The guard instruction's KV cache (`fast.SharedPrefix`), made on first use."""
        from reasonguard.infer.fast import SharedPrefix

        if self._fast_prefix is None:
            reference = self.encode([self.build_fast_prompt(render_input("."))])[0]
            self._fast_prefix = SharedPrefix(self.model, reference)
        return self._fast_prefix

    def open_fast_stream(self) -> Any:
        """A stream keeping one item's KV cache between checks (`fast_stream.CachedStream`)."""
        from reasonguard.infer.fast_stream import CachedStream

        return CachedStream(
            self.model,
            self.tokenizer,
            lambda prompt: self.encode([prompt])[0],
            self.device,
            self.fast_prefix(),
        )

    def _reference(self) -> list[int]:
        """Token ids of a guard prompt: every prompt with the standard instruction shares its
        first ~100 tokens, whose cache `batching.decode` then computes once."""
        if self._reference_ids is None:
            self._reference_ids = self.encode([self.build_prompt(render_input("."))])[0]
        return self._reference_ids

    def _generation(self, row: Any, max_new_tokens: int) -> Generation:
        return Generation(
            text=self.tokenizer.decode(
                row.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ),
            num_tokens=len(row.tokens),
            hit_token_limit=not row.stopped and len(row.tokens) >= max_new_tokens,
            timed_out=row.timed_out,
        )

    def answer_scores(
        self, prompts: Sequence[str], texts: Sequence[str], tasks: Sequence[Sequence[str]]
    ) -> list[dict[str, dict[str, float] | None]]:
        """Label probabilities at each answer position (see `scores.py`), one dict per text keyed
        by verdict field (`prompt_harmfulness`, ...); None where a task was not asked or has no
        answer line. One forward pass per text, in batches."""
        prompt_ids = self.encode(prompts)
        jobs: list[tuple[int, list[int], list[tuple[int, ScoreQuery]]]] = []
        for i, (ids, text, asked) in enumerate(zip(prompt_ids, texts, tasks, strict=True)):
            queries = score_queries(self.tokenizer, text, asked)
            jobs.extend(self._sequences(i, ids, queries))
        results = [empty_scores() for _ in texts]
        for start in range(0, len(jobs), self.batch_size):
            self._score_batch(jobs[start : start + self.batch_size], results)
        return results

    @staticmethod
    def _sequences(
        item: int, prompt_ids: list[int], queries: list[ScoreQuery]
    ) -> list[tuple[int, list[int], list[tuple[int, ScoreQuery]]]]:
        """Group an item's queries into as few sequences as possible: the answers come in order,
        so the shorter contexts are usually prefixes of the longest, and one pass reads them all."""
        groups: list[tuple[int, list[int], list[tuple[int, ScoreQuery]]]] = []
        for query in sorted(queries, key=lambda q: -len(q.context_ids)):
            seq = prompt_ids + list(query.context_ids)
            position = len(seq) - 1  # the logits here predict the label token
            for _, longer, members in groups:
                if longer[: len(seq)] == seq:
                    members.append((position, query))
                    break
            else:
                groups.append((item, seq, [(position, query)]))
        return groups

    def _score_batch(
        self,
        jobs: list[tuple[int, list[int], list[tuple[int, ScoreQuery]]]],
        results: list[dict[str, dict[str, float] | None]],
    ) -> None:
        import torch

        width = max(len(seq) for _, seq, _ in jobs)
        pad = self.tokenizer.pad_token_id
        # Right padding: in a causal model the pads after a row cannot change its logits.
        input_ids = torch.tensor([seq + [pad] * (width - len(seq)) for _, seq, _ in jobs])
        attention = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for _, seq, _ in jobs])
        # Only the answer positions go through the LM head (a full-vocab row per token is GBs):
        # the union of every row's positions, as one index list shared by the rows (what
        # `logits_to_keep` takes as a tensor); each row then reads its own columns.
        positions = sorted({p for _, _, members in jobs for p, _ in members})
        column_of = {p: i for i, p in enumerate(positions)}
        keep = torch.tensor(positions)
        with torch.inference_mode():
            logits = (
                self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    logits_to_keep=keep.to(self.device),
                    use_cache=False,
                )
                .logits.float()
                .cpu()
            )
        for row, (item, _, members) in enumerate(jobs):
            for position, query in members:
                labels = list(query.candidates)
                column = column_of[position]
                values = [logits[row, column, query.candidates[label]].item() for label in labels]
                results[item][TASK_FIELD[query.task]] = normalised(values, labels)
