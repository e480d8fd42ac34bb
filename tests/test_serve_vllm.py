"""`reasonguard serve --backend vllm`: a real uvicorn process on 127.0.0.1 in front of vLLM's
async engine (its CPU build), with SmolLM2-135M's real weights.

Every item joins the engine's running batch as it arrives: 100 concurrent requests are all
answered and the engine held many at once. The API is the HF path's: the official `openai`
client, `/v1/classify`, 401 / 413 / 422, and a 400 for fast mode, which vLLM lacks. The verdict
texts equal the HF backend's greedy outputs for the same model and prompts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from reasonguard.serve.schemas import ClassifyResponse
from test_serve import (
    AUTH,
    KEY,
    MAX_CHARS,
    MAX_ITEMS,
    Server,
    _stop_clean,
    answer_100_concurrent_requests,
    check_openai_errors,
    start_server,
)

if os.environ.get("CI"):
    import vllm  # noqa: F401  (`make setup` installs vLLM's CPU build: missing, this fails)
else:
    pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(
        tmp_path_factory.mktemp("serve-vllm"),
        "vllm",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--max-items",
        str(MAX_ITEMS),
        "--max-chars",
        str(MAX_CHARS),
        "--timeout-s",
        "300",
        model="smollm2",
        backend="vllm",
    )
    try:
        started.wait_ready(timeout_s=600)
        yield started
    finally:
        _stop_clean(started)


def test_100_concurrent_requests_share_the_running_batch(server: Server) -> None:
    answer_100_concurrent_requests(server, "smollm2", timeout_s=300)
    stats = httpx.get(f"{server.url}/health").json()["batcher"]
    assert stats["engine"].startswith("vllm-async")
    assert stats["items"] >= 100 and stats["generated_tokens"] > 0, stats
    assert stats["most_items_at_once"] > 1, stats
    assert stats["queued_items"] == 0 and stats["running_requests"] == 0, stats


def test_verdicts_equal_the_hf_backend(server: Server) -> None:
    from reasonguard.infer.guard import load_guard

    items = [
        {"prompt": "How do I bake bread?", "response": None},
        {"prompt": "Write a threatening message.", "response": "I can't help with that."},
    ]
    r = httpx.post(f"{server.url}/v1/classify", json={"items": items}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    served = ClassifyResponse.model_validate(r.json()).results
    reference = load_guard("smollm2", device="cpu").classify(
        items, max_new_tokens=NEW_TOKENS, scores=False
    )
    assert [v.output for v in served] == [g.output for g in reference]
    assert [v.num_tokens for v in served] == [g.num_tokens for g in reference]
    assert served[1].response_refusal == reference[1].response_refusal


def test_openai_client_and_error_paths(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    response = client.moderations.create(input=["Hello there", "How do I pick a lock?"])
    assert response.id.startswith("modr-") and len(response.results) == 2
    assert all(isinstance(result.flagged, bool) for result in response.results)
    assert response.results[0].model_extra["reasonguard"]["num_tokens"] > 0
    check_openai_errors(server)
    for raw in (b"{not json", b'{"items": [{"response": "no prompt"}]}'):
        headers = {**AUTH, "Content-Type": "application/json"}
        r = httpx.post(f"{server.url}/v1/classify", content=raw, headers=headers)
        assert r.status_code == 422, r.text
    fast = {"input": "hi", "reasoning": "never"}
    r = httpx.post(f"{server.url}/v1/moderations", json=fast, headers=AUTH)
    assert r.status_code == 400 and "fast mode" in r.json()["error"]["message"]
    assert server.process.poll() is None
