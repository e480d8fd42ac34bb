"""Continuous batching across requests: the server's vLLM path.

With `--backend vllm`, every item of every request becomes its own request to vLLM's async
engine (`AsyncLLM`) the moment it arrives; the engine's scheduler adds it to the running batch at
the next decoding step and returns it as soon as its own output ends. A short request arriving
while long reasoning is under way therefore waits for one step, not for the whole batch, which
is what the HF path's dynamic batcher (`batcher.py`) cannot do: its model runs one blocking
`generate` call per batch.

`AsyncGuard` has the batcher's interface (`start`, `close`, `submit`, `stats`), so the app's
routes, limits, authentication and error shapes are the same for both paths. Verdicts are read
exactly as `Guard.classify` reads them (`guard.reasoning_result`, `guard.fast_result`), and every
mode a request can ask for works: `reasoning: "never"` is fast mode (each answer of the forced
block a one-token request on the prefix cache), `auto` the cascade when the model folder has
calibrated bands (`cascade.json`), and reasoned verdicts carry their label probabilities, read
from the generation's own log-probs (`infer/vllm/answers.py`, as the offline vLLM backend).

A request past its time limit, or whose client went away, cancels its items: cancelling the
engine's output stream aborts the request inside vLLM, so its slot in the batch is freed at
once.

Example:
    >>> guard = AsyncGuard.load("runs/sft/final", max_new_tokens=512)
    >>> app = create_app(guard, ServeSettings(model_name="guard"))  # starts the engine
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.cascade.bands import Bands, escalate, read_bands
from reasonguard.format import render_input
from reasonguard.infer.backends import (
    Backend,
    check_sampling,
    recorded_fast_marker,
    resolve_prompt_format,
)
from reasonguard.infer.fast import AnswerSteps, ForcedContexts
from reasonguard.infer.guard import (
    GuardResult,
    asked_tasks,
    fast_result,
    reasoning_result,
    validate_items,
)
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
from reasonguard.models import end_of_turn_ids, load_tokenizer, resolve_model
from reasonguard.serve.batcher import MODE_KEY, SCORES_KEY, BatchFailed, BatchTimeout, QueueFull

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 2048


class AsyncGuard(Backend):
    """A guard served by vLLM's async engine (see the module docstring).

    Attributes:
        max_new_tokens: the reasoning token budget of every item.
        max_queue: the most items in the engine at once; more is `QueueFull` (503).
        bands: the cascade's calibrated bands (the model folder's `cascade.json`), or None.
    """

    supports_fast = True

    def __init__(
        self,
        name: str,
        path: str,
        prompt_format: str,
        engine_options: Mapping[str, Any],
        lora: Any = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_queue: int = 1024,
        trust_remote_code: bool = False,
        bands: Bands | None = None,
    ) -> None:
        from reasonguard.models import tokenizer_source

        check_sampling(0.0, 1.0, 1, max_new_tokens)
        self.name, self.path, self.prompt_format = name, path, prompt_format
        self.batch_size = 1  # each item is its own engine request
        self.tokenizer = load_tokenizer(tokenizer_source(path), trust_remote_code=trust_remote_code)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.fast_mode_marker = recorded_fast_marker(path)
        self.bands = bands
        self._contexts = ForcedContexts(self.tokenizer)
        self._answer_ids = answer_token_ids(self.tokenizer)
        self.engine_options = dict(engine_options)
        self.lora = lora
        self.max_new_tokens = max_new_tokens
        self.max_queue = max_queue
        self.engine: Any = None
        self._pending = 0
        self._peak = 0  # the most items in the engine at once
        self._counts: Counter[str] = Counter()
        self._busy_since: float | None = None
        self._busy_s = 0.0

    @classmethod
    def load(
        cls,
        model: str,
        prompt_format: str | None = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_queue: int = 1024,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> AsyncGuard:
        """Prepare a model for serving (the engine starts with `start`).

        Args:
            model: as for `load_guard`: alias, hub id, model or LoRA folder.
            prompt_format: for models without a guard record.
            **options: `vllm/engine.py`'s `engine_options` keywords (`tensor_parallel_size`, `dtype`,
                `kv_cache_gib`, `max_model_len`, `gpu_memory_utilization`).
        """
        from reasonguard.infer.vllm.backend import _import_vllm
        from reasonguard.infer.vllm.engine import engine_options

        _import_vllm()
        options.pop("batch_size", None)  # the engine's scheduler sizes its own batches
        path = resolve_model(model)
        fmt = resolve_prompt_format(path, prompt_format)
        settings, lora = engine_options(
            path, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens, **options
        )
        return cls(
            model,
            path,
            fmt,
            settings,
            lora,
            max_new_tokens=max_new_tokens,
            max_queue=max_queue,
            trust_remote_code=trust_remote_code,
            bands=read_bands(path) if Path(path).is_dir() else None,
        )

    async def start(self) -> None:
        """Start vLLM's engine (its processes; about a minute on a CPU, the model load on a
        GPU). Called by the app's lifespan, before the server accepts connections."""
        if self.engine is not None:
            return
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from reasonguard.infer.vllm.engine import engine_notice

        print(engine_notice(self.engine_options, self.lora), file=sys.stderr, flush=True)
        args = AsyncEngineArgs(**self.engine_options)
        # Built off the event loop: loading blocks for as long as the model takes.
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    async def close(self) -> None:
        """Stop the engine; requests still running fail with a 500."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def submit(self, items: Sequence[Mapping[str, Any]], timeout_s: float | None) -> list:
        """Judge items, each as its own engine requests, in the mode each carries (`MODE_KEY`,
        set by the app; default reasoning); the batcher's contract (`QueueFull`, `BatchTimeout`,
        `BatchFailed`), result dicts as `GuardResult.to_dict()` writes them."""
        if self.engine is None:
            raise RuntimeError("the engine is not started")
        if self._pending + len(items) > self.max_queue:
            self._counts["rejected_requests"] += 1
            raise QueueFull(f"the server is busy ({self._pending} items in the engine)")
        pairs = validate_items(items)
        self._counts["requests"] += 1
        self._enter(len(pairs))
        tasks = [
            asyncio.ensure_future(
                self._judge(
                    prompt, response, item.get(MODE_KEY, "reasoning"), item.get(SCORES_KEY, True)
                )
            )
            for item, (prompt, response) in zip(items, pairs, strict=True)
        ]
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*tasks))
        except TimeoutError:
            self._counts["timeouts"] += 1
            raise BatchTimeout(f"not answered within {timeout_s:g} s") from None
        except Exception as exc:
            if isinstance(exc, BatchFailed):
                raise
            self._counts["failed_items"] += 1
            logger.error("the engine failed on an item", exc_info=exc)
            raise BatchFailed(f"the model failed on this input ({type(exc).__name__})") from exc
        finally:
            for task in tasks:
                task.cancel()  # aborts the engine request of any item still running
            self._leave(len(pairs))

    async def _judge(
        self, prompt: str, response: str | None, mode: str, scores: bool
    ) -> dict[str, Any]:
        if mode == "reasoning":
            result = await self._reason(prompt, response, scores)
        else:
            result = await self._fast(prompt, response)
            if mode == "cascade" and escalate(result.scores, asked_tasks(response), self.bands):
                result = await self._reason(prompt, response, scores)
        self._counts["items"] += 1
        self._counts["generated_tokens"] += result.num_tokens
        return result.to_dict()

    async def _reason(self, prompt: str, response: str | None, scores: bool) -> GuardResult:
        """A reasoning verdict, with the label probabilities its generation kept."""
        from reasonguard.infer.vllm.backend import sampling_params, to_generation

        ids = self.encode([self.build_prompt(render_input(prompt, response))])[0]
        params = sampling_params(
            temperature=0.0,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            num_samples=1,
            seed=None,
            stop_ids=self.stop_ids,
        )
        if scores:
            keep_answer_logprobs(params, self._answer_ids)
        output = (await self._request(ids, params)).outputs[0]
        generation = to_generation(output, self.stop_ids)
        found = None
        if scores:
            asked = asked_tasks(response)
            found, missing = generated_scores(
                self.tokenizer, output.text, output.token_ids, output.logprobs, asked
            )
            values = await self._label_values([query_step(ids, query) for query in missing])
            fill_missing(found, missing, values)
        return reasoning_result(generation, response is not None, found)

    async def _fast(self, prompt: str, response: str | None) -> GuardResult:
        """A fast-mode verdict: the forced answer block, one label step at a time."""
        text = self.build_fast_prompt(render_input(prompt, response))
        answers = AnswerSteps(self._contexts, self.encode([text]), [asked_tasks(response)])
        while pending := answers.pending():
            rows = list(pending)
            values = await self._label_values([pending[r] for r in rows])
            answers.record(dict(zip(rows, values, strict=True)))
        [verdict] = answers.verdicts()
        return fast_result(verdict)

    async def _label_values(self, steps: Sequence[LabelStep]) -> list[dict[str, float]]:
        outputs = await asyncio.gather(
            *(self._request(ids, step_params(candidates)) for ids, candidates in steps)
        )
        return [step_values(o, c) for o, (_, c) in zip(outputs, steps, strict=True)]

    async def _request(self, prompt_ids: list[int], params: Any) -> Any:
        """One engine request's final output (cancelling this aborts it inside vLLM)."""
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for output in self.engine.generate(
            {"prompt_token_ids": prompt_ids},
            params,
            request_id=uuid.uuid4().hex,
            lora_request=self.lora,
        ):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError("the engine returned no output")
        return final

    def _enter(self, n: int) -> None:
        if self._pending == 0:
            self._busy_since = time.perf_counter()
        self._pending += n
        self._peak = max(self._peak, self._pending)

    def _leave(self, n: int) -> None:
        self._pending -= n
        if self._pending == 0 and self._busy_since is not None:
            self._busy_s += time.perf_counter() - self._busy_since
            self._busy_since = None

    def stats(self) -> dict[str, Any]:
        """Counters for /health, under the batcher's names where they mean the same."""
        running = 0 if self.engine is None else self.engine.get_num_unfinished_requests()
        return {
            "engine": "vllm-async (continuous batching across requests)",
            "items": self._counts["items"],
            "generated_tokens": self._counts["generated_tokens"],
            "running_requests": running,
            "busy_s": round(self._busy_s, 3),
            "queued_items": self._pending,
            "most_items_at_once": self._peak,
            "requests": self._counts["requests"],
            "timeouts": self._counts["timeouts"],
            "rejected_requests": self._counts["rejected_requests"],
            "failed_items": self._counts["failed_items"],
        }
