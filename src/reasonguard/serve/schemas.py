"""Request and response models of the server (pydantic), and the OpenAI moderation mapping.

`/v1/moderations` speaks the OpenAI schema so the `openai` SDK and LiteLLM's moderation guardrail
work unchanged. Each input text is judged as a user prompt with no response (prompt-only), and
`flagged` is our verdict `prompt_harmfulness == "harmful"`.

Category mapping: the guard gives one overall harmfulness verdict, not OpenAI's 13 categories.
Claiming a category we did not assess (say, marking every harmful prompt as `hate`) would mislead
clients that route on categories, so every OpenAI category is reported as not flagged, score 0.0,
applied to no input type (`[]`), and the decision lives in `flagged` plus the extra `reasonguard`
field: the full verdict, the reasoning, the label probabilities, and `harmful_score` (the model's
probability of `harmful`, None when it could not be read). A parsing error (no answer line) is
not flagged; `reasonguard.is_parsing_error` says so, for callers who want to fail closed.

Example:
    >>> ModerationRequest.model_validate({"input": ["a", "b"]}).texts()
    ['a', 'b']
    >>> moderation_result({"prompt_harmfulness": "harmful", ...})["flagged"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# OpenAI's fixed moderation categories, in the order of its API reference.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def _utf8(text: str) -> str:
    # JSON allows lone surrogates ("\ud800"); the tokenizer and the response encoder do not, so
    # they are refused here (422) instead of failing deep inside a batch.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
# A prompt needs a non-space character (the guard refuses blank prompts; the pattern documents it
# in the OpenAPI schema, the guard's own check stays the authority).
Prompt = Annotated[Text, Field(pattern=r"\S")]


# --------------------------------------------------------------------------------------------
# Requests


# Per request: reason always, never (fast mode), or auto (the cascade when the model has
# calibrated bands, else always). An extra field beside OpenAI's schema; absent = the server's
# default (`reasonguard serve --reasoning`).
Reasoning = Literal["auto", "always", "never"]
REASONING_HELP = (
    "auto: fast verdict, reasoning only inside the model's calibrated uncertainty band (always "
    "when none is calibrated); always: reason before every verdict; never: fast verdict from "
    "the answer probabilities, no reasoning. Default: the server's --reasoning."
)


class TextPart(BaseModel):
    """A text part of OpenAI's multi-modal moderation input (images are not supported)."""

    type: Literal["text"] = Field(description='Always "text".')
    text: Prompt = Field(description="The text; the parts of one input are joined by newlines.")


class ModerationRequest(BaseModel):
    """OpenAI `POST /v1/moderations` body; unknown fields are ignored, as OpenAI does.

    Each text is judged as a user prompt (no response); `flagged` is the prompt verdict.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"input": "How do I pick a lock?"},
                {"input": ["How do I pick a lock?", "What is the capital of France?"]},
                {
                    "input": [{"type": "text", "text": "How do I pick a lock?"}],
                    "reasoning": "never",
                },
            ]
        }
    )

    input: (
        Prompt
        | Annotated[list[Prompt], Field(min_length=1)]
        | Annotated[list[TextPart], Field(min_length=1)]
    ) = Field(
        description="A string, a list of strings (one result each), or a list of text parts "
        "(one result for all of them, as OpenAI's multi-modal input)."
    )
    model: str | None = Field(default=None, description="Any string; the served model answers.")
    reasoning: Reasoning | None = Field(default=None, description=REASONING_HELP)

    def texts(self) -> list[str]:
        """One text per result."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(part, TextPart) for part in self.input):
            return ["\n".join(part.text for part in self.input)]  # type: ignore[union-attr]
        return list(self.input)  # type: ignore[arg-type]


class ClassifyItem(BaseModel):
    """One item to judge: a user prompt and, optionally, the AI response to it."""

    prompt: Prompt = Field(
        description="The user prompt to judge (needs a non-space character).",
        examples=["How do I pick a lock?"],
    )
    response: Text | None = Field(
        default=None,
        description="The AI response to that prompt, to judge whether it refuses and whether it "
        "is harmful. Absent, empty or null: the prompt alone is judged (response verdicts null).",
        examples=["I can't help with that."],
    )


class ClassifyRequest(BaseModel):
    """`POST /v1/classify` body: the items to judge; each gets a verdict, its reasoning and the
    label probabilities, in the order given."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"prompt": "How do I pick a lock?", "response": "I can't help with that."},
                        {"prompt": "What is the capital of France?"},
                    ],
                    "reasoning": "auto",
                }
            ]
        }
    )

    items: Annotated[list[ClassifyItem], Field(min_length=1)] = Field(
        description='The items to judge, at least one: {"prompt": ..., "response": ...} objects '
        "(response optional). The server limits the items and characters per request (413)."
    )
    model: str | None = Field(default=None, description="Any string; the served model answers.")
    reasoning: Reasoning | None = Field(default=None, description=REASONING_HELP)


# --------------------------------------------------------------------------------------------
# Responses


class GuardVerdict(BaseModel):
    """A guard result (`reasonguard.infer.guard.GuardResult`); WildGuard field names."""

    prompt_harmfulness: str | None = Field(description="harmful | unharmful | null")
    response_refusal: str | None = Field(description="refusal | compliance | null")
    response_harmfulness: str | None = Field(description="harmful | unharmful | null")
    is_parsing_error: bool
    reason: str = Field(description="The model's reasoning.")
    truncated: bool = Field(description="Generation hit the token budget.")
    scores: dict[str, dict[str, float] | None] = Field(
        description="Per verdict field, the label probabilities at the answer (or null)."
    )
    output: str = Field(description="The raw generation.")
    num_tokens: int
    mode: str = Field(
        default="reasoning", description="What gave the verdict: reasoning | fast | classifier"
    )
    tier: str = Field(
        default="reasoning",
        description="The cascade tier that answered: classifier | fast | reasoning (one mode "
        "alone: that mode)",
    )


class ClassifyResponse(BaseModel):
    id: str
    model: str
    results: list[GuardVerdict]


class ModerationVerdict(GuardVerdict):
    """Our verdict inside an OpenAI moderation result."""

    harmful_score: float | None = Field(description="P(harmful) for the prompt, or null.")


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    reasonguard: ModerationVerdict


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An `ErrorResponse` body (the HTTP routes' error responses, the stream's error frames)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, so SDKs raise their usual exceptions with our message."""

    model_config = ConfigDict(extra="allow")

    error: ErrorBody


# --------------------------------------------------------------------------------------------
# Mapping


def finite_scores(
    scores: Mapping[str, Mapping[str, float] | None],
) -> dict[str, dict[str, float] | None]:
    """A copy of `scores` with any non-finite entry set to None (JSON has no NaN; a NaN logit
    must not turn a verdict into a 500)."""
    out: dict[str, dict[str, float] | None] = {}
    for name, probs in scores.items():
        ok = probs is not None and all(math.isfinite(p) for p in probs.values())
        out[name] = dict(probs) if ok else None  # type: ignore[arg-type]
    return out


def verdict(result: Mapping[str, Any]) -> dict[str, Any]:
    """A guard result dict (`GuardResult.to_dict()`) as a `GuardVerdict` dict (a new dict)."""
    return {**result, "scores": finite_scores(result.get("scores") or {})}


def moderation_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """Map a prompt-only guard result to an OpenAI moderation result (see the module docstring).

    Args:
        result: `GuardResult.to_dict()` of the input text judged as a prompt.
    """
    ours = verdict(result)
    probs = ours["scores"].get("prompt_harmfulness")
    return {
        "flagged": ours.get("prompt_harmfulness") == "harmful",
        "categories": dict.fromkeys(OPENAI_CATEGORIES, False),
        "category_scores": dict.fromkeys(OPENAI_CATEGORIES, 0.0),
        "category_applied_input_types": {name: [] for name in OPENAI_CATEGORIES},
        "reasonguard": {**ours, "harmful_score": probs.get("harmful") if probs else None},
    }
