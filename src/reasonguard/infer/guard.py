"""The guard API: `load_guard(...)` then `guard.classify(items)`, WildGuard-style.

Each item is `{"prompt": str, "response": str | None}`; each result carries the verdict
(`prompt_harmfulness`, `response_refusal`, `response_harmfulness`, `is_parsing_error`, `reason`,
`truncated`) and `scores`: per verdict field, the model's probabilities of the two labels at the
position where it wrote its answer, given its own reasoning (`scores.py`), or None where there is
no answer line or no response to judge.

Three modes: `reasoning` (the guard reasons, then answers: the paper's way), `fast` (the answer
block is forced right after the prompt and the labels read from its probabilities, no reasoning:
`fast.py`), and `cascade` (fast first, reasoning for the items inside the calibrated uncertainty
band: `reasonguard.cascade`). With an encoder classifier in front
(`load_guard(model, classifier=folder)`), `cascade` has three tiers: the classifier, then fast
mode, then reasoning (`cascade/tiers.py`), and mode `classifier` is the classifier alone. Each
result says which mode produced its verdict (`mode`) and which tier answered (`tier`:
`classifier`, `fast` or `reasoning`).

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
from pathlib import Path
from typing import Any

from reasonguard.cascade.bands import MODES, Bands, escalate, read_bands
from reasonguard.cascade.tiers import Cascade, Tier
from reasonguard.errors import UserError
from reasonguard.format import TASK_FIELD, parse_output, render_input
from reasonguard.infer.backends import Backend, Generation
from reasonguard.infer.classifier import check_classifier_tier, check_model_mode
from reasonguard.infer.loading import load_backend
from reasonguard.infer.scores import empty_scores
from reasonguard.models import resolve_model

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
    mode: str = "reasoning"  # what produced the verdict: `reasoning`, `fast` or `classifier`
    tier: str = "reasoning"  # the cascade tier that answered (one mode alone: that mode)

    def label(self, task: str) -> str | None:
        """The verdict's label for a task name in `reasonguard.format.TASKS`."""
        return getattr(self, TASK_FIELD[task])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_items(items: Any) -> list[tuple[str, str | None]]:
    """Check items and return (prompt, response or None) pairs; the items are not modified.

    An empty or missing response means "no response" (a prompt-only check).

    Raises:
        InvalidItemError: not a list of mappings, or a missing / non-string prompt or a
            non-string response; the message names the item index (from 0, as in Python).
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise InvalidItemError("items must be a list of {'prompt': ..., 'response': ...} objects")
    return [check_item(item, f"item {i}") for i, item in enumerate(items)]


def check_item(item: Any, place: str) -> tuple[str, str | None]:
    """Check one item and return its (prompt, response or None) pair.

    Args:
        place: where the item is, for the message (`item 3`, or `items.jsonl:4`).

    Raises:
        InvalidItemError: `place: what is wrong`.
    """
    if not isinstance(item, Mapping):
        raise InvalidItemError(
            f"{place}: expected an object with 'prompt', got {type(item).__name__}"
        )
    prompt = item.get("prompt")
    if prompt is None:
        raise InvalidItemError(f"{place}: missing 'prompt'")
    if not isinstance(prompt, str):
        raise InvalidItemError(f"{place}: 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidItemError(f"{place}: 'prompt' is empty")
    response = item.get("response")
    if response is not None and not isinstance(response, str):
        raise InvalidItemError(
            f"{place}: 'response' must be a string or null, got {type(response).__name__}"
        )
    return prompt, response or None


def asked_tasks(response: str | None) -> tuple[str, ...]:
    """The tasks an item asks: the response tasks only when there is a response."""
    return ("prompt",) if response is None else ("prompt", "refusal", "response")


def read_verdict(text: str, truncated: bool, has_response: bool) -> dict[str, Any]:
    """The verdict fields of a guard output (`format.parse_output`), without response labels
    for a prompt alone: a model that writes "Completion: compliance" there answers a question
    nobody asked."""
    verdict = parse_output(text, truncated).to_dict()
    if not has_response:
        verdict.update(response_refusal=None, response_harmfulness=None)
    return verdict


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


class Guard:
    """A loaded guard model (see `load_guard`).

    Attributes:
        backend: the generation backend (its `prompt_format` is the model's).
        max_new_tokens: the default token budget of `classify`.
        mode: the default mode of `classify` (`reasoning`, `fast` or `cascade`; `classifier`
            for an encoder classifier, its only mode; `cascade` with a classifier in front).
        bands: the cascade's uncertainty bands (the model's calibrated ones by default).
        classifier: the classifier guard in front (the first tier of `cascade`), or None.
        classifier_bands: the classifier tier's bands (from `reasonguard calibrate
            --classifier`).
    """

    def __init__(
        self,
        backend: Backend,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        mode: str | None = None,
        bands: Bands | None = None,
        classifier: Guard | None = None,
        classifier_bands: Bands | None = None,
    ) -> None:
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.classifier = classifier
        self.classifier_bands = classifier_bands
        self.mode = self._check_mode(mode or ("cascade" if classifier else backend.modes[0]))
        self.bands = bands

    def _check_mode(self, mode: str) -> str:
        check_mode(mode)
        if mode not in self.modes:
            raise UserError(
                f"{self.backend.name}: mode {mode!r} is not one of this guard's modes "
                f"({', '.join(self.modes)})"
            )
        return mode

    @property
    def prompt_format(self) -> str:
        return self.backend.prompt_format

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes `classify` accepts (a classifier's: `classifier` alone; with a classifier
        in front, `classifier` too)."""
        return self.backend.modes + (("classifier",) if self.classifier is not None else ())

    def tiers(self, bands: Bands | None = None) -> Cascade:
        """The three-tier cascade of a guard with a classifier in front: classifier, fast,
        reasoning (`bands`: the fast tier's, default the guard's)."""
        if self.classifier is None:
            raise UserError(f"{self.backend.name}: no classifier in front of this guard")
        return Cascade(
            [
                Tier("classifier", self.classifier, bands=self.classifier_bands),
                Tier("fast", self, bands=bands or self.bands),
                Tier("reasoning", self),
            ]
        )

    @property
    def supports_fast(self) -> bool:
        """Whether the backend has fast mode (and so the cascade)."""
        return self.backend.supports_fast

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        max_new_tokens: int | None = None,
        scores: bool = True,
        timeout_s: float | None = None,
        mode: str | None = None,
        bands: Bands | None = None,
    ) -> list[GuardResult]:
        """Classify prompts (and responses).

        Args:
            items: `{"prompt": str, "response": str | None}` objects (other keys ignored).
            max_new_tokens: the reasoning token budget (default: the guard's); results that hit
                it are `truncated` and usually `is_parsing_error`.
            scores: reasoning mode: compute label probabilities (one extra forward pass per
                item). Fast mode always has them: they are its verdict.
            timeout_s: stop generating after this many seconds (HF backend); outputs cut short
                are `truncated` (usually `is_parsing_error`) and get no scores.
            mode: `reasoning`, `fast` or `cascade`; a classifier's `classifier` (default: the
                guard's `mode`, one of `modes`).
            bands: the cascade's bands (default: the guard's, from `reasonguard calibrate`).

        Returns:
            One `GuardResult` per item, in order.

        Raises:
            InvalidItemError: a malformed item (nothing is generated then).
            UserError: an unknown mode, or a cascade without bands.
        """
        mode = self._check_mode(mode or self.mode)
        pairs = validate_items(items)
        if not pairs:
            return []
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if mode == "reasoning":
            return self._reason(pairs, max_new_tokens, scores, timeout_s)
        if self.classifier is not None and mode in ("classifier", "cascade"):
            if mode == "classifier":
                return self.classifier.classify(items)
            return self.tiers(bands).classify(items, scores, max_new_tokens, timeout_s)
        if mode == "cascade" and (bands or self.bands) is None:
            raise UserError(
                f"{self.backend.name}: the cascade needs uncertainty bands; run "
                "`reasonguard calibrate` on a labelled dev set first, or pass bands"
            )
        fast = self._fast(pairs, "classifier" if mode == "classifier" else "fast")
        if mode in ("fast", "classifier"):
            return fast
        chosen = bands or self.bands
        hard = [
            i
            for i, (r, (_, resp)) in enumerate(zip(fast, pairs, strict=True))
            if escalate(r.scores, asked_tasks(resp), chosen)
        ]
        if hard:
            reasoned = self._reason([pairs[i] for i in hard], max_new_tokens, scores, timeout_s)
            for i, result in zip(hard, reasoned, strict=True):
                fast[i] = result
        return fast

    def _fast(self, pairs: list[tuple[str, str | None]], mode: str = "fast") -> list[GuardResult]:
        prompts = [self.backend.build_fast_prompt(render_input(p, r)) for p, r in pairs]
        verdicts = self.backend.fast_verdicts(prompts, [asked_tasks(r) for _, r in pairs])
        return [fast_result(v, mode) for v in verdicts]

    def _reason(
        self,
        pairs: list[tuple[str, str | None]],
        max_new_tokens: int | None,
        scores: bool,
        timeout_s: float | None,
    ) -> list[GuardResult]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        prompts = [self.backend.build_prompt(render_input(p, r)) for p, r in pairs]
        generations = self.backend.generate(
            prompts, max_new_tokens or self.max_new_tokens, deadline=deadline, with_scores=scores
        )
        texts = [g[0].text for g in generations]
        score_rows = None
        timed_out = any(g[0].timed_out for g in generations)
        if scores and not timed_out:  # out of time: the scoring pass would only add to it
            tasks = [asked_tasks(r) for _, r in pairs]
            score_rows = self.backend.answer_scores(prompts, texts, tasks)
        return [
            reasoning_result(g, pairs[i][1] is not None, score_rows[i] if score_rows else None)
            for i, (g,) in enumerate(generations)
        ]


def fast_result(verdict: Any, mode: str = "fast") -> GuardResult:
    """The result of one fast verdict (`fast.FastVerdict`; also used by streaming and the
    server's vLLM engine, and for a classifier's verdict, `mode="classifier"`)."""
    return GuardResult(
        **(parse_output(verdict.text).to_dict() | {"reason": ""}),
        scores=verdict.scores,
        output=verdict.text,
        num_tokens=0,
        mode=mode,
        tier=mode,
    )


def reasoning_result(
    generation: Generation, has_response: bool, scores: dict[str, Any] | None = None
) -> GuardResult:
    """The verdict of one reasoning generation (also used by the server's vLLM engine)."""
    return GuardResult(
        **read_verdict(generation.text, generation.truncated, has_response),
        scores=scores if scores is not None else empty_scores(),
        output=generation.text,
        num_tokens=generation.num_tokens,
    )


def load_guard(
    path_or_hub_id: str,
    backend: str = "hf",
    prompt_format: str | None = None,
    device: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    mode: str | None = None,
    bands: Bands | None = None,
    classifier: str | None = None,
    classifier_bands: Bands | None = None,
    **kwargs: Any,
) -> Guard:
    """Load a guard model.

    Args:
        path_or_hub_id: a trained model folder (its recorded prompt format is used), a hub id,
            an offline alias (`smollm2`, `tiny-llama`), or a classifier folder from
            `reasonguard train classifier` (mode `classifier`: `infer/classifier.py`).
        backend: `hf` (CPU or GPU) or `vllm` (GPU, or an x86 CPU with vLLM's CPU build); both
            give scores and every mode.
        prompt_format: for models without a guard record; default `raw`.
        device: HF only; default CUDA when available.
        max_new_tokens: default token budget of `classify`.
        mode: default mode of `classify`: `reasoning` (the default), `fast` (no reasoning: the
            answer block's label probabilities) or `cascade` (fast, then reasoning inside the
            uncertainty bands); a classifier's is `classifier`.
        bands: the cascade's bands; default: the model folder's `cascade.json` (written by
            `reasonguard calibrate`), if any.
        classifier: a classifier folder from `reasonguard train classifier`, put in front of
            the guard: mode `cascade` (then the default) is classifier, fast, reasoning, with
            the classifier tier's bands from the `cascade.json` that `reasonguard calibrate
            --classifier` wrote; mode `classifier` the classifier alone.
        classifier_bands: the classifier tier's bands, instead of the calibrated ones.
        **kwargs: backend options (`batch_size`, `trust_remote_code`, `load_in_4bit`,
            `tensor_parallel_size`, ...).

    Raises:
        UserError: see `reasonguard.infer.loading.load_backend`.
    """
    if backend == "hf":
        kwargs["device"] = device
    path = resolve_model(path_or_hub_id)
    if mode is not None:
        check_mode(mode)
        if classifier is None or mode != "classifier":
            check_model_mode(path_or_hub_id, path, mode)  # before the weights load
    if bands is None:
        # Read before the weights load, so a cascade without bands fails in a moment.
        bands = read_bands(path) if Path(path).is_dir() else None
    if classifier is not None:
        classifier_bands = check_classifier_tier(
            path_or_hub_id, path, classifier, mode or "cascade", classifier_bands
        )
    if (mode or ("cascade" if classifier else None)) == "cascade" and bands is None:
        raise UserError(
            f"{path_or_hub_id}: no calibrated cascade (cascade.json); run `reasonguard calibrate "
            f"--model {path_or_hub_id} --data DEV` first, or pass `bands`"
        )
    first = None
    if classifier is not None:
        first = load_guard(classifier, device=device, threads=kwargs.get("threads"))
    # vLLM sizes its engine's context for the budget.
    loaded = load_backend(
        path_or_hub_id, backend, prompt_format, max_new_tokens=max_new_tokens, **kwargs
    )
    return Guard(loaded, max_new_tokens, mode, bands, first, classifier_bands)
