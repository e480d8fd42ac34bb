"""The guard API: validation, no mutation, well-formed verdicts, and scores that are real
probabilities read at the answer positions (tiny random Llama; SmolLM2 for real weights)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from reasonguard import load_guard
from reasonguard.format import render_input, render_target
from reasonguard.infer.guard import GuardResult, InvalidItemError, validate_items

FIELDS = {
    "prompt_harmfulness",
    "response_refusal",
    "response_harmfulness",
    "is_parsing_error",
    "reason",
    "truncated",
    "scores",
    "output",
    "num_tokens",
    "mode",
    "tier",
}
ANSWERED = render_target(
    "# Task 1\n\n## Reasoning Step 1\nThe user asks how to make a weapon.",
    "harmful",
    "refusal",
    "unharmful",
)


@pytest.fixture(scope="module")
def tiny():
    return load_guard("tiny-llama", device="cpu", batch_size=4)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"response": "x"}], "item 0: missing 'prompt'"),
        ([{"prompt": "ok"}, {"prompt": 3}], "item 1: 'prompt' must be a string, got int"),
        ([{"prompt": "ok"}, {"prompt": "ok", "response": ["a"]}], "item 1: 'response' must be"),
        ([{"prompt": "  "}], "item 0: 'prompt' is empty"),
        (["text"], "item 0: expected an object"),
        ({"prompt": "x"}, "items must be a list"),
    ],
)
def test_bad_items_name_their_index(items, message: str) -> None:
    with pytest.raises(InvalidItemError, match=message):
        validate_items(items)
    with pytest.raises(ValueError):  # library callers can catch the standard type
        validate_items(items)


def test_classify_mechanics_and_no_mutation(tiny) -> None:
    items = [
        {"prompt": "How do I bake bread?", "id": 7},
        {"prompt": "How do I pick a lock?", "response": "I can't help with that."},
        {"prompt": "Hello", "response": ""},
    ]
    before = copy.deepcopy(items)
    results = tiny.classify(items, max_new_tokens=5)
    assert items == before
    assert len(results) == 3 and all(isinstance(r, GuardResult) for r in results)
    for r in results:
        d = r.to_dict()
        assert set(d) == FIELDS
        assert r.is_parsing_error  # random weights never write an answer block
        assert r.truncated == (r.num_tokens == 5)
        assert set(r.scores) == {"prompt_harmfulness", "response_refusal", "response_harmfulness"}
    assert tiny.classify([]) == []


def test_scores_match_a_plain_forward_pass(tiny) -> None:
    backend = tiny.backend
    prompt = backend.build_prompt(render_input("How do I make a weapon?", "No."))
    text = ANSWERED
    [scores] = backend.answer_scores([prompt], [text], [("prompt", "refusal", "response")])
    # Recompute the Request score by hand: the logits after "...Request:" over the two labels.
    from reasonguard.infer.scores import score_queries

    [query] = score_queries(backend.tokenizer, text, ["prompt"])
    ids = backend.encode([prompt])[0] + list(query.context_ids)
    with torch.inference_mode():
        logits = backend.model(torch.tensor([ids])).logits[0, -1]
    pair = torch.softmax(logits[[query.candidates["harmful"], query.candidates["unharmful"]]], 0)
    assert math.isclose(scores["prompt_harmfulness"]["harmful"], pair[0].item(), abs_tol=1e-4)
    # Prompt-only items get no response scores.
    [only] = backend.answer_scores([prompt], [text], [("prompt",)])
    assert only["response_refusal"] is None and only["response_harmfulness"] is None


@pytest.mark.slow
def test_smollm2_classify_and_scores() -> None:
    guard = load_guard("smollm2", device="cpu")
    items = [
        {"prompt": "How do I make a bomb?", "response": "I can't help with that."},
        {"prompt": "What is the capital of France?"},
    ]
    results = guard.classify(items, max_new_tokens=12)
    assert len(results) == 2
    for r in results:
        assert r.prompt_harmfulness in (None, "harmful", "unharmful")
        assert isinstance(r.reason, str) and isinstance(r.is_parsing_error, bool)
    # Real weights: scores at the answer positions of a complete answer block are probabilities.
    prompt = guard.backend.build_prompt(render_input(items[0]["prompt"], items[0]["response"]))
    [scores] = guard.backend.answer_scores(
        [prompt], [ANSWERED], [("prompt", "refusal", "response")]
    )
    for field in ("prompt_harmfulness", "response_refusal", "response_harmfulness"):
        probs = scores[field]
        assert probs is not None and len(probs) == 2
        assert all(0.0 <= p <= 1.0 for p in probs.values())
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)


def test_prompt_only_items_have_no_response_labels() -> None:
    from reasonguard.format import render_answers
    from reasonguard.infer.guard import read_verdict

    text = "Reasoning.\n---\n\n" + render_answers("harmful", "compliance", "unharmful")
    alone = read_verdict(text, truncated=False, has_response=False)
    assert alone["prompt_harmfulness"] == "harmful" and not alone["is_parsing_error"]
    assert alone["response_refusal"] is None and alone["response_harmfulness"] is None
    paired = read_verdict(text, truncated=False, has_response=True)
    assert paired["response_refusal"] == "compliance"
    assert paired["response_harmfulness"] == "unharmful"
