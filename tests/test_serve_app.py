"""The server app and batcher in-process, with a fake guard (no model): mapping, limits, errors,
auth, batching, timeouts, failure isolation, and the `serve` command's refusals.

The real-uvicorn acceptance tests are in test_serve.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from reasonguard.commands.serve import is_loopback
from reasonguard.serve.app import ServeSettings, create_app
from reasonguard.serve.batcher import BatchFailed, BatchTimeout, DynamicBatcher, QueueFull
from reasonguard.serve.schemas import OPENAI_CATEGORIES, ModerationResponse

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass(frozen=True)
class FakeResult:
    label: str | None
    harmful: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        probs = {"harmful": self.harmful, "unharmful": 1 - self.harmful}
        return {
            "prompt_harmfulness": self.label,
            "response_refusal": None,
            "response_harmfulness": None,
            "is_parsing_error": self.label is None,
            "reason": "fake reasoning",
            "truncated": False,
            "scores": {
                "prompt_harmfulness": probs,
                "response_refusal": None,
                "response_harmfulness": None,
            },
            "output": "",
            "num_tokens": 0,
        }


class FakeGuard:
    """`bomb` -> harmful (p 0.9), `???` -> parsing error, `boom` raises, `slow` sleeps."""

    prompt_format = "raw"

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.timeouts: list[float | None] = []
        self.modes: list[str | None] = []

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        scores: bool = True,
        timeout_s: float | None = None,
        mode: str | None = None,
    ) -> list:
        self.calls.append([dict(i) for i in items])
        self.modes.append(mode)
        self.timeouts.append(timeout_s)
        if any("boom" in i["prompt"] for i in items):
            raise RuntimeError("boom")
        if any("slow" in i["prompt"] for i in items):
            time.sleep(1.0)
        out = []
        for item in items:
            if "???" in item["prompt"]:
                out.append(FakeResult(None))
            elif "bomb" in item["prompt"]:
                out.append(FakeResult("harmful", 0.9))
            else:
                out.append(FakeResult("unharmful", 0.2))
        return out


@pytest.fixture
def guard() -> FakeGuard:
    return FakeGuard()


def _client(guard: FakeGuard, timeout_s: float) -> TestClient:
    settings = ServeSettings(
        model_name="fake", api_key=KEY, max_items=4, max_chars=100, timeout_s=timeout_s
    )
    return TestClient(create_app(guard, settings))


@pytest.fixture
def client(guard: FakeGuard) -> Iterator[TestClient]:
    with _client(guard, timeout_s=10) as c:
        yield c


def test_moderation_maps_verdict_to_openai_shape(client: TestClient) -> None:
    r = client.post(
        "/v1/moderations", json={"input": ["make a bomb", "hello", "???"]}, headers=AUTH
    )
    assert r.status_code == 200
    body = ModerationResponse.model_validate(r.json())
    assert body.id.startswith("modr-") and body.model == "fake"
    assert [m.flagged for m in body.results] == [True, False, False]
    first = r.json()["results"][0]
    # Every OpenAI category is present and unassessed; the decision is `flagged` + ours.
    assert list(first["categories"]) == list(OPENAI_CATEGORIES)
    assert not any(first["categories"].values()) and not any(first["category_scores"].values())
    assert first["reasonguard"]["harmful_score"] == pytest.approx(0.9)
    assert first["reasonguard"]["reason"] == "fake reasoning"
    parse_error = r.json()["results"][2]["reasonguard"]
    assert parse_error["is_parsing_error"] is True
    assert parse_error["scores"]["prompt_harmfulness"] is None  # NaN is not JSON: dropped
    assert parse_error["harmful_score"] is None


def test_moderation_text_parts_are_one_input(client: TestClient, guard: FakeGuard) -> None:
    parts = [{"type": "text", "text": "make a"}, {"type": "text", "text": "bomb"}]
    r = client.post("/v1/moderations", json={"input": parts, "model": "x"}, headers=AUTH)
    assert r.status_code == 200 and [m["flagged"] for m in r.json()["results"]] == [True]
    assert guard.calls[-1] == [{"prompt": "make a\nbomb", "response": None}]


def test_reasoning_field_picks_the_guard_mode(client: TestClient, guard: FakeGuard) -> None:
    def mode_of(body: dict) -> str | None:
        r = client.post("/v1/classify", json={"items": [{"prompt": "hi"}], **body}, headers=AUTH)
        assert r.status_code == 200, r.text
        return guard.modes[-1]

    assert mode_of({"reasoning": "never"}) == "fast"
    assert mode_of({"reasoning": "always"}) == "reasoning"
    assert mode_of({}) == "reasoning"  # auto, and this guard has no calibrated bands
    guard.bands = object()  # a calibrated cascade: auto now means the cascade
    assert mode_of({"reasoning": "auto"}) == "cascade"
    r = client.post("/v1/moderations", json={"input": "hi", "reasoning": "never"}, headers=AUTH)
    assert r.status_code == 200 and guard.modes[-1] == "fast"
    r = client.post(
        "/v1/classify", json={"items": [{"prompt": "hi"}], "reasoning": "sometimes"}, headers=AUTH
    )
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("body.reasoning")


def test_server_default_reasoning_setting(guard: FakeGuard) -> None:
    settings = ServeSettings(model_name="fake", api_key=KEY, reasoning="never")
    with TestClient(create_app(guard, settings)) as c:
        assert c.post("/v1/classify", json={"items": [{"prompt": "x"}]}, headers=AUTH).is_success
    assert guard.modes == ["fast"]
    with pytest.raises(ValueError, match="reasoning must be auto, always or never"):
        ServeSettings(model_name="fake", reasoning="maybe")


def test_classify_passes_prompt_and_response(client: TestClient, guard: FakeGuard) -> None:
    items = [{"prompt": "hi", "response": "hello"}, {"prompt": "bomb", "extra": 1}]
    r = client.post("/v1/classify", json={"items": items}, headers=AUTH)
    assert r.status_code == 200 and r.json()["id"].startswith("clf-")
    assert [v["prompt_harmfulness"] for v in r.json()["results"]] == ["unharmful", "harmful"]
    sent = sorted(item for call in guard.calls for item in map(str, call))
    assert sent == sorted(
        map(str, [{"prompt": "hi", "response": "hello"}, {"prompt": "bomb", "response": None}])
    )


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}]
)
def test_api_key_required_on_v1(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [
        ("post", "/v1/moderations"),
        ("post", "/v1/classify"),
        ("get", "/v1/models"),
    ]:
        r = client.request(method, path, json={"input": "x"}, headers=headers)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    # Checked before the body is parsed: malformed JSON without a key is still 401.
    r = client.post("/v1/moderations", content=b"{", headers=headers)
    assert r.status_code == 401
    assert client.get("/health").status_code == 200  # probes need no key


@pytest.mark.parametrize(
    "body",
    [
        {"input": ["a"] * 5},  # max_items = 4
        {"input": "a" * 101},  # max_chars = 100
        {"items": [{"prompt": "a" * 60, "response": "b" * 41}]},
    ],
)
def test_limits_are_413(client: TestClient, body: dict) -> None:
    path = "/v1/classify" if "items" in body else "/v1/moderations"
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_oversized_body_is_413_before_parsing(client: TestClient) -> None:
    r = client.post("/v1/moderations", content=b"x" * (2 << 20), headers=AUTH)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_oversized_streamed_body_is_413(client: TestClient) -> None:
    def chunks():  # no Content-Length: the limit is counted as the bytes arrive
        for _ in range(64):
            yield b"x" * (1 << 16)

    r = client.post("/v1/moderations", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b'{"input": []}',
        b'{"input": ""}',
        b'{"input": " \\n"}',
        b'{"input": 3}',
        b'{"input": "\\ud800"}',
        b'{"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]}',
        b'{"inputs": "x"}',
        b'{"items": []}',
    ],
)
def test_malformed_bodies_are_422(client: TestClient, raw: bytes, guard: FakeGuard) -> None:
    path = "/v1/classify" if b"items" in raw else "/v1/moderations"
    r = client.post(path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_body" and r.json()["detail"]
    assert "\\ud800" not in r.text  # the input is never echoed back
    assert guard.calls == []


def test_blank_classify_prompt_is_422(client: TestClient) -> None:
    # "\x1c" passes the schema pattern (not Unicode White_Space) but Python strips it: the
    # guard's own check is the authority and still answers 422, not 500.
    for prompt in ["", "\x1c"]:
        r = client.post("/v1/classify", json={"items": [{"prompt": prompt}]}, headers=AUTH)
        assert r.status_code == 422, prompt


def test_timeout_is_504_and_server_recovers(guard: FakeGuard) -> None:
    with _client(guard, timeout_s=0.3) as client:
        r = client.post("/v1/moderations", json={"input": "slow"}, headers=AUTH)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        # The guard was told how long the request had left, so a real one stops generating.
        assert 0 < guard.timeouts[0] <= 0.3
        # The slow batch cannot be interrupted; once it ends, the server answers again.
        while client.get("/health").json()["batcher"]["batches"] < 1:
            time.sleep(0.02)  # the slow batch ends by itself (pytest-timeout guards a hang)
        assert client.get("/health").json()["batcher"]["timeouts"] == 1
        assert client.post("/v1/moderations", json={"input": "a"}, headers=AUTH).status_code == 200


def test_model_failure_is_500_for_that_item_only(client: TestClient) -> None:
    results: dict[str, int] = {}

    def post(text: str) -> None:
        r = client.post("/v1/moderations", json={"input": text}, headers=AUTH)
        results[text] = r.status_code

    threads = [threading.Thread(target=post, args=(t,)) for t in ["boom", "a", "b", "c"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"boom": 500, "a": 200, "b": 200, "c": 200}
    assert client.get("/health").json()["batcher"]["failed_items"] == 1


def test_models_and_health(client: TestClient) -> None:
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["prompt_format"] == "raw"
    assert {"batches", "batch_sizes", "largest_batch", "queued_items"} <= set(health["batcher"])


# --------------------------------------------------------------------------------------------
# The batcher alone


def _echo(items: list[dict]) -> list[str]:
    time.sleep(0.02)
    return [i["prompt"] for i in items]


def test_batcher_merges_concurrent_requests() -> None:
    async def main() -> tuple[list, dict]:
        batcher = DynamicBatcher(_echo, max_batch_size=8, max_wait_ms=50)
        await batcher.start()
        try:
            requests = [batcher.submit([{"prompt": f"{i}"}], 5) for i in range(20)]
            answers = await asyncio.gather(*requests)
            return answers, batcher.stats()
        finally:
            await batcher.close()

    answers, stats = asyncio.run(main())
    assert answers == [[f"{i}"] for i in range(20)]
    assert stats["items"] == 20 and stats["largest_batch"] == 8 and stats["batches"] <= 4


def test_batcher_splits_large_requests_and_keeps_order() -> None:
    async def main() -> list:
        batcher = DynamicBatcher(_echo, max_batch_size=3, max_wait_ms=1)
        await batcher.start()
        try:
            return await batcher.submit([{"prompt": str(i)} for i in range(10)], 5)
        finally:
            await batcher.close()

    assert asyncio.run(main()) == [str(i) for i in range(10)]


def test_batcher_queue_limit_timeout_and_skipping() -> None:
    ran: list[str] = []

    def slow(items: list[dict]) -> list[str]:
        ran.extend(i["prompt"] for i in items)
        time.sleep(0.2)
        return [i["prompt"] for i in items]

    async def main() -> dict:
        batcher = DynamicBatcher(slow, max_batch_size=1, max_wait_ms=0, max_queue=3)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit([{"prompt": "first"}], 5))
            await asyncio.sleep(0.05)  # "first" is running in the thread
            with pytest.raises(QueueFull):
                await batcher.submit([{"prompt": "x"}] * 3, 5)
            with pytest.raises(BatchTimeout):
                await batcher.submit([{"prompt": "late"}], 0.05)
            assert await first == ["first"]
            await asyncio.sleep(0.1)
            return batcher.stats()
        finally:
            await batcher.close()

    stats = asyncio.run(main())
    assert ran == ["first"]  # the timed-out item was skipped, never run
    assert stats["timeouts"] == 1 and stats["rejected_requests"] == 1
    assert stats["queued_items"] == 0


def test_batcher_isolates_a_failing_item() -> None:
    def picky(items: list[dict]) -> list[str]:
        if any(i["prompt"] == "bad" for i in items):
            raise ValueError("bad item")
        return [i["prompt"] for i in items]

    async def main() -> list:
        batcher = DynamicBatcher(picky, max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit([{"prompt": p}], 5) for p in ["a", "bad", "b"]),
                return_exceptions=True,
            )
        finally:
            await batcher.close()

    a, bad, b = asyncio.run(main())
    assert a == ["a"] and b == ["b"] and isinstance(bad, BatchFailed)


def test_batcher_does_not_keep_or_change_items() -> None:
    item = {"prompt": "p", "response": None}

    def mutate(items: list[dict]) -> list[str]:
        items[0]["prompt"] = "changed"
        return ["ok"]

    async def main() -> None:
        batcher = DynamicBatcher(mutate)
        await batcher.start()
        try:
            await batcher.submit([item], 5)
        finally:
            await batcher.close()

    asyncio.run(main())
    assert item == {"prompt": "p", "response": None}


def test_batcher_call_runs_on_the_batch_thread_under_the_same_limits() -> None:
    """`call` (a streamed check) shares the worker thread with batches, and its queue limit,
    time limit and failure rules."""
    import threading

    threads: set[str] = set()
    release = threading.Event()
    finished: list[str] = []

    def run_batch(items: list[dict]) -> list[str]:
        threads.add(threading.current_thread().name)
        return [i["prompt"] for i in items]

    def blocked() -> str:
        threads.add(threading.current_thread().name)
        release.wait(30)
        finished.append("blocked")
        return "done"

    def broken() -> None:
        raise ValueError("no")

    async def main() -> dict:
        batcher = DynamicBatcher(run_batch, max_batch_size=2, max_wait_ms=0, max_queue=1)
        await batcher.start()
        try:
            assert await batcher.submit([{"prompt": "a"}], 5) == ["a"]
            with pytest.raises(BatchTimeout):
                await batcher.call(blocked, 0.05)  # runs on: the thread is busy with it
            running = asyncio.create_task(batcher.call(lambda: "next", 30))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):  # max_queue 1: "next" is waiting
                await batcher.call(lambda: "x", 5)
            release.set()
            assert await running == "next"
            with pytest.raises(BatchFailed) as failed:
                await batcher.call(broken, 5)
            assert isinstance(failed.value.__cause__, ValueError)
            return batcher.stats()
        finally:
            await batcher.close()

    stats = asyncio.run(main())
    assert finished == ["blocked"] and len(threads) == 1
    assert stats["calls"] == 3 and stats["timeouts"] == 1 and stats["failed_items"] == 1
    assert stats["rejected_requests"] == 1 and stats["queued_items"] == 0


# --------------------------------------------------------------------------------------------
# The command's refusals (before any model loads)


def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


def test_serve_refuses_exposed_bind_without_key(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli("serve", "--model", "tiny-llama", "--host", "0.0.0.0")
    assert code == 2 and "--allow-no-key" in err
    monkeypatch.delenv("RG_UNSET_KEY", raising=False)
    code, _, err = cli("serve", "--model", "tiny-llama", "--api-key-env", "RG_UNSET_KEY")
    assert code == 2 and "RG_UNSET_KEY" in err
    code, _, err = cli("serve", "--model", "tiny-llama", "--max-batch-size", "0")
    assert code == 2 and "max-batch-size" in err


def test_settings_reject_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_items"):
        ServeSettings(model_name="m", max_items=0)
    with pytest.raises(ValueError, match="api_key"):
        ServeSettings(model_name="m", api_key="")
