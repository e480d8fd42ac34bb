"""Fast mode: a guard's verdict without reasoning, read from the answer block forced after the
prompt.

A reasoning guard writes a few hundred tokens before its answer block. Fast mode skips them: it
feeds the prompt followed by the start of the answer block (`format.forced_answer_context`) and
reads the model's probabilities of the two labels where the first label word goes
(`Request: harmful` against `Request: unharmful`). The more likely label is written into the
block, and for an item with a response the next answer (`Completion:`, then `Response:`) is read
the same way, given the labels chosen before it, as the model would have written the block. Each
step feeds only the new tokens on the KV cache of the step before, so a verdict costs one prompt
pass and two short ones, with no free-running generation.

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

from collections.abc import Sequence
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


class _Contexts:
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


def fast_verdicts(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    tasks: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    device: str = "cpu",
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

    Returns:
        One `FastVerdict` per item, in order.
    """
    contexts = _Contexts(tokenizer)
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
        )
        for i, verdict in zip(picked, found, strict=True):
            results[i] = verdict
    return results  # type: ignore[return-value]


def _batch(
    model: Any,
    contexts: _Contexts,
    prompt_ids: Sequence[Sequence[int]],
    tasks: Sequence[Sequence[str]],
    device: str,
    pad_id: int,
) -> list[FastVerdict]:
    import torch

    rows = len(prompt_ids)
    steps = [steps_for(asked) for asked in tasks]
    chosen: list[dict[str, str | None]] = [{} for _ in range(rows)]
    scores = [empty_scores() for _ in range(rows)]
    fed: list[list[int]] = [[] for _ in range(rows)]  # tokens in each row's cache
    cache, mask = None, None
    for k in range(max(len(s) for s in steps)):
        active = [r for r in range(rows) if k < len(steps[r])]
        wanted: dict[int, list[int]] = {}
        candidates: dict[int, dict[str, int]] = {}
        for r in active:
            found = contexts.get(steps[r][k], chosen[r])
            if found is None:
                continue
            wanted[r] = list(prompt_ids[r]) + list(found[0])
            candidates[r] = found[1]
        if not wanted:
            break
        # Continue on the cache when every row's new text extends what it holds (tokenizers
        # almost always split "harmful\nCompletion:" after the label); otherwise start over.
        if cache is None or any(fed[r] != wanted[r][: len(fed[r])] for r in wanted):
            fed = [[] for _ in range(rows)]
            cache, mask = None, None
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
        cache_was_none = cache is None
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor(input_ids, device=device),
                attention_mask=full_mask,
                position_ids=position_ids,
                past_key_values=cache,
                cache_position=torch.arange(past, past + width, device=device),
                use_cache=True,
                # Prefill: every row ends in the last column, one position is enough. Later
                # steps feed a few tokens per row (a label and the next field name), so all of
                # them are kept and each row's own last one picked below.
                logits_to_keep=1 if cache is None else width,
            )
        cache, mask = out.past_key_values, full_mask
        at = torch.tensor([0 if cache_was_none else p for p in last], device=out.logits.device)
        logits = out.logits[torch.arange(rows, device=at.device), at].float().cpu()
        for r in wanted:
            fed[r] = wanted[r]
            task = steps[r][k]
            labels = list(candidates[r])
            probs = normalised([logits[r, candidates[r][lb]].item() for lb in labels], labels)
            chosen[r][task] = max(labels, key=lambda lb: probs[lb])
            if task in tasks[r]:
                scores[r][TASK_FIELD[task]] = probs
    verdicts = []
    for r in range(rows):
        labels = {task: chosen[r].get(task) for task in steps[r]}
        text = render_answers(labels.get("prompt"), labels.get("refusal"), labels.get("response"))
        verdicts.append(FastVerdict(labels=labels, scores=scores[r], text=text))
    return verdicts
