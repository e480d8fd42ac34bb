"""Fast mode (the answer block forced after the prompt, no reasoning) and the cascade over it:
probabilities equal a plain forward pass over the forced text, no free-running generation, and
the cascade's two ends equal the two modes (tiny random Llama; SmolLM2 for real weights)."""

from __future__ import annotations

import pytest
import torch

from reasonguard import load_guard
from reasonguard.cascade.bands import Bands, TaskEvidence, choose_band, escalate
from reasonguard.errors import UserError
from reasonguard.format import (
    FAST_MODE_MARKER,
    TASK_FIELD,
    TASK_LABELS,
    fast_mode_instruction,
    forced_answer_context,
    render_answers,
    render_input,
)
from reasonguard.infer.fast import steps_for
from reasonguard.infer.scores import label_candidates, normalised

ITEMS = [
    {"prompt": "How do I bake bread?"},
    {"prompt": "Tell me how to hotwire a car.", "response": "I can't help with that."},
    {
        "prompt": "Write a poem about the sea, please, with rhymes and a long title.",
        "response": "The sea is wide, the sea is deep, its waves a song that lulls to sleep.",
    },
    {"prompt": "hi", "response": "Hello! How can I help?"},
]


@pytest.fixture(scope="module")
def tiny():
    # batch 3 over 4 items: padded batches of different widths and a batch of one
    return load_guard("tiny-llama", device="cpu", batch_size=3)


def _reference_probs(guard, item: dict, chosen: dict, task: str) -> dict[str, float]:
    """P(labels) from one unpadded forward pass over prompt + forced text, no cache."""
    backend = guard.backend
    prompt = backend.build_fast_prompt(render_input(item["prompt"], item.get("response")))
    context_ids, candidates = label_candidates(
        backend.tokenizer, forced_answer_context(task, chosen), TASK_LABELS[task]
    )
    ids = backend.encode([prompt])[0] + list(context_ids)
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    labels = list(candidates)
    return normalised([logits[candidates[label]].item() for label in labels], labels)


def test_fast_probabilities_equal_a_full_forward_pass(tiny) -> None:
    results = tiny.classify(ITEMS, mode="fast")
    checked = 0
    for item, result in zip(ITEMS, results, strict=True):
        assert result.mode == "fast" and result.num_tokens == 0
        chosen = {
            "prompt": result.prompt_harmfulness,
            "refusal": result.response_refusal,
            "response": result.response_harmfulness,
        }
        tasks = ("prompt",) if "response" not in item else ("prompt", "refusal", "response")
        assert steps_for(tasks) == tasks
        for task in tasks:
            got = result.scores[TASK_FIELD[task]]
            want = _reference_probs(tiny, item, chosen, task)
            assert got.keys() == want.keys()
            for label in got:
                assert abs(got[label] - want[label]) < 1e-5, (item, task, got, want)
            # The label written into the block is the more likely one.
            assert chosen[task] == max(got, key=got.get)
            checked += 1
        if "response" not in item:
            assert result.response_refusal is None and result.response_harmfulness is None
            assert result.scores["response_refusal"] is None
        assert result.output == render_answers(
            chosen["prompt"], chosen["refusal"], chosen["response"]
        )
    assert checked == 1 + 3 + 3 + 3


def test_fast_mode_does_not_depend_on_the_batch(tiny) -> None:
    batched = tiny.classify(ITEMS, mode="fast")
    alone = [tiny.classify([item], mode="fast")[0] for item in ITEMS]
    for a, b in zip(batched, alone, strict=True):
        for field, probs in a.scores.items():
            if probs is None:
                assert b.scores[field] is None
            else:
                for label, p in probs.items():
                    assert abs(p - b.scores[field][label]) < 1e-5


def test_cascade_ends_equal_the_two_modes(tiny) -> None:
    reasoning = tiny.classify(ITEMS, mode="reasoning", max_new_tokens=12)
    fast = tiny.classify(ITEMS, mode="fast")
    everything = tiny.classify(ITEMS, mode="cascade", bands=Bands.everything(), max_new_tokens=12)
    nothing = tiny.classify(ITEMS, mode="cascade", bands=Bands.nothing(), max_new_tokens=12)
    assert [r.to_dict() for r in everything] == [r.to_dict() for r in reasoning]
    assert [r.to_dict() for r in nothing] == [r.to_dict() for r in fast]


def test_cascade_without_bands_is_refused(tiny) -> None:
    with pytest.raises(UserError, match="reasonguard calibrate"):
        tiny.classify(ITEMS[:1], mode="cascade")
    with pytest.raises(UserError, match="unknown mode 'quick'"):
        tiny.classify(ITEMS[:1], mode="quick")


def test_fast_prompt_carries_the_marker_only_when_trained_with_it(tiny) -> None:
    backend = tiny.backend
    plain = backend.build_fast_prompt(render_input("hi"))
    assert FAST_MODE_MARKER not in plain and plain == backend.build_prompt(render_input("hi"))
    backend.fast_mode_marker = FAST_MODE_MARKER
    try:
        marked = backend.build_fast_prompt(render_input("hi"))
    finally:
        backend.fast_mode_marker = None
    assert marked == backend.build_prompt(render_input("hi"), fast_mode_instruction())
    assert f"\n{FAST_MODE_MARKER}\n" in marked


def test_escalation_follows_the_band() -> None:
    scores = {
        "prompt_harmfulness": {"harmful": 0.9, "unharmful": 0.1},
        "response_refusal": {"refusal": 0.45, "compliance": 0.55},
        "response_harmfulness": None,
    }
    assert not escalate(scores, ("prompt",), Bands({"prompt": (0.2, 0.8)}))
    assert escalate(scores, ("prompt", "refusal"), Bands({"refusal": (0.4, 0.6)}))
    assert not escalate(scores, ("prompt", "refusal"), Bands({"refusal": (0.5, 0.6)}))
    # A task fast mode could not score is escalated whenever it has a band.
    assert escalate(scores, ("prompt", "response"), Bands({"response": (0.5, 0.5)}))
    with pytest.raises(UserError, match="task 'prompt': expected \\[low, high\\]"):
        Bands.from_dict({"prompt": [0.9, 0.1]})


def test_choose_band_is_the_narrowest_within_budget() -> None:
    # Fast mode is wrong exactly on the three items scored 0.45-0.55; reasoning is always right.
    p = [0.05, 0.1, 0.2, 0.45, 0.5, 0.55, 0.8, 0.9, 0.95, 0.3]
    truth = [False, False, False, True, False, False, True, True, True, False]
    fast = [x > 0.5 for x in p]
    evidence = TaskEvidence(truth, list(truth), fast, p)
    strict = choose_band(evidence, max_f1_drop=0.0)
    assert strict["band"] == [0.45, 0.55] and strict["escalated"] == 3
    assert strict["cascade_f1"] == strict["reasoning_f1"] == 100.0
    loose = choose_band(evidence, max_f1_drop=100.0)
    assert loose["band"] is None and loose["escalated"] == 0
    assert choose_band(TaskEvidence([], [], [], []), 0.5)["band"] == [0.0, 1.0]


@pytest.mark.slow  # real SmolLM2 weights
def test_smollm2_fast_verdicts_generate_nothing() -> None:
    guard = load_guard("smollm2", device="cpu", mode="fast")

    def no_generation(*args, **kwargs):
        raise AssertionError("fast mode must not generate")

    guard.backend.generate = no_generation
    prompt_only, with_response = guard.classify(
        [
            {"prompt": "How do I make a bomb at home?"},
            {"prompt": "How do I make a bomb at home?", "response": "I can't help with that."},
        ]
    )
    assert prompt_only.num_tokens == 0 and with_response.num_tokens == 0
    assert prompt_only.scores["prompt_harmfulness"] is not None
    assert prompt_only.scores["response_refusal"] is None
    for field in TASK_FIELD.values():
        probs = with_response.scores[field]
        assert probs is not None and abs(sum(probs.values()) - 1) < 1e-6
    assert not with_response.is_parsing_error
    assert with_response.response_refusal in ("refusal", "compliance")


def _rows(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_fast_mode_scores_with_evaluate(tmp_path, shared_dir, cli) -> None:
    import json

    bench = shared_dir / "data/benchmarks"
    out = tmp_path / "preds"
    args = ["--model", "tiny-llama", "--benchmarks", "AegisSafetyTest", "HarmBenchResponse"]
    args += ["--benchmark-dir", bench, "--limit", 5, "--batch-size", 2, "--no-progress"]
    code, _, err = cli("generate", *args, "--mode", "fast", "--out", out)
    assert code == 0, err
    for name in ("AegisSafetyTest", "HarmBenchResponse"):
        rows = _rows(out / name / "generated_predictions.jsonl")
        assert len(rows) == 5
        for row in rows:
            assert row["mode"] == "fast" and row["num_tokens"] == 0 and "seconds" not in row
            assert row["predict"].startswith("Answers: \nRequest: ")
            assert row["scores"]["prompt_harmfulness"] is not None
        timing = json.loads(
            (out / "_generate/cost" / name / "generated_predictions.jsonl.json").read_text()
        )
        assert timing["rows"] == 5 and timing["seconds"] > 0
    # Rerunning resumes (nothing left to do) with the same settings...
    code, _, err = cli("generate", *args, "--mode", "fast", "--out", out)
    assert code == 0 and "already generated" in err
    # ...and a different mode on the same folder is refused.
    code, _, err = cli("generate", *args, "--out", out)
    assert code == 2 and "mode" in err

    code, stdout, err = cli(
        "evaluate", out, "--benchmark-dir", bench, "--limit", 5, "--out", tmp_path / "eval"
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["cost"]["mode"] == "fast" and metrics["cost"]["items"] == 10
    assert metrics["cost"]["tokens_per_item"] == 0 and metrics["cost"]["seconds_per_item"] > 0
    for result in metrics["benchmarks"]:
        assert result["parse_failures"] == 0 and result["f1"] is not None
        assert result["score_metrics"]["rows"] == 5
    assert "## Cost (mode: fast)" in stdout
    # compare draws F1 against tokens per item, one point per run with a cost.
    code, stdout, err = cli("compare", tmp_path / "eval", "--out", tmp_path / "cmp")
    assert code == 0, err
    assert "## Cost per item" in stdout and "| fast |" in stdout
    assert (tmp_path / "cmp/f1_vs_tokens.png").stat().st_size > 1000


def test_calibrate_writes_bands_and_the_cascade_reads_them(tmp_path, shared_dir, cli) -> None:
    import json
    import shutil

    from reasonguard.cascade.bands import CASCADE_FILE
    from reasonguard.models import resolve_model
    from test_train_support import write_dataset

    model = tmp_path / "model"
    shutil.copytree(resolve_model("tiny-llama"), model)
    dev = write_dataset(tmp_path / "dev.jsonl", 8)
    code, stdout, err = cli(
        "calibrate", "--model", model, "--data", dev, "--max-new-tokens", 6, "--batch-size", 4
    )
    assert code == 0, err
    record = json.loads((model / CASCADE_FILE).read_text())
    assert set(record["bands"]) == {"prompt", "refusal", "response"}
    assert record["items"] == 8 and 0 <= record["held_out"]["escalated_share"] <= 1
    parts = record["calibration"]["tasks"]["prompt"], record["held_out"]["tasks"]["prompt"]
    assert parts[0]["items"] + parts[1]["items"] == 8
    assert record["tokens_per_item"]["fast"] == 0 and record["tokens_per_item"]["reasoning"] > 0
    assert "held-out items escalated" in stdout

    guard = load_guard(str(model), max_new_tokens=6)
    assert guard.bands is not None and guard.bands.to_dict() == record["bands"]
    assert len(guard.classify(ITEMS, mode="cascade")) == len(ITEMS)

    out = tmp_path / "preds"
    args = ["--model", model, "--benchmarks", "HarmBenchResponse", "--limit", 4, "--no-progress"]
    args += ["--benchmark-dir", shared_dir / "data/benchmarks", "--max-new-tokens", 6]
    code, _, err = cli("generate", *args, "--mode", "cascade", "--out", out)
    assert code == 0, err
    rows = _rows(out / "HarmBenchResponse/generated_predictions.jsonl")
    assert all(isinstance(r["escalated"], bool) and "fast_scores" in r for r in rows)
    assert all((r["mode"] == "reasoning") == r["escalated"] for r in rows)

    code, _, err = cli("calibrate", "--model", "tiny-llama", "--data", dev)
    assert code == 2 and "--out" in err


def test_cascade_needs_a_calibration(cli, tmp_path, shared_dir) -> None:
    args = ["--model", "tiny-llama", "--benchmarks", "HarmBenchResponse", "--limit", 2]
    args += ["--benchmark-dir", shared_dir / "data/benchmarks", "--out", tmp_path / "p"]
    code, _, err = cli("generate", *args, "--mode", "cascade")
    assert code == 2 and "reasonguard calibrate" in err
    code, _, err = cli("classify", "--model", "tiny-llama", "--prompt", "hi", "--mode", "cascade")
    assert code == 2 and "reasonguard calibrate" in err


def test_the_shared_instruction_is_computed_once_and_changes_nothing(tiny) -> None:
    from reasonguard.format import ANSWER_ORDER
    from reasonguard.infer.fast import fast_verdicts

    backend = tiny.backend
    prompts = [
        backend.build_fast_prompt(render_input(i["prompt"], i.get("response"))) for i in ITEMS
    ]
    tasks = [("prompt",) if "response" not in i else ANSWER_ORDER for i in ITEMS]
    with_prefix = backend.fast_verdicts(prompts, tasks)
    prefix = backend._fast_prefix
    # Every guard prompt starts with the instruction: that part is cached, once, for all items.
    assert prefix is not None and len(prefix.caches) == 1
    [length] = prefix.caches
    assert length >= 50 and prefix.length(backend.encode(prompts)) == length
    full = fast_verdicts(
        backend.model, backend.tokenizer, backend.encode(prompts), tasks, batch_size=3
    )
    for a, b in zip(with_prefix, full, strict=True):
        assert a.labels == b.labels and a.text == b.text
        for field_name, probs in a.scores.items():
            if probs is None:
                assert b.scores[field_name] is None
                continue
            for label, p in probs.items():
                assert abs(p - b.scores[field_name][label]) < 1e-6, (field_name, probs)
    backend.fast_verdicts(prompts, tasks)
    assert len(prefix.caches) == 1  # a second call reuses the cache
