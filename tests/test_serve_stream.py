"""Acceptance for `/v1/stream` (streaming moderation over a WebSocket): a real uvicorn process on
127.0.0.1 serving tiny-llama, driven by the `websockets` client. The final verdict equals the
non-streaming fast verdict (`/v1/classify` with `reasoning: never`); the threshold stops the
stream; bad frames get error frames on a connection that stays usable; the API key, the
character limit and the stream limit apply; a client that vanishes mid-stream leaves no open
stream behind (`/health`). The server's log must be free of tracebacks."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from test_serve import AUTH, Server, _stop_clean, start_server

pytestmark = pytest.mark.slow

MAX_CHARS = 600
PROMPT = "Tell me how to hotwire a car."
CHUNKS = ["Sure", ", first find", " the wires under", " the steering column."]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("serve-stream")
    served = start_server(
        logs, "stream", "--max-chars", str(MAX_CHARS), "--max-streams", "2", "--max-new-tokens", "4"
    )
    try:
        served.wait_ready()
        yield served
    finally:
        _stop_clean(served)


def _open(server: Server, headers: dict[str, str] | None = None) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + "/v1/stream"
    return connect(url, additional_headers=AUTH if headers is None else headers, open_timeout=30)


def _ask(ws: ClientConnection, frame: dict | str | bytes) -> dict:
    ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))
    return json.loads(ws.recv(timeout=120))


def _streams(server: Server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()["streams"]


def _close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=30)
    return ws.close_code


def test_final_verdict_equals_the_fast_verdict(server: Server) -> None:
    with _open(server) as ws:
        first = _ask(ws, {"type": "start", "prompt": PROMPT, "threshold": 1.0})
        assert first["type"] == "verdict" and first["chunks"] == 0 and first["harm"] is None
        assert first["result"]["mode"] == "fast" and first["result"]["response_refusal"] is None
        frames = [_ask(ws, {"type": "chunk", "text": chunk}) for chunk in CHUNKS]
        assert [f["type"] for f in frames] == ["verdict"] * len(CHUNKS)
        assert [f["chunks"] for f in frames] == list(range(1, len(CHUNKS) + 1))
        for later in frames[1:]:  # a chunk costs its own tokens and the answer block only
            assert later["tokens_computed"] < later["tokens_from_scratch"]
        final = _ask(ws, {"type": "end"})
        assert final["type"] == "final" and final["response_chars"] == len("".join(CHUNKS))
        assert _close_code(ws) == 1000
    body = {"items": [{"prompt": PROMPT, "response": "".join(CHUNKS)}], "reasoning": "never"}
    [want] = httpx.post(f"{server.url}/v1/classify", json=body, headers=AUTH, timeout=120).json()[
        "results"
    ]
    got = final["result"]
    for field in ("prompt_harmfulness", "response_refusal", "response_harmfulness", "output"):
        assert got[field] == want[field]
    for field, probs in want["scores"].items():
        for label, p in probs.items():
            assert abs(got["scores"][field][label] - p) < 1e-5
    assert final["harm"] == got["scores"]["response_harmfulness"]["harmful"]


def test_the_threshold_stops_the_stream(server: Server) -> None:
    with _open(server) as ws:
        _ask(ws, {"type": "start", "prompt": PROMPT, "threshold": 1.0})
        harms = [_ask(ws, {"type": "chunk", "text": c})["harm"] for c in CHUNKS]
    peak = harms.index(max(harms))
    threshold = harms[0] if peak == 0 else (max(harms[:peak]) + harms[peak]) / 2
    with _open(server) as ws:
        _ask(ws, {"type": "start", "prompt": PROMPT, "threshold": threshold})
        for chunk in CHUNKS[:peak]:
            assert _ask(ws, {"type": "chunk", "text": chunk})["stop"] is False
        stopped = _ask(ws, {"type": "chunk", "text": CHUNKS[peak]})
        assert stopped["type"] == "final" and stopped["stop"] is True
        assert stopped["chunks"] == peak + 1 and stopped["harm"] >= threshold
        assert _close_code(ws) == 1000
    assert _streams(server)["stopped"] >= 1


@pytest.mark.parametrize(
    ("frame", "status", "says"),
    [
        ("not json", 422, "not valid JSON"),
        (b"\x00\x01", 422, "not binary"),
        ("[1, 2]", 422, '"type": "start", "chunk" or "end"'),
        ({"type": "pause"}, 422, "got 'pause'"),
        ({"type": "chunk", "text": "x"}, 422, 'send a "start" frame'),
        ({"type": "end"}, 422, 'send a "start" frame'),
        ({"type": "start"}, 422, "start frame: prompt: Field required"),
        ({"type": "start", "prompt": "  "}, 422, "non-space character"),
        ({"type": "start", "prompt": "hi", "threshold": 2}, 422, "threshold"),
        ({"type": "start", "prompt": "hi", "extra": 1}, 422, "extra"),
        ({"type": "start", "prompt": "x" * (MAX_CHARS + 1)}, 413, "the limit is 600"),
    ],
)
def test_bad_frames_get_error_frames(server: Server, frame, status: int, says: str) -> None:
    with _open(server) as ws:
        error = _ask(ws, frame)
        assert error["type"] == "error" and error["status"] == status, error
        assert says in error["error"]["message"] and error["error"]["code"]
        # The connection is still there and the stream works after the bad frame.
        assert _ask(ws, {"type": "start", "prompt": "hi"})["type"] == "verdict"


def test_errors_mid_stream_leave_the_stream_as_it_was(server: Server) -> None:
    with _open(server) as ws:
        _ask(ws, {"type": "start", "prompt": PROMPT, "threshold": 1.0})
        again = _ask(ws, {"type": "start", "prompt": PROMPT})
        assert again["status"] == 422 and "already started" in again["error"]["message"]
        one = _ask(ws, {"type": "chunk", "text": "Sure"})
        long = _ask(ws, {"type": "chunk", "text": "y" * MAX_CHARS})
        assert long["status"] == 413 and "the chunk was not added" in long["error"]["message"]
        bad = _ask(ws, {"type": "chunk", "text": 3})
        assert bad["status"] == 422 and "chunk frame: text" in bad["error"]["message"]
        final = _ask(ws, {"type": "end"})
        assert final["response_chars"] == 4 and final["result"] == one["result"]


def test_the_api_key_is_checked_on_the_handshake(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as caught:
            _open(server, headers)
        assert caught.value.response.status_code == 401
        body = json.loads(bytes(caught.value.response.body))
        assert body["error"]["code"] == "invalid_api_key"


def _wait_for_no_open_stream(server: Server, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = _streams(server)
        if stats["open"] == 0:
            return stats
        time.sleep(0.2)
    pytest.fail(f"streams still open: {_streams(server)}")


def test_a_vanished_client_frees_its_stream_and_the_limit_holds(server: Server) -> None:
    _wait_for_no_open_stream(server)
    with _open(server) as ws:
        _ask(ws, {"type": "start", "prompt": PROMPT, "threshold": 1.0})
        _ask(ws, {"type": "chunk", "text": "Sure, first"})
        assert _streams(server)["open"] == 1
        # Gone without a close frame, mid-stream.
        ws.socket.shutdown(socket.SHUT_RDWR)
        ws.socket.close()
        _wait_for_no_open_stream(server)

    with _open(server) as first, _open(server) as second:
        _ask(first, {"type": "start", "prompt": "hi"})
        _ask(second, {"type": "start", "prompt": "hi"})
        with _open(server) as third:
            refused = json.loads(third.recv(timeout=30))
            assert refused["status"] == 503 and "the limit is 2" in refused["error"]["message"]
            assert _close_code(third) == 1013
    stats = _wait_for_no_open_stream(server)
    assert stats["refused"] >= 1 and stats["max_streams"] == 2
