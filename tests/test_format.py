"""The guard-format parser: golden outputs -> expected verdicts, and hypothesis properties.

The golden texts imitate what the released GuardReasoner models really write (REFERENCE.md §1):
answer blocks with `None`, odd casing, missing lines, chatter after the block, runaway loops
that hit the token limit, and "The ground truth is" leakage from the data synthesis prompt.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reasonguard.format import (
    HARM_LABELS,
    REFUSAL_LABELS,
    parse_output,
    render_answers,
    render_input,
    render_target,
    split_input,
)

REASONING = (
    "# Task 1\n\n## Reasoning Step 1\nThe user asks how to pick a lock.\n\n"
    "## Conclusion\nThe request is harmful.\n\n# Task 2\n\n## Reasoning Step 1\nThere is no response."
)


def block(request: str, completion: str, response: str) -> str:
    return f"{REASONING}\n\n---\n\nAnswers: \nRequest: {request}\nCompletion: {completion}\nResponse: {response}"


# (name, output, (prompt_harmfulness, response_refusal, response_harmfulness, is_parsing_error))
GOLDEN = [
    ("none", block("harmful", "None", "None"), ("harmful", None, None, False)),
    (
        "all three",
        block("unharmful", "compliance", "harmful"),
        ("unharmful", "compliance", "harmful", False),
    ),
    ("n/a", block("unharmful", "N/A", "n/a"), ("unharmful", None, None, False)),
    (
        "uppercase",
        "REASONING\nANSWERS:\nREQUEST: HARMFUL\nCOMPLETION: REFUSAL\nRESPONSE: UNHARMFUL",
        ("harmful", "refusal", "unharmful", False),
    ),
    (
        "markdown bold",
        "r\n**Answers:**\n**Request:** harmful\n**Completion:** None\n**Response:** None",
        ("harmful", None, None, False),
    ),
    (
        "label with prose",
        block("harmful, because it asks for lock picking.", "None", "None"),
        ("harmful", None, None, False),
    ),
    (
        "missing request line",
        f"{REASONING}\n\nAnswers: \nCompletion: None\nResponse: None",
        (None, None, None, True),
    ),
    (
        "missing response lines",
        f"{REASONING}\n\nAnswers: \nRequest: harmful",
        ("harmful", None, None, False),
    ),
    ("unknown request word", block("maybe", "None", "None"), (None, None, None, True)),
    (
        "cut mid-answer",
        f"{REASONING}\n\nAnswers: \nRequest: harmful\nCompletion: refu",
        ("harmful", None, None, True),
    ),
    (
        "text after the block",
        block("harmful", "refusal", "unharmful") + "\n\nI hope this helps! Let me know.",
        ("harmful", "refusal", "unharmful", False),
    ),
    (
        "ground truth prefix",
        "The ground truth is harmful.\n\n" + block("unharmful", "None", "None"),
        ("unharmful", None, None, False),
    ),
    (
        "ground truth block echoed first",
        "The ground truth is:\nRequest: harmful\nCompletion: None\nResponse: None\n\n"
        + block("unharmful", "None", "None"),
        ("unharmful", None, None, False),
    ),
    (
        "ground truth before answers",
        f"{REASONING}\n\nThe ground truth is \n\nAnswers: \nRequest: harmful\nCompletion: None\nResponse: None",
        ("harmful", None, None, False),
    ),
    (
        "continues the user text",
        "and also tell me where to buy one.\n\n" + block("harmful", "None", "None"),
        ("harmful", None, None, False),
    ),
    (
        "answer inside prose is not an answer line",
        "The AI assistant's response: harmful content.",
        (None, None, None, True),
    ),
    (
        "windows line endings",
        block("harmful", "None", "None").replace("\n", "\r\n"),
        ("harmful", None, None, False),
    ),
    ("empty", "", (None, None, None, True)),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in GOLDEN], ids=[n for n, _, _ in GOLDEN]
)
def test_golden_verdicts(text: str, expected: tuple) -> None:
    v = parse_output(text)
    assert (
        v.prompt_harmfulness,
        v.response_refusal,
        v.response_harmfulness,
        v.is_parsing_error,
    ) == expected
    assert not v.truncated


def test_reason_is_the_text_before_the_answer_block() -> None:
    v = parse_output(block("harmful", "None", "None") + "\n\nThanks!")
    assert v.reason == REASONING


def test_ground_truth_prefix_stays_in_the_reason() -> None:
    v = parse_output(f"{REASONING}\n\nThe ground truth is \n\nAnswers: \nRequest: harmful")
    assert v.reason == f"{REASONING}\n\nThe ground truth is"


def test_runaway_repeated_output_is_truncated_and_unparsed() -> None:
    """A loop with no answer block: flagged truncated, and a parsing error."""
    text = "# Task 30: Determine whether the response is harmful.\n\n" * 60
    v = parse_output(text)
    assert v.truncated and v.is_parsing_error and v.prompt_harmfulness is None


def test_runaway_after_an_answer_keeps_the_answer() -> None:
    """A leading `Request:` line then a loop: the last valid answer anywhere still counts."""
    text = "Request: harmful\n\n" + "## Reasoning Step 1\nThe response is None.\n\n" * 80
    v = parse_output(text)
    assert (v.prompt_harmfulness, v.truncated, v.is_parsing_error) == ("harmful", True, False)


def test_repeated_answer_blocks_are_truncated() -> None:
    text = REASONING + "\n\nAnswers: \nRequest: harmful\nCompletion: None\nResponse: None\n" * 30
    v = parse_output(text)
    assert (v.prompt_harmfulness, v.truncated) == ("harmful", True)


def test_token_limit_flag_sets_truncated() -> None:
    assert parse_output(block("harmful", "None", "None"), hit_token_limit=True).truncated


@pytest.mark.parametrize("value", [None, 12, b"Request: harmful", ["Request: harmful"]])
def test_non_string_input_is_a_parsing_error(value: object) -> None:
    v = parse_output(value)  # type: ignore[arg-type]
    assert v.is_parsing_error and v.prompt_harmfulness is None


# --------------------------------------------------------------------------------------------
# Properties

# Text built from the parser's own vocabulary finds edge cases that random unicode rarely hits.
_PIECES = [
    "Request:",
    "Completion:",
    "Response:",
    "Answers:",
    "Answer:",
    "harmful",
    "unharmful",
    "refusal",
    "compliance",
    "None",
    "N/A",
    "---",
    "\n",
    "\r\n",
    " ",
    "*",
    "#",
    ":",
    "REQUEST",
]
tricky_text = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=4))).map("".join)
any_text = st.one_of(st.text(), tricky_text)
harm = st.sampled_from(HARM_LABELS)
refusal_or_none = st.sampled_from((*REFUSAL_LABELS, None))
harm_or_none = st.sampled_from((*HARM_LABELS, None))


@settings(max_examples=400, deadline=None)
@given(any_text, harm, refusal_or_none, harm_or_none)
def test_parse_render_target_round_trips(
    reasoning: str, p: str, c: str | None, r: str | None
) -> None:
    v = parse_output(render_target(reasoning, p, c, r))
    assert (v.prompt_harmfulness, v.response_refusal, v.response_harmfulness) == (p, c, r)
    assert not v.is_parsing_error
    assert v.reason == reasoning.strip()


@settings(max_examples=400, deadline=None)
@given(any_text, st.booleans())
def test_parse_any_text_never_raises_and_stays_in_vocabulary(text: str, limit: bool) -> None:
    v = parse_output(text, hit_token_limit=limit)
    assert v.prompt_harmfulness in (*HARM_LABELS, None)
    assert v.response_refusal in (*REFUSAL_LABELS, None)
    assert v.response_harmfulness in (*HARM_LABELS, None)
    assert v.prompt_harmfulness is not None or v.is_parsing_error
    assert isinstance(v.reason, str) and v.truncated >= limit


@settings(max_examples=200, deadline=None)
@given(harm, refusal_or_none, harm_or_none)
def test_render_answers_alone_parses(p: str, c: str | None, r: str | None) -> None:
    v = parse_output(render_answers(p, c, r))
    assert (v.prompt_harmfulness, v.response_refusal, v.response_harmfulness) == (p, c, r)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), tricky_text), st.one_of(st.none(), st.text()))
def test_split_input_inverts_render_input(prompt: str, response: str | None) -> None:
    # Two ambiguities are part of the format: a response that is literally "None" reads as no
    # response, and a response holding the "AI assistant:" separator cannot be split back.
    assume("\n\nAI assistant:\n" not in (response or ""))
    expected = None if response == "None" else response
    assert split_input(render_input(prompt, response)) == (prompt, expected)
