"""Where a guard's answers sit in its own output, and what to ask the model there.

A score is the model's probability of a label at the position where it wrote that label, given
its prompt and its own reasoning: for `Request: harmful` it is P(first token of "harmful") against
P(first token of "unharmful") at the token after `Request:`, normalised over the two. This module
finds those positions and the candidate tokens (tokenizer only); a backend runs the one forward
pass and reads the logits (`hf.HFBackend.answer_scores`).

The answer line taken is the one `format.parse_output` takes (the last valid one), found with the
format module's own patterns so the two never disagree.

Example:
    >>> from reasonguard.format import answer_offsets
    >>> answer_offsets("...\\nAnswers: \\nRequest: harmful\\nCompletion: None\\nResponse: None")
    {'prompt': 23, 'refusal': 43, 'response': 58}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# format.answer_offsets finds the same answer lines parse_output reads, so a score is always
# taken where the verdict's label was written.
from reasonguard.format import TASK_FIELD, TASK_LABELS, answer_offsets, forced_answer_context


@dataclass(frozen=True)
class ScoreQuery:
    """One answer position to score.

    Attributes:
        task: `prompt`, `refusal` or `response`.
        context_ids: token ids of the generated text before the label (the prompt comes first).
        candidates: label -> the token id the label starts with at this position.
    """

    task: str
    context_ids: tuple[int, ...]
    candidates: dict[str, int]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


def label_candidates(
    tokenizer: Any, context: str, labels: Sequence[str]
) -> tuple[tuple[int, ...], dict[str, int]] | None:
    """The token ids of `context` and, per label, the token the label starts with after it.

    Found by tokenizing `context + label` for each label: the ids all labels share form the
    context, and the first id where they differ is each label's token. This works for any
    tokenizer (a trailing space of the context may belong to the label token, as in Llama 3's
    " harmful"). None when one label is a token prefix of another: no single position tells them
    apart.
    """
    ids = [tokenizer(context + label, add_special_tokens=False)["input_ids"] for label in labels]
    shared = _common_prefix(ids)
    if any(len(seq) <= shared for seq in ids):
        return None
    return tuple(ids[0][:shared]), {
        label: seq[shared] for label, seq in zip(labels, ids, strict=True)
    }


def score_queries(tokenizer: Any, text: str, tasks: Sequence[str]) -> list[ScoreQuery]:
    """The positions to score in one generated `text`, for the `tasks` asked (others skipped)."""
    queries = []
    offsets = answer_offsets(text)
    for task in tasks:
        if task not in offsets:
            continue
        found = label_candidates(tokenizer, text[: offsets[task]], TASK_LABELS[task])
        if found is not None:
            queries.append(ScoreQuery(task=task, context_ids=found[0], candidates=found[1]))
    return queries


def generated_position(query: ScoreQuery, generated_ids: Sequence[int]) -> int | None:
    """Where the model generated the label of `query` in its own output tokens: the index after
    the context, when the tokens it generated before the label are the context's tokens (almost
    always; a text can tokenize differently from how it was generated). None otherwise, and the
    score is then read by a forward pass over prompt + context, as the HF backend always does.
    """
    n = len(query.context_ids)
    if n < len(generated_ids) and tuple(generated_ids[:n]) == query.context_ids:
        return n
    return None


def answer_token_ids(tokenizer: Any) -> list[int]:
    """Every token a label can start with right after its answer key (`Request: ` ...): the
    tokens whose probabilities a backend keeps while generating, to score the answers it
    writes without a second pass."""
    found: set[int] = set()
    for task in TASK_LABELS:
        candidates = label_candidates(tokenizer, forced_answer_context(task, {}), TASK_LABELS[task])
        if candidates is not None:
            found.update(candidates[1].values())
    return sorted(found)


def normalised(logits: Sequence[float], labels: Sequence[str]) -> dict[str, float]:
    """Softmax over the candidate logits only (= the full softmax renormalised over them)."""
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = sum(exps)
    return {label: e / total for label, e in zip(labels, exps, strict=True)}


def empty_scores() -> dict[str, dict[str, float] | None]:
    """Scores keyed by verdict field, all None (no position found or not asked)."""
    return {TASK_FIELD[task]: None for task in ("prompt", "refusal", "response")}
