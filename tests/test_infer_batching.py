"""Continuous batching in the HF backend (`infer/batching.py`): refilled slots give the outputs
of one-at-a-time decoding, the cache stays as wide as the longest live row, samples do not depend
on the batch, and a deadline stops generation with the outputs marked truncated."""

from __future__ import annotations

import time

import pytest
import torch

from reasonguard import load_guard
from reasonguard.format import render_input
from reasonguard.infer.loading import load_backend

PROMPTS = [
    render_input("hi"),
    render_input("Tell me how to pick a lock on my neighbour's door tonight, step by step."),
    render_input("How do I bake bread?"),
    render_input("Write a poem.", "Roses are red, violets are blue. " * 6),
    render_input("What is 2 + 2?", "4"),
    render_input("Summarise this.", "A long text about nothing in particular. " * 3),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return load_backend("tiny-llama", "hf", batch_size=2, device="cpu")


def _widths(backend):
    """Record the cache width of every decode step (one new token per row)."""
    widths: list[int] = []

    def hook(module, args, kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            widths.append(kwargs["past_key_values"].get_seq_length() + 1)

    return widths, backend.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_refilled_slots_equal_one_at_a_time_and_the_cache_stays_narrow(tiny) -> None:
    prompts = [tiny.build_prompt(p) for p in PROMPTS]
    lengths = [len(ids) for ids in tiny.encode(prompts)]
    widths, handle = _widths(tiny)
    try:
        together = tiny.generate(prompts, max_new_tokens=6)  # 6 prompts through 2 slots
    finally:
        handle.remove()
    tiny.batch_size = 1
    try:
        alone = tiny.generate(prompts, max_new_tokens=6)
    finally:
        tiny.batch_size = 2
    assert together == alone
    # Finished rows leave: the cache never outgrows the longest prompt plus its new tokens, and
    # it narrows again once the longest rows are done.
    assert max(widths) <= max(lengths) + 6
    assert widths[-1] <= sorted(lengths)[1] + 6


def test_padded_attention_gives_the_same_tokens(tiny) -> None:
    """On a GPU, decode steps use SDPA over the padded cache with a mask (on a CPU, attention
    runs row by row over each row's own columns): both give the same greedy tokens."""
    prompts = [tiny.build_prompt(p) for p in PROMPTS]
    ragged = tiny.generate(prompts, max_new_tokens=6)
    assert tiny.model.config._attn_implementation == "reasonguard_ragged"
    tiny.model.config._attn_implementation = "sdpa"
    try:
        padded = tiny.generate(prompts, max_new_tokens=6)
    finally:
        tiny.model.config._attn_implementation = "reasonguard_ragged"
    assert padded == ragged


def test_samples_do_not_depend_on_the_batch(tiny) -> None:
    prompts = [tiny.build_prompt(p) for p in PROMPTS[:3]]
    options = {"max_new_tokens": 5, "temperature": 1.0, "top_p": 0.9, "num_samples": 2, "seed": 3}
    batched = tiny.generate(prompts, **options)
    tiny.batch_size = 1
    try:
        alone = tiny.generate(prompts, **options)
    finally:
        tiny.batch_size = 2
    assert batched == alone
    assert batched != tiny.generate(prompts, **{**options, "seed": 4})


@pytest.fixture
def slow_steps(tiny):
    """Every forward pass takes at least 50 ms."""
    handle = tiny.model.register_forward_hook(lambda *_: time.sleep(0.05))
    yield
    handle.remove()


def test_deadline_stops_generation_and_flags_it(tiny, slow_steps) -> None:
    prompts = [tiny.build_prompt(p) for p in PROMPTS]
    results = tiny.generate(prompts, max_new_tokens=500, deadline=time.monotonic() + 0.5)
    assert len(results) == len(prompts)
    for [g] in results:
        assert g.timed_out and g.truncated and not g.hit_token_limit
        assert g.num_tokens < 500
    assert any(g.num_tokens > 0 for [g] in results)  # work done before the deadline is kept


def test_guard_timeout_gives_truncated_verdicts(slow_steps, tiny) -> None:
    from reasonguard.infer.guard import Guard

    guard = Guard(tiny, max_new_tokens=500)
    results = guard.classify([{"prompt": "hi"}, {"prompt": "bye", "response": "ok"}], timeout_s=0.3)
    for r in results:
        assert r.truncated and r.is_parsing_error
        assert all(v is None for v in r.scores.values())  # no scoring pass after the deadline
    with pytest.raises(ValueError, match="timeout_s"):
        guard.classify([{"prompt": "hi"}], timeout_s=0)


@pytest.mark.slow
def test_smollm2_refilled_slots_equal_one_at_a_time() -> None:
    """Real weights: rows end at different steps, so slots are refilled mid-run."""
    guard = load_guard("smollm2", device="cpu", batch_size=2)
    backend = guard.backend
    prompts = [backend.build_prompt(p) for p in PROMPTS[:5]]
    together = backend.generate(prompts, max_new_tokens=16)
    assert len({g.num_tokens for [g] in together}) > 1  # rows really end at different steps
    backend.batch_size = 1
    assert backend.generate(prompts, max_new_tokens=16) == together
