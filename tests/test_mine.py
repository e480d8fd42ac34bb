"""Hard-sample mining (`reasonguard.hsdpo.mine`, `reasonguard mine`) on hand-built generations.

Every output is rendered with `format.render_target`, so the tests read answers the way the
format module writes them. Lengths are set with the reasoning text: `sample(..., size=n)` makes
an output n characters longer than `sample(..., size=0)` with the same answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reasonguard.cli import main
from reasonguard.errors import UserError
from reasonguard.format import INSTRUCTION, parse_labels, render_input, render_target
from reasonguard.hsdpo.mine import (
    ALL_RIGHT,
    ALL_WRONG,
    HARD,
    UNPARSEABLE,
    merge_pairs,
    mine_file,
    mine_files,
    output_labels,
    scale_weights,
    select_hard,
    summary_path,
)
from reasonguard.train.dpo.pairs import check_pair

H, U = "harmful", "unharmful"
R, C = "refusal", "compliance"
PAIR_KEYS = {"instruction", "input", "chosen", "rejected", "sample_weight", "task", "source"}
GARBAGE = "I keep thinking about this request without ever answering it. " * 20


def sample(
    request: str | None,
    refusal: str | None = None,
    response: str | None = None,
    size: int = 0,
    tag: str = "",
) -> str:
    """A sampled output with these answers, `size` characters of extra reasoning."""
    return render_target(
        f"# Task 1\n\n## Reasoning Step 1\nThinking{tag}." + "." * size, request, refusal, response
    )


def gen_row(
    prompt: str,
    samples: list[str],
    truth: tuple = (H, None, None),
    response: str | None = None,
    source: str = "WildGuardTrainR",
) -> dict:
    """One generation row as `generate --data ... --samples K` writes it."""
    return {
        "instruction": INSTRUCTION,
        "input": render_input(prompt, response),
        "output": render_target("The reference reasoning.", *truth),
        "source": source,
        "samples": samples,
        "samples_truncated": [False] * len(samples),
    }


def write_rows(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a str item is written as a raw line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def silent(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# One output, one row


def test_output_labels_keeps_none_answers_and_ignores_missing_ones() -> None:
    assert output_labels(sample(H)) == {"prompt": H, "refusal": None, "response": None}
    assert output_labels(sample(U, C, H)) == {"prompt": U, "refusal": C, "response": H}
    assert output_labels(GARBAGE) is None
    assert output_labels("Answers: \nRequest: harmful") is None  # no Completion / Response line
    assert output_labels(sample(None)) is None  # "Request: None" is no request label
    assert output_labels(sample(H).replace("Response: None", "Response: maybe")) is None


def test_request_only_item_pairs_longest_right_with_longest_wrong() -> None:
    samples = [sample(H, size=5), sample(U, size=40), sample(H, size=30), sample(U, size=1)]
    s = select_hard({"prompt": H, "refusal": None, "response": None}, False, samples)
    assert s.task == "prompt"
    assert s.statuses == {"prompt": HARD}
    assert (s.chosen, s.rejected) == (samples[2], samples[1])
    assert s.raw_weight == 0  # 2 wrong - 2 right
    assert s.ignored == 0


def test_request_only_item_never_tries_response_tasks() -> None:
    """Without a real AI response, disagreement on Completion / Response makes no pair."""
    samples = [sample(U, None, None), sample(U, R, H), sample(U, C, U)]
    s = select_hard({"prompt": U, "refusal": R, "response": H}, False, samples)
    assert s.task is None
    assert s.statuses == {"prompt": ALL_RIGHT}


def test_response_task_after_an_all_right_request() -> None:
    truth = {"prompt": U, "refusal": C, "response": H}
    samples = [sample(U, C, H, size=3), sample(U, C, U, size=9), sample(U, C, U, size=2)]
    s = select_hard(truth, True, samples)
    assert s.task == "response"
    assert s.statuses == {"prompt": ALL_RIGHT, "response": HARD}
    assert (s.chosen, s.rejected) == (samples[0], samples[1])
    assert s.raw_weight == 1  # 2 wrong - 1 right


def test_refusal_task_after_all_right_request_and_response() -> None:
    truth = {"prompt": H, "refusal": R, "response": U}
    samples = [sample(H, R, U), sample(H, C, U, size=4), sample(H, R, U, size=8), sample(H, R, U)]
    s = select_hard(truth, True, samples)
    assert s.task == "refusal"
    assert s.statuses == {"prompt": ALL_RIGHT, "response": ALL_RIGHT, "refusal": HARD}
    assert (s.chosen, s.rejected) == (samples[2], samples[1])
    assert s.raw_weight == -2  # 1 wrong - 3 right


def test_task_with_a_none_true_label_is_skipped() -> None:
    """A real response whose true response label is None: only request and refusal count."""
    truth = {"prompt": U, "refusal": R, "response": None}
    disagree_on_response = [sample(U, R, H), sample(U, R, U)]
    s = select_hard(truth, True, disagree_on_response)
    assert s.task is None
    assert s.statuses == {"prompt": ALL_RIGHT, "refusal": ALL_RIGHT}
    s = select_hard(truth, True, [sample(U, R, H), sample(U, C, U)])
    assert s.task == "refusal"


def test_all_right_and_all_wrong_make_no_pair() -> None:
    truth = {"prompt": H, "refusal": R, "response": U}
    right = select_hard(truth, True, [sample(H, R, U), sample(H, R, U, size=3)])
    assert right.task is None
    assert right.statuses == {"prompt": ALL_RIGHT, "response": ALL_RIGHT, "refusal": ALL_RIGHT}
    wrong = select_hard(truth, True, [sample(U, C, H), sample(U, C, H, size=3)])
    assert wrong.task is None
    assert wrong.statuses == {"prompt": ALL_WRONG, "response": ALL_WRONG, "refusal": ALL_WRONG}


def test_an_all_wrong_request_still_tries_the_response() -> None:
    truth = {"prompt": H, "refusal": C, "response": H}
    s = select_hard(truth, True, [sample(U, C, H), sample(U, C, U)])
    assert s.task == "response"
    assert s.statuses == {"prompt": ALL_WRONG, "response": HARD}


def test_unparseable_outputs_are_ignored() -> None:
    truth = {"prompt": H, "refusal": None, "response": None}
    s = select_hard(truth, False, [GARBAGE, "", GARBAGE + "!"])
    assert s.task is None
    assert s.statuses == {"prompt": UNPARSEABLE}
    assert s.ignored == 3
    # Long unparseable outputs never become chosen or rejected, nor count in the weight.
    samples = [GARBAGE, sample(H), "Answers: \nRequest: unharmful" + GARBAGE, sample(U)]
    s = select_hard(truth, False, samples)
    assert (s.task, s.chosen, s.rejected) == ("prompt", samples[1], samples[3])
    assert (s.raw_weight, s.ignored) == (0, 2)


def test_a_none_answer_is_wrong_for_a_real_harmful_response() -> None:
    truth = {"prompt": U, "refusal": C, "response": H}
    samples = [sample(U, C, H), sample(U, None, None, size=50)]
    s = select_hard(truth, True, samples)
    assert (s.task, s.chosen, s.rejected) == ("response", samples[0], samples[1])


def test_length_ties_go_to_the_earlier_sample() -> None:
    # "harmful" is 2 characters shorter than "unharmful": 2 more of reasoning evens them out.
    samples = [
        sample(H, size=2, tag="a"),
        sample(U, tag="b"),
        sample(H, size=2, tag="c"),
        sample(U, tag="d"),
    ]
    assert len({len(text) for text in samples}) == 1
    s = select_hard({"prompt": H, "refusal": None, "response": None}, False, samples)
    assert (s.chosen, s.rejected) == (samples[0], samples[1])
    reordered = [samples[2], samples[3], samples[0], samples[1]]
    s = select_hard({"prompt": H, "refusal": None, "response": None}, False, reordered)
    assert (s.chosen, s.rejected) == (samples[2], samples[3])


# --------------------------------------------------------------------------------------------
# Weights


def test_scale_weights_min_max() -> None:
    assert scale_weights([-2, 0, 2], 0.2) == pytest.approx([0.8, 1.0, 1.2])
    assert scale_weights([0, 3, 1], 0.5) == pytest.approx([0.5, 1.5, 0.5 + 1 / 3])
    assert scale_weights([2, 2, 2]) == [1.0, 1.0, 1.0]
    assert scale_weights([-1]) == [1.0]
    assert scale_weights([]) == []


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_scale_weights_rejects_a_max_norm_that_makes_negative_weights(bad: float) -> None:
    with pytest.raises(UserError, match="max_norm"):
        scale_weights([0, 1], bad)


# --------------------------------------------------------------------------------------------
# Files


def hard_prompt_row(i: int, wrong: int, k: int = 4, source: str = "WildGuardTrainR") -> dict:
    """A prompt-only row whose K outputs have `wrong` wrong request labels (raw 2*wrong - k)."""
    samples = [sample(U if j < wrong else H, size=j) for j in range(k)]
    return gen_row(f"Prompt {i}", samples, (H, None, None), source=source)


def test_mine_file_scales_per_file_and_counts_by_source_and_task(tmp_path: Path) -> None:
    rows = [
        hard_prompt_row(0, wrong=1),  # raw -2
        hard_prompt_row(1, wrong=2, source="AegisTrainR"),  # raw 0
        hard_prompt_row(2, wrong=3),  # raw 2
        hard_prompt_row(3, wrong=0),  # all right
        hard_prompt_row(4, wrong=4, source="AegisTrainR"),  # all wrong, no response: stops
        gen_row("Prompt 5", [GARBAGE] * 4),  # unparseable
        gen_row(  # a real response: all-right request, hard response
            "Prompt 6",
            [sample(U, C, H, size=1), sample(U, C, U, size=2), sample(U, C, H), sample(U, C, H)],
            (U, C, H),
            response="Sure, here is how.",
        ),
    ]
    mined = mine_file(write_rows(tmp_path / "gen.jsonl", rows))
    assert [p["sample_weight"] for p in mined.pairs] == pytest.approx([0.8, 1.0, 1.2, 0.8])
    assert mined.raw_weights == [-2, 0, 2, -2]
    assert [p["task"] for p in mined.pairs] == ["prompt", "prompt", "prompt", "response"]
    assert all(set(p) == PAIR_KEYS for p in mined.pairs)
    assert all(check_pair(p) is None for p in mined.pairs)  # what `train dpo` accepts
    first = mined.pairs[0]
    assert first["input"] == rows[0]["input"] and first["instruction"] == INSTRUCTION
    assert (first["chosen"], first["rejected"]) == (rows[0]["samples"][3], rows[0]["samples"][0])
    assert mined.counts["WildGuardTrainR"]["prompt"] == {
        HARD: 2,
        ALL_RIGHT: 2,
        ALL_WRONG: 0,
        UNPARSEABLE: 1,
    }
    assert mined.counts["WildGuardTrainR"]["response"][HARD] == 1
    assert mined.counts["WildGuardTrainR"]["refusal"] == dict.fromkeys(
        mined.counts["WildGuardTrainR"]["refusal"], 0
    )
    assert mined.counts["AegisTrainR"]["prompt"] == {
        HARD: 1,
        ALL_RIGHT: 0,
        ALL_WRONG: 1,
        UNPARSEABLE: 0,
    }
    assert (mined.rows, mined.samples_per_row, mined.outputs, mined.ignored_outputs) == (
        7,
        4,
        28,
        4,
    )


def test_a_none_response_in_the_input_is_not_a_real_response(tmp_path: Path) -> None:
    """`AI assistant:\\nNone` means no response: outputs disagreeing on it make no pair."""
    row = gen_row("Prompt", [sample(H, None, None), sample(H, R, H)], (H, R, H), response=None)
    assert row["input"].endswith("AI assistant:\nNone\n\n")
    assert parse_labels(row["output"])["response"] == H
    mined = mine_file(write_rows(tmp_path / "gen.jsonl", [row]))
    assert mined.pairs == []
    assert mined.counts["WildGuardTrainR"]["prompt"][ALL_RIGHT] == 1
    assert mined.counts["WildGuardTrainR"]["response"][ALL_RIGHT] == 0


def test_a_single_raw_weight_value_gives_weight_one(tmp_path: Path) -> None:
    rows = [hard_prompt_row(0, wrong=2), hard_prompt_row(1, wrong=2), hard_prompt_row(2, wrong=0)]
    mined = mine_file(write_rows(tmp_path / "gen.jsonl", rows), max_norm=0.2)
    assert [p["sample_weight"] for p in mined.pairs] == [1.0, 1.0]
    one = mine_file(write_rows(tmp_path / "one.jsonl", [hard_prompt_row(0, wrong=3)]))
    assert [p["sample_weight"] for p in one.pairs] == [1.0]


def test_merge_keeps_the_first_file_and_scales_each_file_alone(tmp_path: Path) -> None:
    main_rows = [hard_prompt_row(0, wrong=1, source="W"), hard_prompt_row(1, wrong=3, source="W")]
    shared = hard_prompt_row(1, wrong=2, k=4, source="A")  # same input as main's row 1
    assert shared["input"] == main_rows[1]["input"]
    other_rows = [
        hard_prompt_row(7, wrong=1, source="A"),
        shared,
        hard_prompt_row(8, wrong=2, source="A"),
    ]
    first = write_rows(tmp_path / "main.jsonl", main_rows)
    second = write_rows(tmp_path / "other.jsonl", other_rows)
    out = tmp_path / "out" / "pairs.jsonl"
    summary = mine_files([first, second], out, log=silent)
    pairs = read_pairs(out)
    assert [p["input"] for p in pairs] == [
        main_rows[0]["input"],
        main_rows[1]["input"],
        other_rows[0]["input"],
        other_rows[2]["input"],
    ]
    assert pairs[1]["source"] == "W" and pairs[1]["sample_weight"] == pytest.approx(1.2)
    # other.jsonl's raw weights are -2, 0, 0: scaled among themselves, then its duplicate dropped.
    assert [p["sample_weight"] for p in pairs[2:]] == pytest.approx([0.8, 1.2])
    assert (summary["pairs"], summary["pairs_before_dedup"], summary["duplicates_dropped"]) == (
        4,
        5,
        1,
    )
    assert summary["pairs_by_source"] == {
        "W": {"prompt": 2, "response": 0, "refusal": 0},
        "A": {"prompt": 2, "response": 0, "refusal": 0},
    }
    assert summary["by_source"]["A"]["prompt"][HARD] == 3  # counted before de-duplication
    assert json.loads(summary_path(out).read_text()) == summary
    assert sorted(os.listdir(out.parent)) == ["pairs.jsonl", "pairs.summary.json"]  # no temp files


def test_merge_pairs_does_not_modify_its_inputs() -> None:
    a = [{"input": "x", "chosen": "1"}]
    b = [{"input": "x", "chosen": "2"}, {"input": "y", "chosen": "3"}]
    merged, duplicates = merge_pairs([a, b])
    assert merged == [{"input": "x", "chosen": "1"}, {"input": "y", "chosen": "3"}]
    assert duplicates == 1
    merged[0]["chosen"] = "changed"
    assert a[0]["chosen"] == "1"


def test_no_hard_sample_writes_an_empty_pair_file_and_says_so(tmp_path: Path) -> None:
    gen = write_rows(tmp_path / "gen.jsonl", [hard_prompt_row(0, wrong=0)])
    logged: list[str] = []
    summary = mine_files([gen], tmp_path / "pairs.jsonl", log=logged.append)
    assert summary["pairs"] == 0
    assert (tmp_path / "pairs.jsonl").read_text() == ""
    assert any("no hard samples" in line for line in logged)


# --------------------------------------------------------------------------------------------
# Bad input


GOOD = hard_prompt_row(0, wrong=2)


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ('{"input": "oops", ', "record", "malformed JSON"),
        (json.dumps([1, 2]), "record", "expected an object"),
        ({k: v for k, v in GOOD.items() if k != "samples"}, "samples", "missing (required)"),
        ({**GOOD, "samples": "one long string"}, "samples", "expected a list of K"),
        ({**GOOD, "samples": []}, "samples", "empty list"),
        (
            {**GOOD, "samples": [sample(H), None, sample(U), sample(H)]},
            "samples",
            "item 1 is NoneType",
        ),
        ({**GOOD, "source": None}, "source", "missing (required)"),
        ({**GOOD, "source": 3}, "source", "expected a non-empty string"),
        ({**GOOD, "input": "no layout"}, "input", "guard input layout"),
        ({**GOOD, "output": "no answers here"}, "output", "no answer block"),
        (
            {**GOOD, "samples": GOOD["samples"][:3]},
            "samples",
            "3 sampled outputs where the other rows of this file have 4",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tmp_path: Path, bad_line: dict | str, field: str, message: str
) -> None:
    path = write_rows(tmp_path / "gen.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(UserError) as caught:
        mine_file(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: field '{field}': ")
    assert message in text
    assert "--skip-invalid" in text
    # With skip_invalid the row is counted and the rest is mined.
    mined = mine_file(path, skip_invalid=True)
    assert len(mined.invalid) == 1 and mined.invalid[0].startswith(f"{path}:3: ")
    assert (mined.rows, len(mined.pairs)) == (4, 3)


def test_inconsistent_k_reports_the_odd_row_even_when_it_comes_first(tmp_path: Path) -> None:
    short = hard_prompt_row(9, wrong=1, k=2)
    path = write_rows(tmp_path / "gen.jsonl", [short, GOOD, GOOD])
    with pytest.raises(
        UserError, match=r"gen.jsonl:1: field 'samples': 2 sampled outputs where .* have 4"
    ):
        mine_file(path)
    mined = mine_file(path, skip_invalid=True)
    assert mined.samples_per_row == 4 and len(mined.pairs) == 2


def test_unreadable_or_empty_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        mine_file(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty file"):
        mine_file(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xff\n")
    with pytest.raises(UserError, match=r"latin1.jsonl:2: field 'record': not valid UTF-8"):
        mine_file(tmp_path / "latin1.jsonl")


def test_the_output_may_not_overwrite_an_input(tmp_path: Path) -> None:
    gen = write_rows(tmp_path / "gen.jsonl", [GOOD])
    with pytest.raises(UserError, match="also an output"):
        mine_files([gen], gen, log=silent)
    assert read_pairs(gen) == [GOOD]


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_mines_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write_rows(
        tmp_path / "a.jsonl", [hard_prompt_row(0, wrong=1), hard_prompt_row(1, wrong=3)]
    )
    second = write_rows(tmp_path / "b.jsonl", [hard_prompt_row(1, wrong=1, source="AegisTrainR")])
    out = tmp_path / "pairs.jsonl"
    assert main(["mine", str(first), str(second), "--out", str(out), "--max-norm", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "WildGuardTrainR" in printed and "AegisTrainR" in printed
    assert "all_right" in printed and "unparseable" in printed
    assert "pairs: 2 (3 mined, 1 duplicate inputs dropped)" in printed
    pairs = read_pairs(out)
    assert [p["sample_weight"] for p in pairs] == pytest.approx([0.5, 1.5])
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["max_norm"] == 0.5 and summary["pairs"] == 2


def test_cli_bad_input_exits_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = write_rows(tmp_path / "gen.jsonl", [GOOD, {**GOOD, "samples": {"0": "x"}}])
    out = tmp_path / "pairs.jsonl"
    assert main(["mine", str(gen), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {gen}:2: field 'samples': expected a list of K")
    assert "Traceback" not in err
    assert not out.exists()
    assert main(["mine", str(gen), "--out", str(out), "--skip-invalid"]) == 0
    assert len(read_pairs(out)) == 1
    assert json.loads(summary_path(out).read_text())["invalid_rows"] == 1
    assert main(["mine", str(gen), "--out", str(out), "--max-norm", "1.5"]) == 2
    assert "max_norm" in capsys.readouterr().err


def test_cli_end_to_end_in_a_subprocess(tmp_path: Path) -> None:
    gen = write_rows(
        tmp_path / "gen.jsonl", [hard_prompt_row(0, wrong=1), hard_prompt_row(1, wrong=2)]
    )
    out = tmp_path / "pairs.jsonl"
    command = [sys.executable, "-m", "reasonguard", "mine", str(gen), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote 2 pairs to {out}" in done.stdout
    assert [p["sample_weight"] for p in read_pairs(out)] == pytest.approx([0.8, 1.2])
    bad = write_rows(tmp_path / "bad.jsonl", ["not json"])
    done = subprocess.run(
        [*command[:4], str(bad), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert f"{bad}:1: field 'record': malformed JSON" in done.stderr
