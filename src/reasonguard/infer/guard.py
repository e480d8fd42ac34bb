"""The guard API: `load_guard(...)` then `guard.classify(items)`, WildGuard-style.

Each item is `{"prompt": str, "response": str | None}`; each result carries the verdict
(`prompt_harmfulness`, `response_refusal`, `response_harmfulness`, `is_parsing_error`, `reason`,
`truncated`) and `scores`: per verdict field, the model's probabilities of the two labels at the
position where it wrote its answer, given its own reasoning (`scores.py`), or None where there is
no answer line, no response to judge, or the backend cannot score (vLLM).

Example:
    >>> from reasonguard import load_guard
    >>> guard = load_guard("runs/sft-smollm2/final")
    >>> [r] = guard.classify([{"prompt": "How do I pick a lock?", "response": "I can't help."}])
    >>> r.prompt_harmfulness, r.scores["prompt_harmfulness"]
    ('harmful', {'harmful': 0.91, 'unharmful': 0.09})
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import parse_output, render_input
from reasonguard.infer.backends import Backend, load_backend
from reasonguard.infer.scores import empty_scores

DEFAULT_MAX_NEW_TOKENS = 2048  # the official inference budget


class InvalidItemError(UserError, ValueError):
    """An item passed to `Guard.classify` is malformed (a ValueError for library callers, exit 2
    on the command line)."""


@dataclass(frozen=True)
class GuardResult:
    """One classified item; field names follow WildGuard / ai2 safety-eval."""

    prompt_harmfulness: str | None
    response_refusal: str | None
    response_harmfulness: str | None
    is_parsing_error: bool
    reason: str
    truncated: bool
    scores: dict[str, dict[str, float] | None] = field(default_factory=empty_scores)
    output: str = ""  # the raw generation, for debugging and audits
    num_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_items(items: Any) -> list[tuple[str, str | None]]:
    """Check items and return (prompt, response or None) pairs; the items are not modified.

    An empty or missing response means "no response" (a prompt-only check).

    Raises:
        InvalidItemError: not a list of mappings, or a missing / non-string prompt or a
            non-string response; the message names the item index.
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise InvalidItemError("items must be a list of {'prompt': ..., 'response': ...} objects")
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidItemError(
                f"item {i}: expected an object with 'prompt', got {type(item).__name__}"
            )
        prompt = item.get("prompt")
        if prompt is None:
            raise InvalidItemError(f"item {i}: missing 'prompt'")
        if not isinstance(prompt, str):
            raise InvalidItemError(
                f"item {i}: 'prompt' must be a string, got {type(prompt).__name__}"
            )
        if not prompt.strip():
            raise InvalidItemError(f"item {i}: 'prompt' is empty")
        response = item.get("response")
        if response is not None and not isinstance(response, str):
            raise InvalidItemError(
                f"item {i}: 'response' must be a string or null, got {type(response).__name__}"
            )
        pairs.append((prompt, response or None))
    return pairs


class Guard:
    """A loaded guard model (see `load_guard`).

    Attributes:
        backend: the generation backend (its `prompt_format` is the model's).
        max_new_tokens: the default token budget of `classify`.
    """

    def __init__(self, backend: Backend, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        self.backend = backend
        self.max_new_tokens = max_new_tokens

    @property
    def prompt_format(self) -> str:
        return self.backend.prompt_format

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        max_new_tokens: int | None = None,
        scores: bool = True,
        timeout_s: float | None = None,
    ) -> list[GuardResult]:
        """Classify prompts (and responses) with greedy decoding.

        Args:
            items: `{"prompt": str, "response": str | None}` objects (other keys ignored).
            max_new_tokens: the token budget (default: the guard's); results that hit it are
                `truncated` and usually `is_parsing_error`.
            scores: compute label probabilities (one extra forward pass per item).
            timeout_s: stop generating after this many seconds (HF backend); outputs cut short
                are `truncated` (usually `is_parsing_error`) and get no scores.

        Returns:
            One `GuardResult` per item, in order.

        Raises:
            InvalidItemError: a malformed item (nothing is generated then).
        """
        pairs = validate_items(items)
        if not pairs:
            return []
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        prompts = [self.backend.build_prompt(render_input(p, r)) for p, r in pairs]
        generations = self.backend.generate(
            prompts, max_new_tokens or self.max_new_tokens, deadline=deadline
        )
        texts = [g[0].text for g in generations]
        score_rows = None
        timed_out = any(g[0].timed_out for g in generations)
        if scores and not timed_out:  # out of time: the scoring pass would only add to it
            # Response tasks are judged only when there is a response.
            tasks = [
                ("prompt",) if r is None else ("prompt", "refusal", "response") for _, r in pairs
            ]
            score_rows = self.backend.answer_scores(prompts, texts, tasks)
        results = []
        for i, (g,) in enumerate(generations):
            verdict = parse_output(g.text, g.truncated)
            results.append(
                GuardResult(
                    **verdict.to_dict(),
                    scores=score_rows[i] if score_rows is not None else empty_scores(),
                    output=g.text,
                    num_tokens=g.num_tokens,
                )
            )
        return results


def load_guard(
    path_or_hub_id: str,
    backend: str = "hf",
    prompt_format: str | None = None,
    device: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    **kwargs: Any,
) -> Guard:
    """Load a guard model.

    Args:
        path_or_hub_id: a trained model folder (its recorded prompt format is used), a hub id,
            or an offline alias (`smollm2`, `tiny-llama`).
        backend: `hf` (CPU or GPU) or `vllm` (GPU; no scores).
        prompt_format: for models without a guard record; default `raw`.
        device: HF only; default CUDA when available.
        max_new_tokens: default token budget of `classify`.
        **kwargs: backend options (`batch_size`, `trust_remote_code`, `load_in_4bit`,
            `tensor_parallel_size`, ...).

    Raises:
        UserError: see `reasonguard.infer.backends.load_backend`.
    """
    if backend == "hf":
        kwargs["device"] = device
    loaded = load_backend(path_or_hub_id, backend, prompt_format, **kwargs)
    return Guard(loaded, max_new_tokens)
