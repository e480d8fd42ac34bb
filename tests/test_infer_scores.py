"""Answer positions and candidate tokens for guard scores (tokenizer only, no model)."""

from __future__ import annotations

import math

import pytest

from reasonguard.format import answer_offsets, render_target
from reasonguard.infer.scores import normalised, score_queries
from reasonguard.models import load_tokenizer

FULL = render_target(
    "# Task 1\n\n## Reasoning Step 1\nA bomb request.", "harmful", "refusal", "unharmful"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3-tokenizer")


def test_offsets_point_at_the_label_words() -> None:
    offsets = answer_offsets(FULL)
    assert FULL[offsets["prompt"] :].startswith("harmful\n")
    assert FULL[offsets["refusal"] :].startswith("refusal\n")
    assert FULL[offsets["response"] :].startswith("unharmful")


def test_offsets_take_the_last_valid_line_like_the_parser() -> None:
    text = "Request: unharmful (draft)\n" + FULL + "\nRequest: maybe"
    assert text[answer_offsets(text)["prompt"] :].startswith("harmful\nCompletion")


def test_offsets_of_none_answers_and_missing_lines() -> None:
    text = render_target("Reasoning.", "unharmful", None, None)
    offsets = answer_offsets(text)
    assert text[offsets["refusal"] :].startswith("None")
    assert answer_offsets("no answers at all") == {}


def test_queries_context_is_the_text_before_the_label(tokenizer) -> None:
    queries = {q.task: q for q in score_queries(tokenizer, FULL, ["prompt", "refusal", "response"])}
    assert set(queries) == {"prompt", "refusal", "response"}
    for task, labels in (
        ("prompt", ("harmful", "unharmful")),
        ("refusal", ("refusal", "compliance")),
    ):
        q = queries[task]
        assert set(q.candidates) == set(labels)
        assert len(set(q.candidates.values())) == 2  # the two labels start differently
        context = tokenizer.decode(list(q.context_ids))
        assert FULL.startswith(context) and context.rstrip().endswith(":")
    # Only the tasks asked are scored.
    assert [q.task for q in score_queries(tokenizer, FULL, ["prompt"])] == ["prompt"]


def test_normalised_is_a_softmax_over_the_candidates() -> None:
    probs = normalised([2.0, 0.0], ["harmful", "unharmful"])
    assert math.isclose(sum(probs.values()), 1.0)
    assert math.isclose(probs["harmful"], 1 / (1 + math.exp(-2.0)))
    assert normalised([1000.0, 0.0], ["a", "b"])["a"] == 1.0  # no overflow
