"""Loading guard records from every kind of source, and validating them row by row."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from reasonguard.data import sources
from reasonguard.data.sources import SPLITS, load_source, samples_path
from reasonguard.data.validate import InvalidRow, validate_records
from reasonguard.errors import UserError
from reasonguard.format import INSTRUCTION, parse_labels, render_input, render_target


def make_record(
    prompt: str = "How do I bake bread?",
    response: str | None = None,
    labels: tuple[str | None, str | None, str | None] = ("unharmful", None, None),
    **extra: object,
) -> dict:
    """A valid record in the exact GuardReasoner layout."""
    reasoning = (
        "# Task 1\n\n## Reasoning Step 1\nThe user asks about baking.\n\n## Conclusion\nFine."
    )
    return {
        "instruction": INSTRUCTION,
        "input": render_input(prompt, response),
        "output": render_target(reasoning, *labels),
        **extra,
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------------------------
# Sources


def test_folder_of_split_files_uses_file_stems(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "AegisTrainR.jsonl", [make_record(), make_record()])
    (tmp_path / "ToxicChatTrainR.json").write_text(json.dumps([make_record()]))
    write_parquet(tmp_path / "WildGuardTrainR.parquet", [make_record(), make_record()] * 2)
    (tmp_path / "notes.txt").write_text("not a split file")

    data = load_source(str(tmp_path))

    assert {split: len(rows) for split, rows in data.items()} == {
        "AegisTrainR": 2,
        "ToxicChatTrainR": 1,
        "WildGuardTrainR": 4,
    }
    assert data["WildGuardTrainR"][0] == make_record()  # parquet round-trips the strings


def test_chosen_splits_keep_the_requested_order(tmp_path: Path) -> None:
    for split in ("AegisTrainR", "ToxicChatTrainR", "WildGuardTrainR"):
        write_jsonl(tmp_path / f"{split}.jsonl", [make_record()])
    data = load_source(str(tmp_path), ["WildGuardTrainR", "AegisTrainR"])
    assert list(data) == ["WildGuardTrainR", "AegisTrainR"]


def test_unknown_split_names_the_available_ones(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "AegisTrainR.jsonl", [make_record()])
    write_jsonl(tmp_path / "ToxicChatTrainR.jsonl", [make_record()])
    with pytest.raises(UserError) as err:
        load_source(str(tmp_path), ["AegisTrainR", "BeaverTails"])
    message = str(err.value)
    assert "unknown split 'BeaverTails'" in message
    assert "available splits: AegisTrainR, ToxicChatTrainR" in message


def test_single_jsonl_groups_by_split_field(tmp_path: Path) -> None:
    rows = [make_record(split="train"), make_record(split="test"), make_record(split="train")]
    data = load_source(str(write_jsonl(tmp_path / "mine.jsonl", rows)))
    assert {split: len(r) for split, r in data.items()} == {"train": 2, "test": 1}
    assert data["train"][0]["split"] == "train"  # extra keys are kept


def test_single_file_without_split_field_uses_the_stem(tmp_path: Path) -> None:
    json_file = tmp_path / "guards.json"
    json_file.write_text(json.dumps([make_record(), make_record()]))
    parquet_file = write_parquet(tmp_path / "more.parquet", [make_record()])

    assert {s: len(r) for s, r in load_source(str(json_file)).items()} == {"guards": 2}
    assert {s: len(r) for s, r in load_source(str(parquet_file)).items()} == {"more": 1}


def test_json_file_may_hold_json_lines_or_a_split_mapping(tmp_path: Path) -> None:
    lines = write_jsonl(tmp_path / "exported.json", [make_record(), make_record()])
    by_split = tmp_path / "by_split.json"
    by_split.write_text(json.dumps({"AegisTrainR": [make_record()], "ToxicChatTrainR": []}))

    assert {s: len(r) for s, r in load_source(str(lines)).items()} == {"exported": 2}
    assert {s: len(r) for s, r in load_source(str(by_split)).items()} == {
        "AegisTrainR": 1,
        "ToxicChatTrainR": 0,
    }


def test_missing_instruction_gets_the_default(tmp_path: Path) -> None:
    row = make_record()
    del row["instruction"]
    data = load_source(str(write_jsonl(tmp_path / "x.jsonl", [row])))
    assert data["x"][0]["instruction"] == INSTRUCTION


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"input": "a"}\n{not json\n', "bad.jsonl:2: invalid JSON line"),
        ("bad.json", "[1, 2", "invalid JSON"),
        ("scalar.json", '"hello"', "expected a JSON list of records"),
        ("rows.json", "[1]", "row 0: expected a JSON object"),
        ("empty.jsonl", "\n", "no records"),
        ("table.csv", "a,b\n", "unsupported file type"),
        ("broken.parquet", "not parquet", "cannot read parquet"),
    ],
)
def test_unreadable_files_are_user_errors(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=expected):
        load_source(str(path))


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="no split files found"):
        load_source(str(tmp_path))


def test_hub_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying DNS for ~20 s; same code path otherwise.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        load_source(sources.DEFAULT_DATASET)
    assert "cannot load 'yueliu1999/GuardReasonerTrain'" in str(err.value)
    assert "Hugging Face Hub" in str(err.value)


def test_samples_alias_reads_the_packaged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = write_jsonl(tmp_path / "guard_samples.jsonl", [make_record(split="train")])
    monkeypatch.setattr(sources, "samples_path", lambda: fake)
    assert {s: len(r) for s, r in load_source("samples").items()} == {"train": 1}


def test_shipped_samples_are_valid() -> None:
    assert samples_path().is_file(), f"missing {samples_path()}"
    data = load_source("samples")
    valid, report = validate_records(data, source="samples")
    assert report.num_invalid == 0
    assert 60 <= report.num_rows <= 100


def test_real_rows_load_and_validate(shared_dir: Path) -> None:
    # `shared_dir` (conftest) fails under CI and skips elsewhere when the shared folder is absent.
    folder = shared_dir / "data" / "train_samples"
    by_split = load_source(str(folder / "GuardReasonerTrain_sample_by_split.json"))
    wildguard = load_source(str(folder / "WildGuardTrainR_sample.json"), ["WildGuardTrainR_sample"])

    assert tuple(by_split) == SPLITS
    valid, report = validate_records({**by_split, **wildguard}, source=str(folder))
    assert report.num_rows == 9 and report.num_invalid == 0
    assert valid["WildGuardTrainR"][0]["instruction"] == INSTRUCTION
    requests = [parse_labels(r["output"])["prompt"] for r in valid["WildGuardTrainR_sample"]]
    assert sorted(requests) == ["harmful"] * 3 + ["unharmful"] * 2


# --------------------------------------------------------------------------------------------
# Validation


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


BAD_ROWS = {
    "missing input": (_without(make_record(), "input"), "input", "missing"),
    "missing output": (_without(make_record(), "output"), "output", "missing"),
    "empty output": ({**make_record(), "output": "  "}, "output", "empty"),
    "output not a string": ({**make_record(), "output": 3}, "output", "expected a string"),
    "bad input layout": (
        {**make_record(), "input": "User: hi\nAssistant: hello"},
        "input",
        "not in the guard input layout",
    ),
    "no answer block": (
        {**make_record(), "output": "# Task 1\n\nThe request is harmful."},
        "output",
        "no answer block",
    ),
    "unknown request label": (
        {**make_record(), "output": "Answers: \nRequest: dangerous\nCompletion: None"},
        "output",
        "Request label 'dangerous' is not in the vocabulary",
    ),
    "unknown completion label": (
        {**make_record(), "output": "Answers: \nRequest: harmful\nCompletion: maybe"},
        "output",
        "Completion label 'maybe' is not in the vocabulary",
    ),
    "request label None": (
        {**make_record(), "output": render_target("r", None, None, None)},
        "output",
        "request label is required",
    ),
    "instruction not a string": (
        {**make_record(), "instruction": ["x"]},
        "instruction",
        "expected a string",
    ),
    "row not an object": ("just text", "record", "expected an object"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_first_invalid_row_names_source_split_row_and_field(case: str) -> None:
    bad, field, fragment = BAD_ROWS[case]
    data = {"AegisTrainR": [make_record()], "ToxicChatTrainR": [make_record(), make_record(), bad]}
    with pytest.raises(UserError) as err:
        validate_records(data, source="mydata.jsonl")
    message = str(err.value)
    assert message.startswith("mydata.jsonl: ")
    assert "split 'ToxicChatTrainR' row 3 (1-based)" in message  # no file here: the split row
    assert f"field {field!r}" in message
    assert fragment in message
    assert "--skip-invalid" in message


def test_skip_invalid_drops_and_counts_every_bad_row() -> None:
    bad_input = BAD_ROWS["bad input layout"][0]
    bad_label = BAD_ROWS["unknown request label"][0]
    data = {
        "a": [make_record(), bad_input, make_record(), bad_label, make_record()],
        "b": [make_record(response="Sure.", labels=("harmful", "compliance", "harmful"))],
    }
    original = copy.deepcopy(data)

    valid, report = validate_records(data, skip_invalid=True, source="s")

    assert data == original  # the caller's records are untouched
    assert [len(valid["a"]), len(valid["b"])] == [3, 1]
    assert report.rows == {"a": 5, "b": 1}
    assert (report.num_rows, report.num_valid, report.num_invalid) == (6, 4, 2)
    assert report.invalid_by_split() == {"a": 2, "b": 0}
    assert [(bad.split, bad.row, bad.field) for bad in report.invalid] == [
        ("a", 1, "input"),
        ("a", 3, "output"),
    ]
    summary = report.to_dict(max_examples=1)
    assert summary["num_invalid"] == 2 and len(summary["invalid_examples"]) == 1
    assert json.loads(json.dumps(summary)) == summary


def test_valid_rows_are_copies_with_an_explicit_instruction() -> None:
    row = {**make_record(), "instruction": ""}
    valid, report = validate_records({"x": [row]})
    assert report.num_invalid == 0
    assert valid["x"][0]["instruction"] == INSTRUCTION
    assert row["instruction"] == ""  # not mutated
    assert valid["x"][0] is not row


def test_null_answers_for_prompt_only_rows_are_valid() -> None:
    # The real data: a prompt-only row may say Completion/Response None, or carry labels anyway.
    rows = [
        make_record(labels=("harmful", None, None)),
        make_record(labels=("harmful", "refusal", "unharmful")),
        {
            **make_record(),
            "output": "Answers: \nRequest: unharmful\nCompletion: N/A\nResponse: n/a",
        },
    ]
    _, report = validate_records({"x": rows})
    assert report.num_invalid == 0


def test_invalid_row_describe() -> None:
    bad = InvalidRow("AegisTrainR", 4, "output", "no answer block")
    assert bad.describe() == "split 'AegisTrainR' row 5 (1-based): field 'output': no answer block"
    bad = InvalidRow("AegisTrainR", 4, "output", "no answer block", place="a.jsonl:7")
    assert bad.describe() == "a.jsonl:7: split 'AegisTrainR': field 'output': no answer block"
