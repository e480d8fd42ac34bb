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
415 a body not sent as JSON (a form, say), 422 malformed body, 503 queue full, 504 not answered within `timeout_s`, 500 the model failed on
an input (other requests are unaffected). A batch's generation stops once every request in it is
past its time limit (`Guard.classify(timeout_s=...)`), so a 504 does not leave the model busy.
The API-key and body-size middleware are `serve.middleware`'s, the 415 and 422 messages
`serve.validation`'s.

`GET /docs` is a plain page that links the OpenAPI schema (`/openapi.json`) and lists the
endpoints. FastAPI's own Swagger UI page loads its scripts and styles from a CDN, so it renders
blank on a machine without internet access; it is turned off rather than served half-working.

Example:
    >>> app = create_app(guard, ServeSettings(model_name="smollm2", api_key="s3cret"))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

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
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

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
from reasonguard.serve.middleware import (
    ERROR_CODES,
    ERROR_RESPONSES,
    BearerAuth,
    BodyLimit,
    error_response,
)
from reasonguard.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ModerationRequest,
    ModerationResponse,
    error_body,
    moderation_result,
    verdict,
)
from reasonguard.serve.streams import add_stream_route
from reasonguard.serve.validation import content_type_problem, validation_details

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
    modes = tuple(getattr(guard, "modes", ()))

    def mode_for(reasoning: str | None) -> str:
        asked = reasoning or settings.reasoning
        if modes == ("classifier",):  # an encoder classifier: one pass, nothing to reason with
            if asked == "always":
                raise HTTPException(
                    400, "reasoning 'always' needs a reasoning guard; this one is a classifier"
                )
            return "classifier"
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
        docs_url=None,  # FastAPI's Swagger UI needs a CDN; `/docs` below works offline
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    streams = add_stream_route(app, guard, settings, batcher)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_key is not None:  # added last, so it runs first: a 401 reads nothing
        app.add_middleware(BearerAuth, api_key=settings.api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = ERROR_CODES.get(exc.status_code, "error")
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        response = error_response(exc.status_code, str(exc.detail), code, kind)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        wrong_type = content_type_problem(exc.body, request.headers.get("content-type"))
        if wrong_type is not None:
            return error_response(415, wrong_type, "unsupported_media_type")
        # Only where and what, never the offending input: it may be huge, private, or not
        # encodable (a lone surrogate would turn this 422 into a 500).
        details = validation_details(exc.errors(), exc.body)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        whole_body = first["msg"].startswith("the request body")
        message = f"{where}: {first['msg']}" if where and not whole_body else first["msg"]
        body = error_body(message, "invalid_body")
        return JSONResponse({**body, "detail": jsonable_encoder(details)}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "internal_error", "server_error")

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

    @app.post("/v1/moderations", response_model=ModerationResponse, responses=ERROR_RESPONSES)
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

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        """Judge prompts and (optional) responses: verdicts, reasoning and scores."""
        items = [{"prompt": i.prompt, "response": i.response} for i in body.items]
        results = await judge(items, body.reasoning)
        return {
            "id": f"clf-{uuid.uuid4().hex}",
            "model": settings.model_name,
            "results": [verdict(r) for r in results],
        }

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def models() -> dict[str, Any]:
        """The served model, in OpenAI's list shape."""
        card = {"id": settings.model_name, "object": "model", "created": started}
        return {"object": "list", "data": [{**card, "owned_by": "reasonguard"}]}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Where the OpenAPI schema is, and the endpoints, in plain HTML (no scripts)."""
        return HTMLResponse(docs_page(app.openapi()))

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


def docs_page(schema: Mapping[str, Any]) -> str:
    """The `/docs` page: a link to `/openapi.json` and one line per endpoint of `schema`."""
    from html import escape

    rows = []
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            summary = operation.get("description") or operation.get("summary") or ""
            rows.append(f"<li><code>{method.upper()} {escape(path)}</code>: {escape(summary)}</li>")
    rows.append("<li><code>WS /v1/stream</code>: streaming moderation of a growing response</li>")
    title = escape(str(schema.get("info", {}).get("title", "reasonguard")))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title></head>"
        f"<body><h1>{title} API</h1><p>The OpenAPI schema of this server is at "
        "<a href='/openapi.json'>/openapi.json</a>: load it into any OpenAPI viewer or client "
        "generator. (This server serves no Swagger UI page: that page loads its scripts from a "
        "CDN and stays blank offline.)</p>"
        f"<h2>Endpoints</h2><ul>{''.join(rows)}</ul></body></html>\n"
    )
