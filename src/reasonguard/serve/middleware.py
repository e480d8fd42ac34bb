"""The server's ASGI middleware and error shapes: the API-key check (`BearerAuth`), the body
size limit (`BodyLimit`), both answering before any route reads the body, and the OpenAI-style
error response every status code gets (`error_response`, `ERROR_CODES`).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from reasonguard.serve.schemas import ErrorResponse, error_body


def error_response(
    status: int, message: str, code: str, kind: str = "invalid_request_error"
) -> Any:
    return JSONResponse(error_body(message, code, kind), status)


ERROR_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    500: "model_error",
    503: "overloaded",
    504: "timeout",
}
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": code.replace("_", " ")}
    for status, code in ERROR_CODES.items()
    if status in (401, 413, 415, 503, 504)
}


class BearerAuth:
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
        response = error_response(
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


class BodyLimit:
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
                await error_response(413, message, "request_too_large")(scope, receive, send)
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
