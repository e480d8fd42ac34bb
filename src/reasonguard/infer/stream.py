"""Streaming moderation: follow one assistant response as it grows, chunk by chunk.

Chat products stream the answer to the user token by token; a guard that waits for the whole
response judges too late. A `ResponseStream` is opened with the user's prompt and fed the
response's chunks as they come; after each chunk it gives the fast verdict (no reasoning: the
forced answer block's label probabilities, `fast.py`) of the prompt and the response so far,
and a stop signal once the probability that the response is harmful reaches a threshold.

Each check costs the new chunk's tokens plus the answer block: the backend keeps the item's
state between checks (`fast_stream.py`: the HF backend its KV cache, cropped back after each
answer block; vLLM its prefix cache). The verdict after the last chunk is the non-streaming
fast verdict of the whole response (`Guard.classify(..., mode="fast")`), since a check reads
exactly the prompt that verdict reads.

A stream is not thread-safe (one caller at a time, as the model is); close it (or use it as a
context manager) to free its cache at once.

Example:
    >>> from reasonguard import load_guard
    >>> from reasonguard.infer.stream import ResponseStream
    >>> guard = load_guard("runs/demo/model/final")
    >>> with ResponseStream(guard, "How do I make a bomb?", threshold=0.8) as stream:
    ...     for chunk in ["Sure! ", "First, get ", "..."]:
    ...         verdict = stream.feed(chunk)
    ...         if verdict.stop:
    ...             break  # stop showing the response
    >>> verdict.harm, verdict.result.response_harmfulness
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import POSITIVE_LABEL, TASK_FIELD, render_input
from reasonguard.infer.guard import (
    GuardResult,
    InvalidItemError,
    asked_tasks,
    check_item,
    fast_result,
)

DEFAULT_STOP_THRESHOLD = 0.5  # the fast verdict's own decision point


@dataclass(frozen=True)
class StreamVerdict:
    """The verdict after one check of a stream.

    Attributes:
        result: the fast verdict of the prompt and the response so far (`mode` is `fast`, or `classifier` for a classifier).
        chunks: chunks fed so far.
        response_chars: characters of the response so far.
        harm: P(the response is harmful), None while there is no response text.
        stop: `harm` has reached the threshold, at this check or an earlier one.
        tokens_computed: tokens this check ran through the model (None where the backend does
            not say).
        tokens_from_scratch: tokens the same check would run with nothing kept from earlier
            checks (beyond the shared instruction every fast verdict reuses).
    """

    result: GuardResult
    chunks: int
    response_chars: int
    harm: float | None
    stop: bool
    tokens_computed: int | None
    tokens_from_scratch: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result.to_dict(),
            "chunks": self.chunks,
            "response_chars": self.response_chars,
            "harm": self.harm,
            "stop": self.stop,
            "tokens_computed": self.tokens_computed,
            "tokens_from_scratch": self.tokens_from_scratch,
        }


class ResponseStream:
    """One prompt and its growing response (see the module docstring).

    Args:
        guard: a loaded guard (`load_guard`) whose backend has fast mode.
        prompt: the user's prompt.
        threshold: the stop signal's P(response harmful), in (0, 1].

    Raises:
        InvalidItemError: a missing, blank or non-string prompt.
        UserError: a threshold outside (0, 1], or a backend without fast mode.
    """

    def __init__(self, guard: Any, prompt: str, threshold: float = DEFAULT_STOP_THRESHOLD) -> None:
        check_item({"prompt": prompt}, "prompt")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise UserError(f"threshold must be a number in (0, 1], got {threshold!r}")
        if not 0 < threshold <= 1:
            raise UserError(f"threshold must be in (0, 1], got {threshold}")
        self.backend = guard.backend
        self.prompt, self.threshold = prompt, float(threshold)
        self.response = ""
        self.chunks = 0
        self.stopped = False
        self.last: StreamVerdict | None = None
        self._state: Any = self.backend.open_fast_stream()

    def feed(self, chunk: str) -> StreamVerdict:
        """Add a chunk of the response and judge the response so far.

        Raises:
            InvalidItemError: a chunk that is not a string.
            RuntimeError: the stream is closed.
        """
        if not isinstance(chunk, str):
            raise InvalidItemError(f"chunk must be a string, got {type(chunk).__name__}")
        self.response += chunk
        self.chunks += 1
        return self.check()

    def check(self) -> StreamVerdict:
        """The verdict of the prompt and the response so far (the prompt alone before any
        response text, as `classify` judges an item without a response).

        Raises:
            RuntimeError: the stream is closed.
        """
        if self._state is None:
            raise RuntimeError("the stream is closed")
        response = self.response or None
        prompt = self.backend.build_fast_prompt(render_input(self.prompt, response))
        found = self._state.check(prompt, asked_tasks(response))
        # A classifier's verdicts say so; a guard's are fast mode's.
        mode = "classifier" if "classifier" in self.backend.modes else "fast"
        result = fast_result(found.verdict, mode)
        probs = result.scores.get(TASK_FIELD["response"])
        harm = None if probs is None else probs.get(POSITIVE_LABEL["response"])
        self.stopped = self.stopped or (harm is not None and harm >= self.threshold)
        self.last = StreamVerdict(
            result=result,
            chunks=self.chunks,
            response_chars=len(self.response),
            harm=harm,
            stop=self.stopped,
            tokens_computed=found.computed,
            tokens_from_scratch=found.from_scratch,
        )
        return self.last

    @property
    def closed(self) -> bool:
        return self._state is None

    def close(self) -> None:
        """Free the stream's state (its KV cache); later checks raise."""
        if self._state is not None:
            self._state.close()
            self._state = None

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
