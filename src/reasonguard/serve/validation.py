"""The server's 415 and 422 messages: a body whose `Content-Type` is not JSON
(`content_type_problem`), and pydantic's validation errors of a request body said in the
user's terms (`validation_details`): the field path without pydantic's union-member names, one
error per field (the form the value was meant as), and what the field accepts, never the
offending input itself (it may be huge, private, or not encodable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def validation_details(errors: Sequence[Mapping[str, Any]], body: Any) -> list[dict[str, Any]]:
    """The 422 `detail` entries (`loc`, `msg`, `type`) of a request's validation errors."""
    return [
        {"loc": _location(e.get("loc", ())), "msg": _message(e, body), "type": e.get("type")}
        for e in _one_form(errors)
    ]


# What a client most often sends instead of JSON, in words (`curl -d` sends a form by default).
_BODY_KINDS = {
    "application/x-www-form-urlencoded": "a form body",
    "multipart/form-data": "a multipart form body",
}


def content_type_problem(body: Any, content_type: str | None) -> str | None:
    """The message for a body that was not read as JSON because its `Content-Type` is not
    JSON, or None. FastAPI parses a body as JSON only when the header is absent or names JSON;
    any other body reaches validation as raw bytes."""
    if not isinstance(body, bytes | bytearray) or not body:
        return None
    kind = (content_type or "").split(";")[0].strip().lower()
    what = _BODY_KINDS.get(kind, "a body")
    return (
        f"the request body must be JSON sent with 'Content-Type: application/json'; got {what} "
        f"('Content-Type: {kind}'). With curl, add -H 'Content-Type: application/json'"
    )


def _location(loc: Sequence[Any]) -> list[Any]:
    # pydantic names the member of a union that failed ("list[TextPart]",
    # "function-after[_utf8(), str]"); clients want the field path only.
    return [part for part in loc if not (isinstance(part, str) and part.endswith("]"))]


# What a field accepts, said where pydantic would only say which check failed.
_ACCEPTS = {
    "input": 'give a string, a non-empty list of strings, or a list of text parts ({"type": '
    '"text", "text": ...})',
    "items": 'give at least one item {"prompt": ..., "response": ...} (response optional)',
}


def _kind(value: Any) -> str:
    """A JSON value's kind, for messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _one_form(errors: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """pydantic reports a value that matches no form of a union once per form (`input`: a
    string, a list of strings, a list of text parts), the string form first: "Input should be a
    valid string" for an empty list. Keep the errors of the form the value was meant as (by
    its JSON kind), or one error saying what the field accepts."""
    out: list[Mapping[str, Any]] = []
    done: set[tuple[Any, ...]] = set()
    for error in errors:
        loc = tuple(error.get("loc", ()))
        member = next(
            (i for i, p in enumerate(loc) if isinstance(p, str) and p.endswith("]")), None
        )
        if member is None:
            out.append(error)
            continue
        prefix = loc[:member]
        if prefix in done:
            continue
        done.add(prefix)
        forms = [e for e in errors if _member_of(tuple(e.get("loc", ())), prefix)]
        out.extend(_pick_form(prefix, forms))
    return out


def _member_of(loc: tuple[Any, ...], prefix: tuple[Any, ...]) -> bool:
    """Whether an error location is inside a union member at `prefix`."""
    n = len(prefix)
    return len(loc) > n and loc[:n] == prefix and str(loc[n]).endswith("]")


def _pick_form(prefix: tuple[Any, ...], forms: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    member = len(prefix)
    value = next((e.get("input") for e in forms if len(e.get("loc", ())) == member + 1), None)
    accepts = _ACCEPTS.get(str(prefix[-1]), "it matches none of the accepted forms")

    def form(want_list: bool, parts: bool | None = None) -> list[Mapping[str, Any]]:
        chosen = []
        for e in forms:
            label = str(e["loc"][member])
            if label.startswith("list[") != want_list:
                continue
            if parts is not None and ("TextPart" in label) != parts:
                continue
            chosen.append(e)
        return chosen

    def plain(msg: str, kind: str) -> list[Mapping[str, Any]]:
        return [{"loc": prefix, "msg": msg, "type": kind}]

    if isinstance(value, str):
        return form(want_list=False) or forms
    if isinstance(value, list):
        if not value:
            return plain(f"an empty list; {accepts}", "too_short")
        dicts = [isinstance(v, dict) for v in value]
        if all(dicts):
            return form(want_list=True, parts=True) or forms
        if any(dicts) and any(isinstance(v, str) for v in value):
            return plain(f"a list that mixes strings and text parts; {accepts}", "value_error")
        return form(want_list=True, parts=False) or forms
    return plain(f"{_kind(value)}; {accepts}", "type_error")


def _message(error: Mapping[str, Any], body: Any = None) -> str:
    """A 422 detail's message, in the user's terms where pydantic's are its own."""
    kind, loc = error.get("type"), tuple(error.get("loc", ()))
    if kind == "string_pattern_mismatch":
        return "must contain a non-space character"  # our only pattern is the prompt's r"\S"
    if kind == "json_invalid":
        reason = str((error.get("ctx") or {}).get("error") or "malformed")
        reason = reason[:1].lower() + reason[1:]
        pos = loc[-1] if loc and isinstance(loc[-1], int) else None
        where = "" if pos is None else f" at character {pos}"
        if pos is not None and isinstance(body, str) and "\n" in body[:pos]:
            line = body.count("\n", 0, pos) + 1
            column = pos - body.rfind("\n", 0, pos)
            where += f" (line {line}, column {column})"
        return f"the request body is not valid JSON: {reason}{where}"
    if loc == ("body",) and kind == "missing":
        return "the request body is empty; send a JSON object (the schema is at /openapi.json)"
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
        return f"the request body must be a JSON object, got {_kind(error.get('input'))}"
    if kind == "too_short" and (error.get("ctx") or {}).get("actual_length") == 0:
        field = str(loc[-1]) if loc else ""
        return f"an empty list; {_ACCEPTS.get(field, 'give at least one')}"
    return str(error.get("msg", ""))
