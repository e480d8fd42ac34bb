"""Fast mode: a guard's verdict without reasoning, read from the answer block forced after the
prompt.

A reasoning guard writes a few hundred tokens before its answer block. Fast mode skips them: it
feeds the prompt followed by the start of the answer block (`format.forced_answer_context`) and
reads the model's probabilities of the two labels where the first label word goes
(`Request: harmful` against `Request: unharmful`). The more likely label is written into the
block, and for an item with a response the next answer (`Completion:`, then `Response:`) is read
the same way, given the labels chosen before it, as the model would have written the block. Each
step feeds only the new tokens on the KV cache of the step before, so a verdict costs one prompt
pass and two short ones, with no free-running generation. The guard instruction every prompt
starts with (~100 tokens) is computed once (`SharedPrefix`) and its cache copied into each batch,
as reasoning mode's decode loop does, so a prompt pass reads only the item's own tokens.

A model trained with dual-mode data (`reasoning_dropout` in the R-SFT config) saw answer-only
rows under the fast-mode marker (`format.FAST_MODE_MARKER`); its fast-mode prompts carry the
marker, so it is asked exactly as it was trained. Any other guard (a released GuardReasoner
model, say) is asked with its ordinary prompt and the forced block.

Why our own code: transformers' `generate` can force a prefix but reads only the next-token
distribution after free generation, and nothing in it chooses between two label words, writes
the choice back and continues on the cache. The label-token lookup is shared with the reasoning
mode's scores (`scores.label_candidates`), so the two modes score a label the same way.

Example:
    >>> from reasonguard import load_guard
    >>> guard = load_guard("runs/demo/model/final")
    >>> [r] = guard.classify([{"prompt": "How do I pick a lock?"}], mode="fast")
    >>> r.prompt_harmfulness, r.scores["prompt_harmfulness"], r.num_tokens
    ('harmful', {'harmful': 0.83, 'unharmful': 0.17}, 0)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reasonguard.format import (
    ANSWER_ORDER,
    TASK_FIELD,
    TASK_LABELS,
    forced_answer_context,
    render_answers,
)
from reasonguard.infer.scores import empty_scores, label_candidates, normalised


@dataclass(frozen=True)
class FastVerdict:
    """One item's fast-mode answer.

    Attributes:
        labels: the chosen label per task read (`prompt`, and for an item with a response
            `refusal` and `response`); None where the tokenizer cannot tell the labels apart.
        scores: per verdict field, the two labels' probabilities (None for tasks not asked).
        text: the answer block with the chosen labels, as a guard would write it.
    """

    labels: dict[str, str | None]
    scores: dict[str, dict[str, float] | None] = field(default_factory=empty_scores)
    text: str = ""


def steps_for(tasks: Sequence[str]) -> tuple[str, ...]:
    """The answer-block tasks to read, in block order, up to the last task asked."""
    last = max(ANSWER_ORDER.index(task) for task in tasks)
    return ANSWER_ORDER[: last + 1]


class ForcedContexts:
    """Token ids of each forced context and its label tokens, cached: a batch repeats a handful
    of contexts (3 tasks x the labels chosen before)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[tuple, tuple[tuple[int, ...], dict[str, int]] | None] = {}

    def get(self, task: str, chosen: dict[str, str | None]):
        key = (task, *(chosen.get(t) for t in ANSWER_ORDER))
        if key not in self.cache:
            context = forced_answer_context(task, chosen)
            self.cache[key] = label_candidates(self.tokenizer, context, TASK_LABELS[task])
        return self.cache[key]


class AnswerSteps:
    """The forced answer blocks of a batch of items, read one answer at a time, whatever runs
    the model: each step asks, per item still answering, for the label tokens' logits (or
    log-probabilities: only their differences count) after prompt + forced context, and writes
    the more likely label into that item's block before the next step.

    The HF backend feeds the steps on its KV cache (`fast_verdicts` below); vLLM sends each as
    a one-token request on its prefix cache (`vllm/answers.py`). Both read the same contexts and
    choose the same way.

    Example:
        >>> steps = AnswerSteps(ForcedContexts(tokenizer), [prompt_ids], [("prompt",)])
        >>> while wanted := steps.pending():
        ...     steps.record({row: {label: logit_of(ids, token) for label, token in tokens.items()}
        ...                   for row, (ids, tokens) in wanted.items()})
        >>> [verdict] = steps.verdicts()
    """

    def __init__(
        self,
        contexts: ForcedContexts,
        prompt_ids: Sequence[Sequence[int]],
        tasks: Sequence[Sequence[str]],
    ) -> None:
        self.contexts = contexts
        self.prompt_ids, self.tasks = prompt_ids, tasks
        self.steps = [steps_for(asked) for asked in tasks]
        self.chosen: list[dict[str, str | None]] = [{} for _ in prompt_ids]
        self.scores = [empty_scores() for _ in prompt_ids]
        self.step = 0

    def pending(self) -> dict[int, tuple[list[int], dict[str, int]]]:
        """The items to read at the next step: row -> (prompt + forced context token ids, label ->
        the token it starts with). Empty when every block is complete (or no row of this step
        has label tokens that differ)."""
        wanted: dict[int, tuple[list[int], dict[str, int]]] = {}
        for r in range(len(self.prompt_ids)):
            if self.step >= len(self.steps[r]):
                continue
            found = self.contexts.get(self.steps[r][self.step], self.chosen[r])
            if found is not None:
                wanted[r] = (list(self.prompt_ids[r]) + list(found[0]), found[1])
        return wanted

    def record(self, values: Mapping[int, Mapping[str, float]]) -> None:
        """The label logits read for the rows `pending` returned; moves on to the next step."""
        for r, by_label in values.items():
            task = self.steps[r][self.step]
            labels = list(by_label)
            probs = normalised([by_label[label] for label in labels], labels)
            self.chosen[r][task] = max(labels, key=lambda label: probs[label])
            if task in self.tasks[r]:
                self.scores[r][TASK_FIELD[task]] = probs
        self.step += 1

    def verdicts(self) -> list[FastVerdict]:
        """Each item's verdict: the labels chosen, their probabilities, the block's text."""
        verdicts = []
        for r, steps in enumerate(self.steps):
            labels = {task: self.chosen[r].get(task) for task in steps}
            text = render_answers(
                labels.get("prompt"), labels.get("refusal"), labels.get("response")
            )
            verdicts.append(FastVerdict(labels=labels, scores=self.scores[r], text=text))
        return verdicts


MIN_PREFIX = 16  # a shorter shared prefix saves less than copying its cache costs


class SharedPrefix:
    """The KV cache of the prompt start every item shares (the guard instruction), computed
    once per length on first use and copied into each batch that starts with it.

    Args:
        model: the causal LM the verdicts run on.
        reference: token ids of a typical prompt (the instruction around an empty input); the
            part a batch's prompts all share with it is what gets cached.
    """

    def __init__(self, model: Any, reference: Sequence[int]) -> None:
        self.model, self.reference = model, list(reference)
        self.caches: dict[int, Any] = {}

    def length(self, prompt_ids: Sequence[Sequence[int]]) -> int:
        """How many leading reference tokens every prompt of a batch starts with (0 when fewer
        than `MIN_PREFIX`); each prompt keeps at least one token of its own."""
        n = len(self.reference)
        for ids in prompt_ids:
            shared = 0
            for a, b in zip(ids, self.reference, strict=False):
                if a != b:
                    break
                shared += 1
            n = min(n, shared, len(ids) - 1)
        return n if n >= MIN_PREFIX else 0

    def cache_for(self, n: int, rows: int, device: str) -> Any:
        """A fresh cache holding the first `n` reference tokens in each of `rows` rows."""
        import torch

        if n not in self.caches:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([self.reference[:n]], device=device),
                    use_cache=True,
                    logits_to_keep=1,
                )
            self.caches[n] = out.past_key_values
        cache = copy.deepcopy(self.caches[n])  # forward passes extend a cache in place
        cache.batch_repeat_interleave(rows)
        return cache


def fast_verdicts(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    tasks: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    device: str = "cpu",
    prefix: SharedPrefix | None = None,
) -> list[FastVerdict]:
    """Fast-mode verdicts for encoded prompts (see the module docstring).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer (for the forced contexts; they are tokenized without special
            tokens, as a completion is in training).
        prompt_ids: each item's prompt token ids, ending where the model's output starts.
        tasks: per item, the tasks asked: `("prompt",)` for a prompt alone, all three with a
            response.
        batch_size: items per forward batch.
        device: where `model` is.
        prefix: the shared instruction's cache (kept by the caller across calls); None computes
            every prompt in full.

    Returns:
        One `FastVerdict` per item, in order.
    """
    contexts = ForcedContexts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Batches of similar lengths: a left-padded batch computes every row at the longest width.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[FastVerdict | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        found = _batch(
            model,
            contexts,
            [prompt_ids[i] for i in picked],
            [tasks[i] for i in picked],
            device,
            pad,
            prefix,
        )
        for i, verdict in zip(picked, found, strict=True):
            results[i] = verdict
    return results  # type: ignore[return-value]


def _batch(
    model: Any,
    contexts: ForcedContexts,
    prompt_ids: Sequence[Sequence[int]],
    tasks: Sequence[Sequence[str]],
    device: str,
    pad_id: int,
    prefix: SharedPrefix | None = None,
) -> list[FastVerdict]:
    import torch

    rows = len(prompt_ids)
    answers = AnswerSteps(contexts, prompt_ids, tasks)
    shared = prefix.length(prompt_ids) if prefix is not None else 0

    def start() -> tuple[list[list[int]], Any, Any]:
        """Each row's cached tokens, the cache and its mask before the first step."""
        if not shared:
            return [[] for _ in range(rows)], None, None
        held = list(prompt_ids[0][:shared])
        ones = torch.ones((rows, shared), dtype=torch.long, device=device)
        return [list(held) for _ in range(rows)], prefix.cache_for(shared, rows, device), ones

    fed, cache, mask = start()  # fed: the tokens in each row's cache
    while pending := answers.pending():
        wanted = {r: ids for r, (ids, _) in pending.items()}
        # Continue on the cache when every row's new text extends what it holds (tokenizers
        # almost always split "harmful\nCompletion:" after the label); otherwise start over.
        if cache is None or any(fed[r] != wanted[r][: len(fed[r])] for r in wanted):
            fed, cache, mask = start()
        new = {r: wanted[r][len(fed[r]) :] for r in wanted}
        width = max(len(ids) for ids in new.values())
        if cache is None:  # left padding: every row's last token sits in the last column
            input_ids = [
                [pad_id] * (width - len(new.get(r, []))) + new.get(r, []) for r in range(rows)
            ]
            step_mask = [
                [0] * (width - len(new.get(r, []))) + [1] * len(new.get(r, [])) for r in range(rows)
            ]
        else:  # right padding after each row's cached tokens; pads are masked out
            input_ids = [
                new.get(r, []) + [pad_id] * (width - len(new.get(r, []))) for r in range(rows)
            ]
            step_mask = [
                [1] * len(new.get(r, [])) + [0] * (width - len(new.get(r, []))) for r in range(rows)
            ]
        step_mask_t = torch.tensor(step_mask, device=device)
        full_mask = step_mask_t if mask is None else torch.cat([mask, step_mask_t], dim=1)
        # Positions count each row's real tokens only, so padding never shifts a row.
        held = torch.tensor([len(fed[r]) for r in range(rows)], device=device)[:, None]
        position_ids = (held + torch.cumsum(step_mask_t, dim=1) - 1).clamp(min=0)
        last = [
            (width - 1) if cache is None else max(len(new.get(r, [])) - 1, 0) for r in range(rows)
        ]
        past = 0 if mask is None else mask.shape[1]
        # Prefill: every row ends in the last column, one position is enough. On a cache (the
        # shared prefix, or the step before) rows end in different columns: the logits are kept
        # at the union of their last positions (one index list shared by the rows) and each
        # row's own one picked below.
        keep = sorted(set(last))
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor(input_ids, device=device),
                attention_mask=full_mask,
                position_ids=position_ids,
                past_key_values=cache,
                cache_position=torch.arange(past, past + width, device=device),
                use_cache=True,
                logits_to_keep=1 if cache is None else torch.tensor(keep, device=device),
            )
        at = torch.tensor(
            [0 if cache is None else keep.index(p) for p in last], device=out.logits.device
        )
        cache, mask = out.past_key_values, full_mask
        logits = out.logits[torch.arange(rows, device=at.device), at].float().cpu()
        for r in wanted:
            fed[r] = wanted[r]
        answers.record(
            {
                r: {label: logits[r, token].item() for label, token in tokens.items()}
                for r, (_, tokens) in pending.items()
            }
        )
    return answers.verdicts()
