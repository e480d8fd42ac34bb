"""Fast verdicts of one text that grows between checks (a streamed response), keeping state.

A streamed response is judged again after each chunk. A check is a fast verdict (`fast.py`): the
guard prompt of the text so far, then the forced answer block, read one answer at a time. What
differs from one check to the next is only the end of the prompt: the new chunk, and what comes
after the response in the prompt (`render_input`'s closing blank line, a chat template's
end-of-turn) and the answer block. So a backend keeps the item's state between checks:

- `CachedStream` (HF): the KV cache of the last check's tokens. The next check's prompt is
  tokenized in full (tokenizer work, no model), the cache is cropped to the tokens the two
  share (`DynamicCache.crop`: the answer block and the prompt's closing tokens are rolled back,
  and a chunk boundary that the tokenizer now merges differently), and only the rest is fed. A
  check costs the new chunk's tokens plus the prompt's closing tokens and the answer block; the
  first check starts from the shared instruction's cache (`fast.SharedPrefix`).
- `RecomputingStream` (any backend with `fast_verdicts`): each check is a fresh fast verdict
  of the whole prompt. On vLLM, automatic prefix caching finds the blocks of the earlier check
  itself, so this is the vLLM streaming path as soon as its backend has fast verdicts; on the
  HF backend it is the from-scratch reference the cached stream is measured against.

Both read the same forced contexts and choose labels the same way as `fast.fast_verdicts`
(`format.forced_answer_context`, `scores.label_candidates`), so the last check of a stream is
the non-streaming fast verdict of the whole response.

Why our own code: transformers keeps a cache for generation, not for a prompt that is re-read
with a different ending; what to crop and what to feed is ours.

Example:
    >>> stream = backend.open_fast_stream()
    >>> check = stream.check(backend.build_fast_prompt(render_input("hi", "Hello")), TASKS)
    >>> check.verdict.scores["response_harmfulness"], check.computed, check.from_scratch
    >>> stream.close()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reasonguard.format import TASK_FIELD, TASK_LABELS, forced_answer_context, render_answers
from reasonguard.infer.fast import FastVerdict, SharedPrefix, steps_for
from reasonguard.infer.scores import empty_scores, label_candidates, normalised


@dataclass(frozen=True)
class StreamCheck:
    """One check of a stream.

    Attributes:
        verdict: the fast verdict of the text so far.
        computed: tokens this check ran through the model (None where the backend does not
            say: vLLM's prefix cache decides for itself).
        from_scratch: tokens the same check runs with nothing kept from earlier checks: the
            prompt after the shared instruction (which every fast verdict reuses) plus the
            forced answer block.
    """

    verdict: FastVerdict
    computed: int | None
    from_scratch: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


Contexts = dict[tuple, Any]  # (task, labels chosen before) -> `label_candidates`' answer


def _context(tokenizer: Any, contexts: Contexts, task: str, chosen: dict[str, str | None]) -> Any:
    """The forced context before `task`'s label and the label tokens (cached: a stream repeats
    a handful of contexts)."""
    key = (task, *sorted(chosen.items()))
    if key not in contexts:
        context = forced_answer_context(task, chosen)
        contexts[key] = label_candidates(tokenizer, context, TASK_LABELS[task])
    return contexts[key]


def read_block(
    tokenizer: Any,
    prompt_ids: Sequence[int],
    tasks: Sequence[str],
    logits_after: Callable[[list[int]], Any],
    contexts: Contexts | None = None,
) -> tuple[FastVerdict, int]:
    """The forced answer block after one prompt, one answer at a time (as `fast.fast_verdicts`
    reads each row): `logits_after(ids)` gives the next-token logits after `ids`. Returns the
    verdict and the length of the longest sequence read."""
    contexts = {} if contexts is None else contexts
    chosen: dict[str, str | None] = {}
    scores = empty_scores()
    longest = len(prompt_ids)
    for task in steps_for(tasks):
        found = _context(tokenizer, contexts, task, chosen)
        if found is None:  # the tokenizer cannot tell the labels apart at one position
            continue
        context, candidates = found
        target = list(prompt_ids) + list(context)
        logits = logits_after(target)
        labels = list(candidates)
        probs = normalised([logits[candidates[label]].item() for label in labels], labels)
        chosen[task] = max(labels, key=lambda label: probs[label])
        if task in tasks:
            scores[TASK_FIELD[task]] = probs
        longest = max(longest, len(target))
    labels = {task: chosen.get(task) for task in steps_for(tasks)}
    text = render_answers(labels.get("prompt"), labels.get("refusal"), labels.get("response"))
    return FastVerdict(labels=labels, scores=scores, text=text), longest


def _block_length(
    tokenizer: Any, contexts: Contexts, prompt_ids: Sequence[int], verdict: FastVerdict
) -> int:
    """The longest sequence a fast verdict of `prompt_ids` read, given the labels it chose."""
    longest, chosen = len(prompt_ids), {}
    for task, label in verdict.labels.items():
        found = _context(tokenizer, contexts, task, chosen)
        if found is not None:
            longest = max(longest, len(prompt_ids) + len(found[0]))
        chosen[task] = label
    return longest


class CachedStream:
    """A stream on an HF causal LM: one item's KV cache kept between checks (see the module
    docstring).

    Args:
        model: the causal LM in eval mode.
        tokenizer: its tokenizer (the forced contexts).
        encode: prompt text -> token ids, as the backend encodes prompts.
        device: where `model` is.
        prefix: the shared instruction's cache, or None.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        encode: Callable[[str], list[int]],
        device: str,
        prefix: SharedPrefix | None = None,
    ) -> None:
        self.model, self.tokenizer, self.encode = model, tokenizer, encode
        self.device, self.prefix = device, prefix
        self.ids: list[int] = []  # the tokens held in `cache`
        self.cache: Any = None
        self.shared = 0  # leading tokens taken from the shared instruction's cache
        self.computed = 0  # tokens run through the model over the stream's life
        self.contexts: Contexts = {}

    def check(self, prompt: str, tasks: Sequence[str]) -> StreamCheck:
        """The fast verdict of `prompt` (the guard's fast prompt of the text so far)."""
        before = self.computed
        verdict, longest = read_block(
            self.tokenizer, self.encode(prompt), tasks, self._logits, self.contexts
        )
        return StreamCheck(verdict, self.computed - before, longest - self.shared)

    def _logits(self, target: list[int]) -> Any:
        """Next-token logits after `target`: crop the cache to what it shares with `target`,
        feed the rest (at least the last token, whose logits are read)."""
        import torch

        if self.cache is None and self.prefix is not None:
            self.shared = self.prefix.length([target])
            if self.shared:
                self.cache = self.prefix.cache_for(self.shared, 1, self.device)
                self.ids = list(self.prefix.reference[: self.shared])
        keep = min(_common_prefix(self.ids, target), len(target) - 1)
        if self.cache is not None and keep < len(self.ids):
            self.cache.crop(keep - len(self.ids))  # a negative count: tokens removed at the end
        new = target[keep:]
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([new], device=self.device),
                past_key_values=self.cache,
                cache_position=torch.arange(keep, keep + len(new), device=self.device),
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache, self.ids = out.past_key_values, list(target)
        self.computed += len(new)
        return out.logits[0, -1].float().cpu()

    def close(self) -> None:
        """Drop the cache (its memory is freed once nothing else holds it)."""
        self.cache, self.ids = None, []


class RecomputingStream:
    """A stream on any backend with `fast_verdicts` and `encode`: every check is a fresh fast
    verdict of the whole prompt (see the module docstring: on vLLM the prefix cache keeps the
    state).

    Args:
        backend: the backend.
        prefix: the shared instruction's cache the backend's fast verdicts reuse, if any (for
            `from_scratch`).
    """

    def __init__(self, backend: Any, prefix: SharedPrefix | None = None) -> None:
        self.backend, self.prefix = backend, prefix
        self.contexts: Contexts = {}

    def check(self, prompt: str, tasks: Sequence[str]) -> StreamCheck:
        [verdict] = self.backend.fast_verdicts([prompt], [tuple(tasks)])
        ids = self.backend.encode([prompt])[0]
        longest = _block_length(self.backend.tokenizer, self.contexts, ids, verdict)
        shared = self.prefix.length([ids]) if self.prefix is not None else 0
        return StreamCheck(verdict, None, longest - shared)

    def close(self) -> None:
        pass
