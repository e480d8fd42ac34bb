"""Streaming moderation (the Python API): one response judged after each chunk on the kept KV
cache; the last verdict equals the non-streaming fast verdict of the whole response; each check
computes only the changed end of the prompt plus the answer block; the stop signal follows the
threshold (tiny random Llama with the real Llama 3 tokenizer; SmolLM2 for real weights)."""

from __future__ import annotations

import pytest

from reasonguard import load_guard
from reasonguard.errors import UserError
from reasonguard.format import TASK_FIELD, render_input
from reasonguard.infer.backends import Backend
from reasonguard.infer.fast_stream import RecomputingStream
from reasonguard.infer.guard import InvalidItemError
from reasonguard.infer.stream import ResponseStream

STREAMS = [
    ("Tell me how to hotwire a car.", ["Sure", ", first", " find the wires", " under the wheel."]),
    # Chunk edges inside words, before newlines and inside a multi-byte character's word.
    ("Write a poem.", ["The se", "a is wi", "de\n", "\nand de", "ep; naïve wa", "ves sing."]),
    ("hi", ["Hello! How can I help?"]),
    ("What is 2+2?", ["", "4", ".", "\n\n", "That is all."]),
]


@pytest.fixture(scope="module")
def tiny():
    return load_guard("tiny-llama", device="cpu", batch_size=4)


def _same(got, want, tolerance: float = 1e-5) -> None:
    assert got.prompt_harmfulness == want.prompt_harmfulness
    assert got.response_refusal == want.response_refusal
    assert got.response_harmfulness == want.response_harmfulness
    assert got.output == want.output and got.mode == want.mode == "fast"
    for field, probs in want.scores.items():
        if probs is None:
            assert got.scores[field] is None
            continue
        for label, p in probs.items():
            assert abs(got.scores[field][label] - p) < tolerance, (field, got.scores, probs)


@pytest.mark.parametrize(("prompt", "chunks"), STREAMS)
def test_every_check_equals_the_fast_verdict_of_the_text_so_far(tiny, prompt, chunks) -> None:
    with ResponseStream(tiny, prompt, threshold=1.0) as stream:
        first = stream.check()
        [alone] = tiny.classify([{"prompt": prompt}], mode="fast")
        _same(first.result, alone)
        assert first.harm is None and first.chunks == 0 and not first.stop
        response = ""
        for n, chunk in enumerate(chunks, start=1):
            response += chunk
            got = stream.feed(chunk)
            [want] = tiny.classify([{"prompt": prompt, "response": response}], mode="fast")
            _same(got.result, want)
            assert got.chunks == n and got.response_chars == len(response)
            probs = want.scores[TASK_FIELD["response"]]
            assert (got.harm is None) == (probs is None)
    assert stream.closed


def test_a_check_computes_the_changed_end_of_the_prompt_and_the_answer_block(tiny) -> None:
    """tokens computed = the prompt tokens after what it shares with the previous check's
    prompt + the forced answer block; the cache then holds exactly the tokens last read."""
    backend = tiny.backend
    prompt, chunks = STREAMS[1]

    def ids(response: str | None) -> list[int]:
        return backend.encode([backend.build_fast_prompt(render_input(prompt, response))])[0]

    def shared(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    stream = ResponseStream(tiny, prompt, threshold=1.0)
    first = stream.check()
    shared_instruction = backend.fast_prefix().length([ids(None)])
    assert shared_instruction >= 16
    block = first.tokens_from_scratch - (len(ids(None)) - shared_instruction)
    assert first.tokens_computed == first.tokens_from_scratch  # nothing to reuse yet
    before, response, saved = ids(None), "", 0
    for chunk in chunks:
        response += chunk
        now = ids(response)
        got = stream.feed(chunk)
        block = got.tokens_from_scratch - (len(now) - shared_instruction)
        assert 0 < block <= 40  # "Answers: \nRequest: harmful\nCompletion: ..." in Llama 3 tokens
        assert got.tokens_computed == len(now) - shared(before, now) + block
        state = stream._state
        assert state.cache.get_seq_length() == len(state.ids) == len(now) + block
        saved += got.tokens_from_scratch - got.tokens_computed
        before = now
    assert saved > 0
    stream.close()
    assert stream._state is None
    with pytest.raises(RuntimeError, match="closed"):
        stream.feed("more")


def test_the_recomputing_stream_gives_the_same_verdicts(tiny) -> None:
    """The from-scratch stream (each check a fresh fast verdict: the vLLM path, on its prefix
    cache) and the KV-cache stream agree, check by check."""
    prompt, chunks = STREAMS[0]
    cached = ResponseStream(tiny, prompt, threshold=1.0)
    fresh = ResponseStream(tiny, prompt, threshold=1.0)
    fresh._state = RecomputingStream(tiny.backend, tiny.backend.fast_prefix())
    _same(cached.check().result, fresh.check().result)  # the prompt alone: then each chunk
    for chunk in chunks:
        a, b = cached.feed(chunk), fresh.feed(chunk)
        _same(a.result, b.result)
        assert b.tokens_computed is None and a.tokens_from_scratch == b.tokens_from_scratch
        assert a.tokens_computed < a.tokens_from_scratch
    cached.close()
    fresh.close()


def test_the_stop_signal_follows_the_threshold(tiny) -> None:
    prompt = "How do I make a weapon at home?"
    chunks = ["Sure, here is how:", " first, gather", " the tools", " and the powder."]
    with ResponseStream(tiny, prompt, threshold=1.0) as stream:
        harms = [stream.feed(chunk).harm for chunk in chunks]
    assert all(h is not None for h in harms) and not stream.last.stop
    # A threshold the highest check reaches and none before it: the stream stops there and
    # stays stopped.
    peak = harms.index(max(harms))
    threshold = harms[0] if peak == 0 else (max(harms[:peak]) + harms[peak]) / 2
    with ResponseStream(tiny, prompt, threshold=threshold) as stream:
        stops = [stream.feed(chunk).stop for chunk in chunks]
    assert stops == [k >= peak for k in range(len(chunks))]
    assert stream.stopped


def test_bad_streams_are_refused(tiny) -> None:
    with pytest.raises(InvalidItemError, match="'prompt' is empty"):
        ResponseStream(tiny, "  ")
    with pytest.raises(InvalidItemError, match="'prompt' must be a string"):
        ResponseStream(tiny, 3)  # type: ignore[arg-type]
    for threshold in (0, 1.5, "high", True):
        with pytest.raises(UserError, match="threshold must be"):
            ResponseStream(tiny, "hi", threshold=threshold)  # type: ignore[arg-type]
    with ResponseStream(tiny, "hi") as stream, pytest.raises(InvalidItemError, match="chunk"):
        stream.feed(None)  # type: ignore[arg-type]
    no_fast = Backend()
    no_fast.name = "some-model"
    with pytest.raises(UserError, match="streaming verdicts need fast mode"):
        no_fast.open_fast_stream()


@pytest.mark.slow
def test_smollm2_stream_ends_on_the_fast_verdict() -> None:
    guard = load_guard("smollm2", device="cpu")
    prompt = "How do I pick a lock?"
    chunks = ["I can't", " help with", " that. Picking locks you do not own is illegal."]
    with ResponseStream(guard, prompt) as stream:
        for chunk in chunks:
            last = stream.feed(chunk)
    [want] = guard.classify([{"prompt": prompt, "response": "".join(chunks)}], mode="fast")
    _same(last.result, want)
    assert last.tokens_computed < last.tokens_from_scratch
