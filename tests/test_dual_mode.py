"""Dual-mode training (`reasoning_dropout`): a seeded share of rows trained answer-only under the
fast-mode marker; p = 0 leaves every training row as before; the saved model records the marker
and fast mode uses it; a model trained on the demo data still reasons when asked without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard.data.tokenize import IGNORE_INDEX, encode_records
from reasonguard.errors import UserError
from reasonguard.format import (
    FAST_MODE_MARKER,
    INSTRUCTION,
    answer_only_target,
    fast_mode_instruction,
    parse_output,
)
from reasonguard.models import load_tokenizer, read_guard_config
from reasonguard.train.data import drop_reasoning, prepare
from test_train_support import tiny_config


def _triples(n: int) -> list[tuple[str, int, dict]]:
    from test_train_support import guard_record

    return [("train", i, guard_record(i)) for i in range(n)]


def test_answer_only_rows_carry_the_marker_and_the_answer_block() -> None:
    triples = _triples(10)
    out, converted, summary = drop_reasoning(triples, 0.5, seed=3)
    assert len(converted) == 5 == summary["answer_only_rows"]
    assert summary["reasoning_rows"] == 5 and summary["marker"] == FAST_MODE_MARKER
    again, same, _ = drop_reasoning(triples, 0.5, seed=3)
    assert same == converted and again == out  # seeded: a resumed run picks the same rows
    for (split, row, before), (_, _, after) in zip(triples, out, strict=True):
        if (split, row) in converted:
            assert after["instruction"] == fast_mode_instruction(INSTRUCTION)
            assert after["output"] == answer_only_target(before["output"])
            assert after["output"].startswith("Answers: \nRequest: ")
            assert parse_output(after["output"]).to_dict() | {"reason": ""} == parse_output(
                before["output"]
            ).to_dict() | {"reason": ""}
        else:
            assert after is before  # untouched, not a copy
    assert drop_reasoning(triples, 0.0, seed=3) == (triples, set(), None)


def test_zero_dropout_trains_exactly_the_rows_of_before(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, rows=10, eval_split_ratio=0.2, reasoning_dropout=0.0)
    tokenizer = load_tokenizer("llama3-tokenizer")
    data = prepare(config, tokenizer)
    assert "reasoning_dropout" not in data.stats
    records = [json.loads(line) for line in Path(config.dataset).read_text().splitlines()]
    by_row = {i: r for i, r in enumerate(records)}
    expected = encode_records(
        [by_row[e.row] for e in data.train], tokenizer, config.prompt_format, config.max_length
    )
    assert [e.input_ids.tolist() for e in data.train] == [x["input_ids"] for x in expected]
    assert [e.labels.tolist() for e in data.train] == [x["labels"] for x in expected]


def test_half_dropout_makes_half_the_training_rows_answer_only(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, rows=10, eval_split_ratio=0.2, reasoning_dropout=0.5)
    tokenizer = load_tokenizer("llama3-tokenizer")
    data = prepare(config, tokenizer)
    assert data.stats["reasoning_dropout"]["answer_only_rows"] == 4  # of 8 training rows
    marker_ids = tokenizer(FAST_MODE_MARKER, add_special_tokens=False)["input_ids"]
    marked = 0
    for example in data.train:
        ids = example.input_ids.tolist()
        has_marker = any(ids[i : i + len(marker_ids)] == marker_ids for i in range(len(ids)))
        target = tokenizer.decode(
            [t for t, lab in zip(ids, example.labels.tolist(), strict=True) if lab != IGNORE_INDEX]
        )
        # Marker <=> the target is the answer block alone (and the end-of-turn token).
        assert has_marker == target.startswith("Answers: \nRequest:"), target[:60]
        marked += has_marker
    assert marked == 4
    for example in data.eval:  # held-out rows keep their reasoning
        target = tokenizer.decode(example.labels[example.labels != IGNORE_INDEX].tolist())
        assert target.startswith("# Task 1")


def test_dpo_refuses_reasoning_dropout() -> None:
    from reasonguard.train.dpo.stage import DPOConfig

    with pytest.raises(UserError, match="reasoning_dropout.*R-SFT setting"):
        DPOConfig(dataset="pairs.jsonl", reasoning_dropout=0.5)
    from reasonguard.train.config import SFTConfig

    with pytest.raises(UserError, match="reasoning_dropout"):
        SFTConfig(reasoning_dropout=1.5)


@pytest.mark.slow
def test_dual_mode_smollm2_on_the_demo_data(tmp_path: Path) -> None:
    """SmolLM2 trained on the demo's sample rows with reasoning_dropout 0.5: prompted as usual
    its outputs start with reasoning, never the answer block; fast mode gives scores through the
    recorded marker."""
    from reasonguard.data.sources import load_source
    from reasonguard.demo import split_samples
    from reasonguard.format import split_input
    from reasonguard.infer.guard import load_guard
    from reasonguard.train.config import load_config
    from reasonguard.train.sft import run_sft

    records = [r for rows in load_source("samples").values() for r in rows]
    train, held_out = split_samples(records)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs/demo-cpu.yaml",
        [
            f"dataset={data}",
            f"output_dir={tmp_path / 'run'}",
            "reasoning_dropout=0.5",
            "max_steps=4",
            "eval_split_ratio=0",
            "eval_strategy=no",
            "save_strategy=no",
            "report_to=none",
        ],
    )
    result = run_sft(config)
    record = read_guard_config(result.final_dir)
    assert record["fast_mode_marker"] == FAST_MODE_MARKER and record["reasoning_dropout"] == 0.5
    info = json.loads((result.run_dir / "training_info.json").read_text())
    assert info["data"]["reasoning_dropout"]["answer_only_rows"] == round(0.5 * len(train))

    guard = load_guard(str(result.final_dir), max_new_tokens=12, batch_size=8)
    assert guard.backend.fast_mode_marker == FAST_MODE_MARKER
    items = []
    for r in held_out[:8]:
        prompt, response = split_input(r["input"])
        items.append({"prompt": prompt, "response": response})
    for result_ in guard.classify(items, mode="reasoning", scores=False):
        assert not result_.output.lstrip().startswith("Answers"), result_.output
    for item, fast in zip(items, guard.classify(items, mode="fast"), strict=True):
        assert fast.num_tokens == 0 and fast.scores["prompt_harmfulness"] is not None
        if item["response"] is not None:
            assert fast.scores["response_harmfulness"] is not None
