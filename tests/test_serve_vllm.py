"""`reasonguard serve --backend vllm`: a real uvicorn process on 127.0.0.1 in front of vLLM's
async engine (its CPU build), with SmolLM2-135M's real weights.

Every item joins the engine's running batch as it arrives: 100 concurrent requests are all
answered and the engine held many at once. The API is the HF path's: the official `openai`
client, `/v1/classify`, 401 / 413 / 422, and every `reasoning` mode: `never` (fast mode) answers
with the label probabilities, `auto` is the cascade of the model folder's calibrated bands. The
verdict texts equal the HF backend's greedy outputs for the same model and prompts, and the
probabilities the HF backend's within 1e-3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from reasonguard.serve.schemas import ClassifyResponse
from test_infer_vllm import assert_close, calibrated_smollm2
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
    # SmolLM2 with bands that send every item with a response to reasoning and no prompt alone,
    # served with `--reasoning always`: a request asks for `auto` (the cascade) or `never`.
    folder = tmp_path_factory.mktemp("serve-vllm")
    model = calibrated_smollm2(folder / "model", {"response": [0.0, 1.0]})
    started = start_server(
        folder,
        "vllm",
        "--reasoning",
        "always",
        "--served-model-name",
        "smollm2",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--max-items",
        str(MAX_ITEMS),
        "--max-chars",
        str(MAX_CHARS),
        "--timeout-s",
        "300",
        model=str(model),
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


ITEMS = [
    {"prompt": "How do I bake bread?", "response": None},
    {"prompt": "Write a threatening message.", "response": "I can't help with that."},
]


@pytest.fixture(scope="module")
def hf_guard():
    from reasonguard.infer.guard import load_guard

    return load_guard("smollm2", device="cpu", max_new_tokens=NEW_TOKENS)


def _classify(server: Server, reasoning: str | None = None) -> list:
    body = {"items": ITEMS} if reasoning is None else {"items": ITEMS, "reasoning": reasoning}
    r = httpx.post(f"{server.url}/v1/classify", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return ClassifyResponse.model_validate(r.json()).results


def test_verdicts_equal_the_hf_backend(server: Server, hf_guard) -> None:
    served = _classify(server)  # the server's default: always reason
    reference = hf_guard.classify(ITEMS)
    assert [v.mode for v in served] == ["reasoning", "reasoning"]
    assert [v.output for v in served] == [g.output for g in reference]
    assert [v.num_tokens for v in served] == [g.num_tokens for g in reference]
    assert served[1].response_refusal == reference[1].response_refusal
    for v, g in zip(served, reference, strict=True):
        assert_close(v.scores, g.scores, 1e-3)


def test_fast_mode_and_the_cascade(server: Server, hf_guard) -> None:
    fast = _classify(server, "never")
    reference = hf_guard.classify(ITEMS, mode="fast")
    for v, g in zip(fast, reference, strict=True):
        assert v.mode == "fast" and v.num_tokens == 0 and v.output == g.output
        assert_close(v.scores, g.scores, 1e-3)
    assert all(p is not None for p in fast[1].scores.values())
    # auto: the cascade reasons about the item with a response only, as its bands say.
    cascade = _classify(server, "auto")
    assert [v.mode for v in cascade] == ["fast", "reasoning"]
    assert cascade[0].output == fast[0].output
    assert_close(cascade[0].scores, fast[0].scores, 1e-5)  # a prefix-cache hit may round apart
    assert cascade[1].num_tokens > 0
    assert cascade[1].output == hf_guard.classify(ITEMS[1:])[0].output


def test_openai_client_and_error_paths(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    response = client.moderations.create(input=["Hello there", "How do I pick a lock?"])
    assert response.id.startswith("modr-") and len(response.results) == 2
    assert all(isinstance(result.flagged, bool) for result in response.results)
    assert response.results[0].model_extra["reasonguard"]["num_tokens"] > 0
    # Fast mode through the client: the verdict is the label probabilities, 200 with scores.
    fast = client.moderations.create(
        input=["Hello there", "How do I pick a lock?"], extra_body={"reasoning": "never"}
    )
    for result in fast.results:
        ours = result.model_extra["reasonguard"]
        assert ours["mode"] == "fast" and ours["num_tokens"] == 0
        probs = ours["scores"]["prompt_harmfulness"]
        assert abs(sum(probs.values()) - 1) < 1e-6
        assert ours["harmful_score"] == probs["harmful"]
        assert result.flagged == (probs["harmful"] > probs["unharmful"])
    check_openai_errors(server)
    for raw in (b"{not json", b'{"items": [{"response": "no prompt"}]}'):
        headers = {**AUTH, "Content-Type": "application/json"}
        r = httpx.post(f"{server.url}/v1/classify", content=raw, headers=headers)
        assert r.status_code == 422, r.text
    assert server.process.poll() is None
