"""The streaming moderation route: `/v1/stream`, a WebSocket that follows one response as it
grows (`reasonguard.infer.stream.ResponseStream`).

The client sends JSON text frames, the server answers each:

- `{"type": "start", "prompt": "...", "threshold": 0.5}` (threshold optional): the server
  answers with a `verdict` frame for the prompt alone (`chunks` 0);
- `{"type": "chunk", "text": "..."}`: the response so far grows by `text`; a `verdict` frame
  judges it;
- `{"type": "end"}`: a `final` frame with the verdict of the whole response, then the server
  closes the socket (code 1000).

A verdict frame is `{"type": "verdict" | "final", "chunks", "response_chars", "harm", "stop",
"tokens_computed", "tokens_from_scratch", "result"}`, `result` being a `/v1/classify` result
(fast mode: no reasoning). Once `harm`, the probability that the response is harmful, reaches
the threshold, `stop` is true: that frame is the `final` one and the server closes the socket
(the product should stop showing the response).

The same rules as the HTTP routes: the API key is checked on the handshake (a WebSocket
without it gets the HTTP 401 the other routes give), `max_chars` bounds prompt plus response,
`timeout_s` bounds each check, the model's queue limit applies to each check. An error is an
`{"type": "error", "status": 422, "error": {"message", "type", "param", "code"}}` frame (the
HTTP routes' body, with the HTTP status it would have had) and leaves the stream as it was:
a malformed or unknown frame, a chunk before `start`, a second `start`, a chunk past the
character limit (not added), a binary frame. A check past its time limit (504) still runs to
its end, so its chunk stays part of the response. At most `max_streams` streams are open at
once; one more gets a 503 error frame and is closed (code 1013, try again later). A client
that disconnects frees its stream at once; `/health` counts open streams.

Example (the `websockets` client):
    >>> async with websockets.connect("ws://127.0.0.1:8000/v1/stream") as ws:
    ...     await ws.send(json.dumps({"type": "start", "prompt": "How do I pick a lock?"}))
    ...     json.loads(await ws.recv())["result"]["prompt_harmfulness"]
    ...     await ws.send(json.dumps({"type": "chunk", "text": "Sure, first"}))
    ...     json.loads(await ws.recv())["harm"]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from reasonguard.errors import UserError
from reasonguard.infer.stream import DEFAULT_STOP_THRESHOLD, ResponseStream
from reasonguard.serve.batcher import BatchFailed, BatchTimeout, QueueFull
from reasonguard.serve.schemas import Prompt, Text, error_body, verdict

logger = logging.getLogger(__name__)

PATH = "/v1/stream"
TRY_AGAIN_LATER = 1013  # WebSocket close code: the server is overloaded


class StartFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["start"]
    prompt: Prompt
    threshold: float = Field(default=DEFAULT_STOP_THRESHOLD, gt=0, le=1)


class ChunkFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["chunk"]
    text: Text


class EndFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["end"]


Frame = TypeAdapter(Annotated[StartFrame | ChunkFrame | EndFrame, Field(discriminator="type")])


class BadFrame(Exception):
    """A frame the server answers with an error frame (the stream goes on as it was)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class StreamCounts:
    """The streams of one server, for `/health`."""

    limit: int
    open: int = 0
    opened: int = 0
    refused: int = 0
    checks: int = 0
    stopped: int = 0

    def stats(self) -> dict[str, int]:
        return {
            "open": self.open,
            "max_streams": self.limit,
            "opened": self.opened,
            "refused": self.refused,
            "checks": self.checks,
            "stopped": self.stopped,
        }


def parse_frame(message: dict[str, Any], max_bytes: int) -> StartFrame | ChunkFrame | EndFrame:
    """One received WebSocket message as a frame.

    Raises:
        BadFrame: binary, too large, not JSON, or not one of the frames.
    """
    text = message.get("text")
    if text is None:
        raise BadFrame(422, "send JSON text frames, not binary ones", "invalid_frame")
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadFrame(413, f"the frame is larger than {max_bytes} bytes", "request_too_large")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadFrame(
            422, f"the frame is not valid JSON: {exc.msg} at character {exc.pos}", "invalid_frame"
        ) from None
    if not isinstance(data, dict) or data.get("type") not in ("start", "chunk", "end"):
        got = data.get("type") if isinstance(data, dict) else None
        raise BadFrame(
            422,
            'expected a JSON object with "type": "start", "chunk" or "end"'
            + (f", got {got!r}" if isinstance(got, str) else ""),
            "invalid_frame",
        )
    try:
        return Frame.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:])  # [0] names the frame type
        message = str(first["msg"])
        if first["type"] == "string_pattern_mismatch":
            message = "must contain a non-space character"
        raise BadFrame(422, f"{data['type']} frame: {where}: {message}", "invalid_frame") from None


def add_stream_route(app: FastAPI, guard: Any, settings: Any, batcher: Any) -> StreamCounts:
    """Register `/v1/stream` (see the module docstring) on `app`.

    Args:
        guard: the served guard; streaming needs its backend's fast mode.
        settings: the server's `ServeSettings`.
        batcher: what runs model work (`DynamicBatcher.call` runs each check on its thread).

    Returns:
        The stream counters (for `/health`).
    """
    counts = StreamCounts(settings.max_streams)
    can_stream = bool(getattr(guard, "supports_fast", False)) and hasattr(batcher, "call")

    async def send_error(ws: WebSocket, status: int, message: str, code: str) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        await ws.send_json({"type": "error", "status": status, **error_body(message, code, kind)})

    async def run_check(ws: WebSocket, fn: Any) -> Any:
        """A check on the model's thread, or None after an error frame."""
        try:
            found = await batcher.call(fn, settings.timeout_s)
        except QueueFull as exc:
            await send_error(ws, 503, str(exc), "overloaded")
        except BatchTimeout as exc:
            await send_error(ws, 504, f"the check timed out: {exc}", "timeout")
        except BatchFailed as exc:
            await send_error(ws, 500, str(exc), "model_error")
        else:
            counts.checks += 1
            return found
        return None

    def frame(kind: str, found: Any) -> dict[str, Any]:
        data = found.to_dict()
        return {"type": kind, **data, "result": verdict(data["result"])}

    async def serve(ws: WebSocket) -> None:
        stream: ResponseStream | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    parsed = parse_frame(message, settings.max_body_bytes)
                    if isinstance(parsed, StartFrame):
                        if stream is not None:
                            raise BadFrame(422, "the stream has already started", "invalid_frame")
                        if len(parsed.prompt) > settings.max_chars:
                            raise BadFrame(
                                413,
                                f"{len(parsed.prompt)} characters; the limit is "
                                f"{settings.max_chars}",
                                "request_too_large",
                            )
                        try:
                            opened = ResponseStream(guard, parsed.prompt, parsed.threshold)
                        except UserError as exc:
                            raise BadFrame(422, str(exc), "invalid_frame") from None
                        found = await run_check(ws, opened.check)
                        if found is None:
                            opened.close()
                            continue
                        stream = opened
                        await ws.send_json(frame("verdict", found))
                        continue
                    if stream is None:
                        raise BadFrame(
                            422, 'send a "start" frame with the prompt first', "invalid_frame"
                        )
                    if isinstance(parsed, EndFrame):
                        found = stream.last
                        if found is None or found.chunks != stream.chunks:
                            # The last chunk's check failed or ran out of time: judge it now.
                            found = await run_check(ws, stream.check)
                            if found is None:
                                continue
                        await ws.send_json(frame("final", found))
                        await ws.close(1000)
                        return
                    total = len(stream.prompt) + len(stream.response) + len(parsed.text)
                    if total > settings.max_chars:
                        raise BadFrame(
                            413,
                            f"prompt and response would be {total} characters; the limit is "
                            f"{settings.max_chars} (the chunk was not added)",
                            "request_too_large",
                        )
                    text = parsed.text
                    found = await run_check(ws, lambda s=stream, t=text: s.feed(t))
                    if found is None:
                        continue
                    if found.stop:
                        counts.stopped += 1
                        await ws.send_json(frame("final", found))
                        await ws.close(1000)
                        return
                    await ws.send_json(frame("verdict", found))
                except BadFrame as exc:
                    await send_error(ws, exc.status, str(exc), exc.code)
        except WebSocketDisconnect:
            return
        finally:
            if stream is not None:
                stream.close()

    @app.websocket(PATH)
    async def stream_route(ws: WebSocket) -> None:
        await ws.accept()
        if not can_stream:
            await send_error(
                ws,
                400,
                "streaming needs fast mode, which this server's backend lacks",
                "bad_request",
            )
            await ws.close(1008)
            return
        if counts.open >= counts.limit:
            counts.refused += 1
            await send_error(
                ws,
                503,
                f"{counts.open} streams are open; the limit is {counts.limit}",
                "overloaded",
            )
            await ws.close(TRY_AGAIN_LATER)
            return
        counts.open += 1
        counts.opened += 1
        try:
            await serve(ws)
        finally:
            counts.open -= 1

    return counts
