"""Turn guard records into token ids and loss labels (loss on the completion only).

The prompt part (instruction + input, or the chat turns before the answer) gets label -100; every
completion token, including the closing end-of-turn / EOS token, is a label. This is how the model
learns to stop: nothing masks the end token (the pad == eos trap of many SFT scripts).

Example:
    >>> from reasonguard.data.tokenize import encode_records
    >>> enc = encode_records([record], tokenizer, prompt_format="chat", max_length=2048)
    >>> enc[0]["input_ids"][:3], enc[0]["labels"][:3]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reasonguard.format import INSTRUCTION, build_training_pair

IGNORE_INDEX = -100


def encode_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    prompt_format: str = "raw",
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Encode `{instruction, input, output}` records into training examples.

    Prompt and completion are tokenized separately (the prompt with the tokenizer's own special
    tokens for `raw`, none for the chat formats whose template writes them) and concatenated, so
    the boundary between masked and learned tokens is exact.

    Args:
        records: mappings with `input` and `output` (and optionally `instruction`).
        tokenizer: a Hugging Face tokenizer (with a chat template for the chat formats).
        prompt_format: `raw`, `chat` or `chat-user`.
        max_length: cut sequences longer than this (from the right; flagged `truncated`).

    Returns:
        One dict per record: `input_ids`, `labels`, `num_prompt_tokens`, `num_completion_tokens`,
        `truncated`.
    """
    prompts: list[str] = []
    completions: list[str] = []
    for record in records:
        prompt, completion = build_training_pair(
            record["input"],
            record["output"],
            prompt_format,
            tokenizer,
            record.get("instruction") or INSTRUCTION,
        )
        prompts.append(prompt)
        completions.append(completion)
    if not prompts:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=prompt_format == "raw")["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    examples = []
    for p_ids, c_ids in zip(prompt_ids, completion_ids, strict=True):
        input_ids = list(p_ids) + list(c_ids)
        labels = [IGNORE_INDEX] * len(p_ids) + list(c_ids)
        truncated = max_length is not None and len(input_ids) > max_length
        if truncated:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        examples.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "num_prompt_tokens": len(p_ids),
                "num_completion_tokens": len(c_ids),
                "truncated": truncated,
            }
        )
    return examples


def sequence_lengths(
    records: Iterable[Mapping[str, Any]], tokenizer: Any, prompt_format: str = "raw"
) -> list[int]:
    """Full (prompt + completion) token length of each record, untruncated."""
    return [len(e["input_ids"]) for e in encode_records(records, tokenizer, prompt_format, None)]
