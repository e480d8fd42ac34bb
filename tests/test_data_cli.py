"""`reasonguard data validate|stats`: exit codes, tables and messages through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard.cli import main
from reasonguard.format import INSTRUCTION, render_input, render_target


def record(i: int, labels=("unharmful", None, None), response: str | None = None) -> dict:
    return {
        "instruction": INSTRUCTION,
        "input": render_input(f"Question {i}: how do plants grow?", response),
        "output": render_target("# Task 1\n\n## Reasoning Step 1\nA biology question.", *labels),
    }


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [record(i) for i in range(3)]
    rows.append(record(3, ("harmful", "refusal", "unharmful"), response="I can't help with that."))
    (folder / "AegisTrainR.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "ToxicChatTrainR.json").write_text(json.dumps([record(9)]))
    return folder


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    rows = [record(0), {**record(1), "output": "no answers here"}, record(2)]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    return path


def test_validate_ok(good_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", str(good_folder)]) == 0
    out = capsys.readouterr().out
    assert "all 5 rows valid" in out
    assert "AegisTrainR" in out and "ToxicChatTrainR" in out


def test_validate_stops_at_the_first_invalid_row(
    bad_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "validate", str(bad_file)]) == 2
    err = capsys.readouterr().err
    # The 1-based line of the JSON-lines file, as for a line that is not JSON.
    assert err.startswith(f"error: invalid record: {bad_file}:2: split 'train'")
    assert "field 'output': no answer block" in err
    assert "Traceback" not in err


def test_validate_skip_invalid_lists_and_counts(
    bad_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every invalid row listed, and the exit status still says the data is not clean (2),
    unless --exit-zero asks for 0."""
    assert main(["data", "validate", str(bad_file), "--skip-invalid"]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert "1 invalid rows:" in out
    assert f"{bad_file}:2: split 'train': field 'output'" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split() == ["total", "3", "2", "1"]
    assert "error: 1 of 3 rows invalid (listed above)" in captured.err
    assert "--exit-zero" in captured.err and "Traceback" not in captured.err
    assert main(["data", "validate", str(bad_file), "--exit-zero"]) == 0
    out = capsys.readouterr().out
    assert f"{bad_file}:2: split 'train'" in out  # --exit-zero lists them as --skip-invalid
    assert "1 invalid rows; exit status 0 as asked (--exit-zero)" in out


def test_unknown_split_and_missing_file_exit_2(
    good_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "validate", str(good_folder), "--splits", "Nope"]) == 2
    assert "available splits: AegisTrainR, ToxicChatTrainR" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_hub_without_access_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["data", "validate"]) == 2  # SOURCE defaults to the hub dataset
    err = capsys.readouterr().err
    assert "cannot load 'yueliu1999/GuardReasonerTrain'" in err
    assert "Traceback" not in err


def test_stats_tables_and_json(
    good_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "out" / "stats.json"
    code = main(["data", "stats", str(good_folder), "--max-length", "150", "--json", str(out_file)])
    assert code == 0
    out = capsys.readouterr().out
    assert "labels, task prompt (Request:)" in out
    assert "token lengths (llama3-tokenizer, prompt format raw)" in out
    assert "max length 150 (given): 5 of 5 rows truncated" in out

    stats = json.loads(out_file.read_text())
    assert stats["source"] == str(good_folder)
    assert stats["rows"] == {"AegisTrainR": 4, "ToxicChatTrainR": 1}
    assert stats["labels"]["total"]["prompt"] == {"harmful": 1, "unharmful": 4, "None": 0}
    assert stats["labels"]["total"]["refusal"]["refusal"] == 1
    assert stats["tokens"]["truncated_rows"] == 5  # the instruction alone is ~100 tokens
    assert stats["tokens"]["auto_max_length"] == 1024
    assert stats["validation"]["num_invalid"] == 0


def test_stats_fails_on_invalid_rows_unless_skipped(
    bad_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "stats", str(bad_file), "--tokenizer", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid record: {bad_file}:2: split 'train'")
    assert "--skip-invalid" in err and "Traceback" not in err
    assert main(["data", "stats", str(bad_file), "--tokenizer", "none", "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 invalid rows left out" in captured.err
    assert "1 invalid rows left out (--skip-invalid)" in captured.out
    assert "token lengths" not in captured.out
    total = next(line for line in captured.out.splitlines() if line.strip().startswith("total"))
    assert total.split()[:2] == ["total", "2"]


def test_bad_max_length_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "stats", "samples", "--max-length", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
