"""Label probabilities on vLLM: fast-mode verdicts and the scores of reasoning verdicts, the same
quantities the HF backend computes (`fast.py`, `scores.py`), read from vLLM's log-probs.

vLLM returns, at a generated position, the log-probabilities of chosen tokens
(`SamplingParams.logprob_token_ids`), taken from the model's distribution before any sampling
setting changes it. Normalised over a task's two label tokens they equal the HF backend's
two-label softmax of the logits: a log-prob is the logit less one constant per position.

- A fast-mode step (`fast.AnswerSteps`) is a one-token request: prompt + forced context, and the
  label tokens' log-probs at the one generated position (`allowed_token_ids` keeps the sampled
  token among them, so nothing else comes back). Each step's prompt extends the one before and
  every prompt starts with the guard instruction, so with prefix caching a step computes little
  more than its new tokens (vLLM reuses whole KV blocks: `vllm/engine.py`'s `engine_options` picks small ones
  on a CPU).
- A reasoning generation keeps the answer tokens' log-probs at every position
  (`scores.answer_token_ids`, `keep_answer_logprobs`); an answer is scored where the model wrote
  its label (`scores.generated_position`), or, for a text that tokenizes otherwise than it was
  generated, by a one-token request over prompt + context, like a fast step.

The engines' calls stay with their engines (`vllm.VLLMBackend` on the offline `LLM`,
`serve.engine.AsyncGuard` on the async one); this module holds what both share. vLLM is imported
inside the functions, as everywhere.

Example:
    >>> params = step_params({"harmful": 5794, "unharmful": 18397})
    >>> [out] = llm.generate([{"prompt_token_ids": ids}], params)
    >>> step_values(out, {"harmful": 5794, "unharmful": 18397})
    {'harmful': -11.64, 'unharmful': -13.66}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reasonguard.format import TASK_FIELD
from reasonguard.infer.scores import (
    ScoreQuery,
    empty_scores,
    generated_position,
    normalised,
    score_queries,
)

# One answer to read by a one-token request: prompt + context token ids, label -> its token.
LabelStep = tuple[list[int], Mapping[str, int]]


def step_params(candidates: Mapping[str, int]) -> Any:
    """The sampling settings of one label step: one greedy token among the labels' tokens, with
    their log-probs; no text (nothing is decoded)."""
    from vllm import SamplingParams

    tokens = sorted(set(candidates.values()))
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        allowed_token_ids=tokens,
        logprob_token_ids=tokens,
        detokenize=False,
    )


def step_values(output: Any, candidates: Mapping[str, int]) -> dict[str, float]:
    """The labels' log-probs in the one-token output of a label step (a `RequestOutput`)."""
    at = output.outputs[0].logprobs[0]
    return {label: at[token].logprob for label, token in candidates.items()}


def keep_answer_logprobs(params: Any, answer_ids: Sequence[int]) -> Any:
    """`params` (a generation's `SamplingParams`) also returning the answer tokens' log-probs at
    every generated position, in vLLM's flat form (a few lists per output, not an object per
    token)."""
    params.logprob_token_ids = list(answer_ids)
    params.flat_logprobs = True
    return params


def generated_scores(
    tokenizer: Any,
    text: str,
    token_ids: Sequence[int],
    logprobs: Any,
    tasks: Sequence[str],
) -> tuple[dict[str, dict[str, float] | None], list[ScoreQuery]]:
    """The scores of one reasoning output read from its own log-probs, and the queries that could
    not be read there (see the module docstring).

    Args:
        tokenizer: the model's tokenizer.
        text: the generated text.
        token_ids: the generated token ids.
        logprobs: their log-probs (`CompletionOutput.logprobs`, kept by `keep_answer_logprobs`),
            or None when none were kept.
        tasks: the tasks asked.
    """
    scores = empty_scores()
    missing = []
    for query in score_queries(tokenizer, text, tasks):
        at = generated_position(query, token_ids)
        kept = None
        if logprobs is not None and at is not None and at < len(logprobs):
            kept = logprobs[at]
        if kept is None or any(token not in kept for token in query.candidates.values()):
            missing.append(query)
            continue
        labels = list(query.candidates)
        values = [kept[query.candidates[label]].logprob for label in labels]
        scores[TASK_FIELD[query.task]] = normalised(values, labels)
    return scores, missing


def fill_missing(
    scores: dict[str, dict[str, float] | None],
    queries: Sequence[ScoreQuery],
    values: Sequence[Mapping[str, float]],
) -> None:
    """Write the scores of `queries`, read by label steps (`query_step`), into `scores`."""
    for query, by_label in zip(queries, values, strict=True):
        labels = list(by_label)
        scores[TASK_FIELD[query.task]] = normalised([by_label[lb] for lb in labels], labels)


def query_step(prompt_ids: Sequence[int], query: ScoreQuery) -> LabelStep:
    """The label step that scores `query` by a forward pass over prompt + context, as the HF
    backend scores every answer."""
    return list(prompt_ids) + list(query.context_ids), query.candidates
