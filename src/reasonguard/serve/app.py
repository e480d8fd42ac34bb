"""The FastAPI app factory: routes, limits, API-key check and error shapes; no model code.

`create_app(guard, settings)` takes anything with a WildGuard-style
`classify(items, scores=...) -> [result with .to_dict()]` (a loaded `reasonguard` Guard, or a
fake in tests), run through the dynamic batcher, or an `engine.AsyncGuard` (vLLM's async engine,
continuous batching across requests), which queues and batches by itself; and serves:

- `POST /v1/moderations`: the OpenAI moderation schema (mapping in `schemas.py`);
- `POST /v1/classify`: `{"items": [{"prompt", "response"}]}` -> one verdict per item;
- `GET /v1/models`: the served model, OpenAI list shape;
- `WS /v1/stream`: streaming moderation of one growing response (`streams.py`);
- `GET /health`: liveness plus the batcher's counters (batch-size histogram, queue, timeouts)
  and the open streams.

Errors use OpenAI's `{"error": {"message", "type", "code"}}` shape: 401 missing or wrong API key
(`/v1/*` only, checked before the body is read), 413 too many items / characters / bytes,
422 malformed body, 503 queue full, 504 not answered within `timeout_s`, 500 the model failed on
an input (other requests are unaffected). A batch's generation stops once every request in it is
past its time limit (`Guard.classify(timeout_s=...)`), so a 504 does not leave the model busy.

Example:
    >>> app = create_app(guard, ServeSettings(model_name="smollm2", api_key="s3cret"))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from reasonguard import __version__
from reasonguard.infer.guard import InvalidItemError, validate_items
from reasonguard.serve.batcher import (
    DEADLINE_KEY,
    MODE_KEY,
    OPTION_KEYS,
    SCORES_KEY,
    BatchFailed,
    BatchTimeout,
    DynamicBatcher,
    QueueFull,
)
from reasonguard.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModerationRequest,
    ModerationResponse,
    error_body,
    moderation_result,
    verdict,
)
from reasonguard.serve.streams import add_stream_route

logger = logging.getLogger(__name__)

REASONING_MODES = {"always": "reasoning", "never": "fast"}


class Classifier(Protocol):
    """What the app needs from a guard (see `reasonguard.infer.guard.Guard`)."""

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        scores: bool = ...,
        timeout_s: float | None = ...,
        mode: str | None = ...,
    ) -> list[Any]: ...


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and options (the `reasonguard serve` flags).

    Attributes:
        model_name: the id reported in responses and `/v1/models`.
        api_key: when set, `/v1/*` requires `Authorization: Bearer <api_key>`.
        max_batch_size: the most items per model batch.
        max_wait_ms: how long a batch's first item waits for more.
        max_items: the most items (texts) per request; more is 413.
        max_chars: the most characters (prompts + responses) per request; more is 413.
        timeout_s: seconds a request may wait for its results (queue + generation); then 504.
        max_queue: the most items waiting or running; more is 503.
        scores: compute label probabilities (one extra forward pass per item).
        reasoning: the default of a request's `reasoning` field: `auto` (the cascade when the
            model has calibrated bands, else `always`), `always` or `never` (fast mode).
        max_streams: the most `/v1/stream` WebSockets open at once (each holds one response's
            KV cache); one more is refused.
    """

    model_name: str
    api_key: str | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_items: int = 64
    max_chars: int = 100_000
    timeout_s: float = 120.0
    max_queue: int = 1024
    scores: bool = True
    reasoning: str = "auto"
    max_streams: int = 16

    def __post_init__(self) -> None:
        if self.reasoning not in ("auto", "always", "never"):
            raise ValueError(f"reasoning must be auto, always or never, got {self.reasoning!r}")
        for name in ("max_batch_size", "max_items", "max_chars", "max_queue", "max_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be None or a non-empty string")

    @property
    def max_body_bytes(self) -> int:
        """The request body limit: room for `max_chars` characters even when every one is
        JSON-escaped as a surrogate pair (12 bytes), plus 1 MiB of JSON structure."""
        return 12 * self.max_chars + (1 << 20)


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> Any:
    return JSONResponse(error_body(message, code, kind), status)


_ERROR_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    500: "model_error",
    503: "overloaded",
    504: "timeout",
}
_ERRORS = {
    status: {"model": ErrorResponse, "description": code.replace("_", " ")}
    for status, code in _ERROR_CODES.items()
    if status in (401, 413, 503, 504)
}


class _BearerAuth:
    """ASGI middleware: `/v1/*` requests need `Authorization: Bearer <key>`.

    A middleware rather than a route dependency so the key is checked before the body is read
    or parsed: an unauthenticated client learns nothing about the request format. A WebSocket
    (`/v1/stream`) is checked on its handshake and refused with the same 401 response.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        # compare_digest: the comparison time does not reveal how much of the key matched.
        if given and hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        response = _error(
            401,
            "missing or invalid API key (send 'Authorization: Bearer <key>')",
            "invalid_api_key",
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
            "extensions", {}
        ):
            # A server without the denial-response extension can only refuse the handshake.
            await send({"type": "websocket.close", "code": 1008})
            return
        await response(scope, receive, send)  # on a WebSocket: the HTTP 401 of the handshake


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 before anything parses it.

    A declared `Content-Length` over the limit is answered at once, without reading the body;
    a streamed body is cut off as soon as the bytes received pass the limit (the route's body
    read raises the 413, which FastAPI passes on as it is).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than {self.limit} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _error(413, message, "request_too_large")(scope, receive, send)
                return
        received = 0

        async def limited() -> Any:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def create_app(guard: Classifier, settings: ServeSettings) -> FastAPI:
    """Build the app around a loaded guard.

    Args:
        guard: an object with `classify(items, scores=..., timeout_s=...)` returning results
            with `to_dict()`; it is only ever called from one worker thread at a time.
        settings: limits and options.

    Returns:
        The FastAPI app; its lifespan starts and stops the batcher (`app.state.batcher`).
    """

    def run_batch(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Past the latest deadline of the batch every request has had its 504 and nobody wants
        # the results: generation stops there.
        deadline = max(item.get(DEADLINE_KEY, float("inf")) for item in items)
        timeout_s = None if deadline == float("inf") else max(deadline - time.monotonic(), 1e-3)
        results: list[Any] = [None] * len(items)
        # One classify call per mode in the batch (requests may ask for different ones).
        for mode in dict.fromkeys(item[MODE_KEY] for item in items):
            where = [i for i, item in enumerate(items) if item[MODE_KEY] == mode]
            clean = [{k: v for k, v in items[i].items() if k not in OPTION_KEYS} for i in where]
            found = guard.classify(clean, scores=settings.scores, timeout_s=timeout_s, mode=mode)
            for i, result in zip(where, found, strict=True):
                results[i] = result.to_dict()
        return results

    fast_ok = getattr(guard, "supports_fast", True)

    def mode_for(reasoning: str | None) -> str:
        asked = reasoning or settings.reasoning
        if asked == "auto":
            cascade = fast_ok and getattr(guard, "bands", None) is not None
            return "cascade" if cascade else "reasoning"
        if asked == "never" and not fast_ok:
            raise HTTPException(400, "reasoning 'never' needs fast mode, which this backend lacks")
        return REASONING_MODES[asked]

    batcher: Any
    if hasattr(guard, "submit"):
        # vLLM's async engine (serve/engine.py): every item joins the running batch at once.
        batcher = guard
    else:
        batcher = DynamicBatcher(
            run_batch, settings.max_batch_size, settings.max_wait_ms, settings.max_queue
        )
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="reasonguard",
        version=__version__,
        description="Reasoning guardrail server: OpenAI-compatible moderation and native "
        "prompt/response classification.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    streams = add_stream_route(app, guard, settings, batcher)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    if settings.api_key is not None:  # added last, so it runs first: a 401 reads nothing
        app.add_middleware(_BearerAuth, api_key=settings.api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _ERROR_CODES.get(exc.status_code, "error")
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        response = _error(exc.status_code, str(exc.detail), code, kind)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only where and what, never the offending input: it may be huge, private, or not
        # encodable (a lone surrogate would turn this 422 into a 500).
        details = [
            {
                "loc": _location(e.get("loc", ())),
                "msg": _message(e, exc.body),
                "type": e.get("type"),
            }
            for e in _one_form(exc.errors())
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        whole_body = first["msg"].startswith("the request body")
        message = f"{where}: {first['msg']}" if where and not whole_body else first["msg"]
        body = error_body(message, "invalid_body")
        return JSONResponse({**body, "detail": jsonable_encoder(details)}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error", "internal_error", "server_error")

    async def judge(items: list[dict[str, Any]], reasoning: str | None) -> list[dict[str, Any]]:
        """Check limits and items, then run them through the batcher."""
        if len(items) > settings.max_items:
            raise HTTPException(413, f"{len(items)} items; the limit is {settings.max_items}")
        chars = sum(len(item["prompt"]) + len(item.get("response") or "") for item in items)
        if chars > settings.max_chars:
            raise HTTPException(413, f"{chars} characters; the limit is {settings.max_chars}")
        try:
            validate_items(items)
        except InvalidItemError as exc:
            raise RequestValidationError(
                [{"loc": ("body",), "msg": str(exc), "type": "value_error"}]
            ) from None
        mode = mode_for(reasoning)
        deadline = time.monotonic() + settings.timeout_s
        try:
            options = {DEADLINE_KEY: deadline, MODE_KEY: mode, SCORES_KEY: settings.scores}
            return await batcher.submit([{**item, **options} for item in items], settings.timeout_s)
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        except BatchTimeout as exc:
            raise HTTPException(504, f"generation timed out: {exc}") from None
        except BatchFailed as exc:
            # Logged with its traceback by the batcher; the client gets no internals.
            raise HTTPException(500, str(exc)) from None

    @app.post("/v1/moderations", response_model=ModerationResponse, responses=_ERRORS)
    async def moderations(body: ModerationRequest) -> dict[str, Any]:
        """OpenAI-compatible moderation: each text is judged as a user prompt."""
        results = await judge(
            [{"prompt": text, "response": None} for text in body.texts()], body.reasoning
        )
        return {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": settings.model_name,
            "results": [moderation_result(r) for r in results],
        }

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS)
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        """Judge prompts and (optional) responses: verdicts, reasoning and scores."""
        items = [{"prompt": i.prompt, "response": i.response} for i in body.items]
        results = await judge(items, body.reasoning)
        return {
            "id": f"clf-{uuid.uuid4().hex}",
            "model": settings.model_name,
            "results": [verdict(r) for r in results],
        }

    @app.get("/v1/models", responses={401: _ERRORS[401]})
    async def models() -> dict[str, Any]:
        """The served model, in OpenAI's list shape."""
        card = {"id": settings.model_name, "object": "model", "created": started}
        return {"object": "list", "data": [{**card, "owned_by": "reasonguard"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and batcher counters (no API key needed, for load balancers)."""
        return {
            "status": "ok",
            "model": settings.model_name,
            "prompt_format": getattr(guard, "prompt_format", None),
            "uptime_s": int(time.time()) - started,
            "batcher": batcher.stats(),
            "streams": streams.stats(),
        }

    return app


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
