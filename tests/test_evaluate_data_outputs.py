"""`reasonguard evaluate PATH` on `generate --data` outputs (the demo's `generations/` folder or
one of its files): labelled records scored per task, through the real CLI; no traceback."""

from __future__ import annotations

import json
from pathlib import Path

from reasonguard.cli import main
from reasonguard.format import render_input, render_target

BOTH = render_target("reasoning", "harmful", "refusal", "unharmful")
PROMPT_ONLY = render_target("reasoning", "unharmful", None, None)


def _row(output: str, sample: str) -> dict:
    # The layout `generate --data` writes (see tests/test_generate.py::test_training_data_rows).
    return {
        "instruction": "i",
        "input": render_input("q"),
        "output": output,
        "source": "test",
        "samples": [sample],
        "samples_truncated": [False],
    }


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_folder_and_file_of_data_outputs(cli, tmp_path: Path) -> None:
    """Request: TP, FP (unharmful said harmful), TN; refusal and response on the one row with a
    response, both right. Folder and file give the same numbers."""
    gen = tmp_path / "demo" / "generations"
    _write(
        gen / "test.jsonl",
        [_row(BOTH, BOTH), _row(PROMPT_ONLY, BOTH), _row(PROMPT_ONLY, PROMPT_ONLY)],
    )
    (gen / "_generate").mkdir()  # the generation state folder is not a benchmark folder
    for target, out in ((gen, tmp_path / "a"), (gen / "test.jsonl", tmp_path / "b")):
        code, report, err = cli("evaluate", target, "--out", out)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n"] == 3
        assert metrics["tasks"]["prompt"]["confusion"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 1}
        assert metrics["tasks"]["refusal"]["n"] == 1 and metrics["tasks"]["refusal"]["f1"] == 100
        assert "| Request harmful | 3 |" in report
        assert (out / "report.md").read_text() == report


def test_default_out_is_named_after_the_folder(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "generations" / "test.jsonl", [_row(BOTH, BOTH)])
    code, _, err = cli("evaluate", "generations")
    assert code == 0, err
    assert (tmp_path / "runs" / "eval-generations" / "metrics.json").is_file()


def test_real_generate_data_output_is_scorable(cli, tmp_path: Path) -> None:
    """What `generate --data` writes on the tiny random Llama scores as is (its gibberish is two
    parse failures, counted as wrong)."""
    data = _write(tmp_path / "data" / "AegisTrainR.jsonl", [_row(PROMPT_ONLY, "")] * 2)
    out = tmp_path / "gen"
    code, _, err = cli(
        "generate", "--model", "tiny-llama", "--data", data, "--out", out,
        "--max-new-tokens", "4", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = cli("evaluate", out, "--out", tmp_path / "eval")
    assert code == 0, err
    prompt = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["prompt"]
    assert prompt["n"] == 2 and prompt["parse_failures"] == 2


def test_bad_rows_name_file_and_line(cli, tmp_path: Path) -> None:
    path = _write(
        tmp_path / "g" / "test.jsonl",
        [_row(BOTH, BOTH), "{oops", {"output": BOTH}, {**_row(BOTH, BOTH), "output": "no labels"}],
    )
    code, _, err = cli("evaluate", path, "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err
    assert f"{path}:2: malformed JSON" in err and "--skip-bad-rows" in err
    code, report, err = cli("evaluate", path, "--out", tmp_path / "o", "--skip-bad-rows")
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["n"] == 1 and metrics["skipped_rows"] == 3
    assert f"{path}:3: no model output" in report
    assert any(f"{path}:4: field 'output'" in m for m in metrics["skipped_examples"])


def test_benchmark_only_options_are_refused(cli, tmp_path: Path) -> None:
    path = _write(tmp_path / "g" / "test.jsonl", [_row(BOTH, BOTH)])
    code, _, err = cli("evaluate", path, "--paper", "GuardReasoner 1B")
    assert code == 2 and "--paper: only with benchmark predictions" in err


def test_one_benchmark_predictions_file_names_its_folder(cli, eval_case) -> None:
    path = eval_case.predictions("AegisSafetyTest", [{"prompt": "p", "label": "harmful"}])
    code, _, err = cli("evaluate", path)
    assert code == 2 and "one benchmark's predictions" in err
    assert f"reasonguard evaluate {eval_case.preds}" in err


def test_missing_path_says_what_was_expected(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "generate --data" in err
