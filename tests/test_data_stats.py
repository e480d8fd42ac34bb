"""Dataset statistics on a hand-built set, checked against numbers computed another way.

Lengths are recomputed here straight from the tokenizer (instruction + "\\n" + input with BOS,
output + EOS without) and percentiles with `statistics.quantiles(method="inclusive")`, which is
the same linear interpolation as numpy's default.
"""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from reasonguard.data.stats import auto_max_length, dataset_stats
from reasonguard.format import INSTRUCTION, render_input, render_target

LABELS = [
    ("harmful", None, None),
    ("unharmful", None, None),
    ("harmful", "refusal", "unharmful"),
    ("harmful", "compliance", "harmful"),
    ("unharmful", "compliance", "unharmful"),
]


@pytest.fixture(scope="module")
def tokenizer():
    from reasonguard.models import load_tokenizer

    return load_tokenizer("llama3-tokenizer")


def hand_built() -> dict[str, list[dict]]:
    """23 records of growing length with a known label mix, in two splits."""
    records = []
    for i in range(23):
        labels = LABELS[i % len(LABELS)]
        response = None if labels[1] is None else f"Here is answer number {i}. " * (i % 4)
        reasoning = "# Task 1\n\n## Reasoning Step 1\n" + "The request looks ordinary. " * i
        records.append(
            {
                "instruction": INSTRUCTION,
                "input": render_input(f"Question {i}: " + "tell me more " * (i * 3), response),
                "output": render_target(reasoning, *labels),
            }
        )
    return {"first": records[:15], "second": records[15:]}


def reference_lengths(records: list[dict], tokenizer) -> list[int]:
    lengths = []
    for r in records:
        prompt = tokenizer(f"{r['instruction']}\n{r['input']}")["input_ids"]
        completion = tokenizer(r["output"] + tokenizer.eos_token, add_special_tokens=False)
        lengths.append(len(prompt) + len(completion["input_ids"]))
    return lengths


def test_token_percentiles_and_truncation_match_an_independent_count(tokenizer) -> None:
    data = hand_built()
    records = data["first"] + data["second"]
    lengths = reference_lengths(records, tokenizer)
    cuts = statistics.quantiles(lengths, n=100, method="inclusive")
    max_length = sorted(lengths)[17]  # 5 rows are longer (lengths are distinct)

    # A tiny chunk size exercises the chunking.
    stats = dataset_stats(data, tokenizer, "raw", max_length=max_length, chunk_size=4)
    tokens = stats["tokens"]

    seq = tokens["sequence"]
    assert seq["p50"] == pytest.approx(cuts[49])
    assert seq["p95"] == pytest.approx(cuts[94])
    assert seq["p99"] == pytest.approx(cuts[98])
    assert seq["max"] == max(lengths)
    assert seq["total"] == sum(lengths)
    assert seq["mean"] == pytest.approx(statistics.mean(lengths))
    assert tokens["prompt"]["total"] + tokens["completion"]["total"] == sum(lengths)
    assert tokens["max_length"] == max_length and tokens["max_length_source"] == "given"
    over = [n for n in lengths if n > max_length]
    assert tokens["truncated_rows"] == len(over) == 5
    assert tokens["truncated_tokens"] == sum(n - max_length for n in over)
    assert tokens["truncated_fraction"] == pytest.approx(5 / 23)
    assert tokens["auto_max_length"] == auto_max_length(cuts[94])


def test_auto_max_length_is_used_when_none_is_given(tokenizer) -> None:
    stats = dataset_stats(hand_built(), tokenizer, "chat")
    tokens = stats["tokens"]
    assert tokens["prompt_format"] == "chat"
    assert tokens["max_length_source"] == "auto"
    assert tokens["max_length"] == tokens["auto_max_length"] == 1024  # every row is short
    assert tokens["truncated_rows"] == 0


def test_rows_and_label_distribution() -> None:
    data = hand_built()
    stats = dataset_stats(data)  # no tokenizer: no token statistics

    assert stats["tokens"] is None
    assert stats["rows"] == {"first": 15, "second": 8}
    assert stats["total_rows"] == 23
    triples = [LABELS[i % len(LABELS)] for i in range(23)]
    assert stats["prompt_only_rows"] == {
        "first": sum(t[1] is None for t in triples[:15]),
        "second": sum(t[1] is None for t in triples[15:]),
    }
    for index, task in enumerate(("prompt", "refusal", "response")):
        expected = Counter("None" if t[index] is None else t[index] for t in triples)
        got = {label: n for label, n in stats["labels"]["total"][task].items() if n}
        assert got == dict(expected), task
        first = Counter("None" if t[index] is None else t[index] for t in triples[:15])
        got_first = stats["labels"]["by_split"]["first"][task]
        assert {label: n for label, n in got_first.items() if n} == dict(first)
    # Every vocabulary label is listed, even at zero, so tables line up.
    assert set(stats["labels"]["by_split"]["second"]["refusal"]) == {
        "refusal",
        "compliance",
        "None",
    }


def test_auto_max_length_clamps_p95() -> None:
    assert auto_max_length(930.0) == 1024
    assert auto_max_length(1024) == 1024
    assert auto_max_length(1500.2) == 1501  # rounded up: never below p95
    assert auto_max_length(2048) == 2048
    assert auto_max_length(5000) == 2048
    assert auto_max_length(300, low=256, high=512) == 300
    with pytest.raises(ValueError, match="low"):
        auto_max_length(1000, low=2048, high=1024)


def test_empty_dataset_has_no_lengths(tokenizer) -> None:
    stats = dataset_stats({"x": []}, tokenizer)
    assert stats["total_rows"] == 0
    assert stats["tokens"]["sequence"]["p95"] is None
    assert stats["tokens"]["truncated_rows"] == 0
