"""Bad input through the real CLI: exit code 2 and a message naming file, line and field;
`--skip-bad-rows` counts what it skipped. Never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import guard_output

GOOD = {"prompt": "p", "label": "harmful", "predict": guard_output("harmful")}


@pytest.fixture
def case(eval_case):
    """Three Aegis benchmark rows; the test writes the predictions."""
    eval_case.benchmark("0_1_AegisSafetyTest", [{"output": "harmful"}] * 3)
    return eval_case


def _fails(cli, case, *extra, match: str) -> str:
    code, _, err = cli(
        "evaluate", case.preds, "--benchmark-dir", case.bench, "--out", case.out, *extra
    )
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert match in err, err
    return err


def test_malformed_json_line(cli, case) -> None:
    path = case.predictions(
        "AegisSafetyTest", json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n"
    )
    err = _fails(cli, case, match=f"{path}:2: malformed JSON")
    assert "--skip-bad-rows" in err


def test_row_that_is_not_an_object(cli, case) -> None:
    path = case.predictions("AegisSafetyTest", f"{json.dumps(GOOD)}\n[1, 2]\n{json.dumps(GOOD)}\n")
    _fails(cli, case, match=f"{path}:2: expected a JSON object, got list")


def test_missing_predict_key(cli, case) -> None:
    path = case.predictions("AegisSafetyTest", [GOOD, GOOD, {"prompt": "p", "label": "harmful"}])
    _fails(cli, case, match=f"{path}:3: field 'predict': missing key 'predict'")


def test_predict_not_a_string(cli, case) -> None:
    path = case.predictions("AegisSafetyTest", [GOOD, {**GOOD, "predict": None}, GOOD])
    _fails(cli, case, match=f"{path}:2: field 'predict': expected a string")


def test_missing_label_key_without_benchmark_file(cli, eval_case) -> None:
    path = eval_case.predictions("AegisSafetyTest", [GOOD, {"predict": "x"}])
    code, _, err = cli("evaluate", eval_case.preds, "--out", eval_case.out)
    assert code == 2 and f"{path}:2: missing key 'label'" in err


def test_unknown_true_label_in_benchmark_file(cli, eval_case) -> None:
    bench = eval_case.benchmark(
        "0_1_AegisSafetyTest", [{"output": "harmful"}, {"output": "harmfull"}]
    )
    eval_case.predictions("AegisSafetyTest", [GOOD, GOOD])
    code, _, err = cli("evaluate", eval_case.preds, "--benchmark-dir", eval_case.bench)
    assert code == 2
    assert f"{bench} row 2: field 'output': unknown label 'harmfull' for task prompt" in err


def test_unknown_true_label_in_prediction_label(cli, eval_case) -> None:
    path = eval_case.predictions("AegisSafetyTest", [GOOD, {**GOOD, "label": "toxic"}])
    code, _, err = cli("evaluate", eval_case.preds, "--out", eval_case.out)
    assert code == 2 and f"{path}:2: field 'label': unknown label 'toxic'" in err


def test_missing_label_column(cli, eval_case) -> None:
    bench = eval_case.benchmark("0_1_AegisSafetyTest", [{"label": "harmful"}])
    eval_case.predictions("AegisSafetyTest", [GOOD])
    code, _, err = cli("evaluate", eval_case.preds, "--benchmark-dir", eval_case.bench)
    assert code == 2 and f"{bench} row 1: missing key 'output'" in err


def test_empty_prediction_file(cli, case) -> None:
    path = case.predictions("AegisSafetyTest", "\n")
    _fails(cli, case, match=f"{path}: empty file (no rows)")


def test_empty_benchmark_file(cli, case) -> None:
    case.predictions("AegisSafetyTest", [GOOD] * 3)
    bench = case.benchmark("0_1_AegisSafetyTest", "")
    _fails(cli, case, match=f"{bench}: empty file")


def test_malformed_benchmark_file(cli, case) -> None:
    case.predictions("AegisSafetyTest", [GOOD] * 3)
    bench = case.benchmark("0_1_AegisSafetyTest", '[\n{"output": "harmful"},\n{"output": }\n]')
    _fails(cli, case, match=f"{bench}:3: malformed JSON")


def test_non_utf8_bytes(cli, case) -> None:
    good = json.dumps(GOOD).encode()
    path = case.predictions(
        "AegisSafetyTest", good + b"\n" + good[:10] + b"\xff\xfe" + good[10:] + b"\n" + good
    )
    _fails(cli, case, match=f"{path}:2: not valid UTF-8 (byte 0xff at column 11)")


def test_non_utf8_benchmark_file(cli, case) -> None:
    case.predictions("AegisSafetyTest", [GOOD] * 3)
    bench = case.benchmark("0_1_AegisSafetyTest", b'[{"output": "harm\xe9ful"}]')
    _fails(cli, case, match=f"{bench}:1: not valid UTF-8")


def test_unknown_benchmark_folder(cli, case) -> None:
    case.predictions("AegisSafetyTests", [GOOD] * 3)
    _fails(
        cli,
        case,
        match="unknown benchmark folder 'AegisSafetyTests' (did you mean 'AegisSafetyTest'?)",
    )


def test_row_count_differs_from_benchmark(cli, case) -> None:
    path = case.predictions("AegisSafetyTest", [GOOD] * 2)
    _fails(cli, case, match=f"{path}: 2 prediction rows but 3 rows in")


def test_no_benchmark_folders(cli, case) -> None:
    _fails(cli, case, match="no benchmark folders")


def test_missing_predictions_folder(cli, tmp_path) -> None:
    code, _, err = cli("evaluate", tmp_path / "nope")
    assert code == 2 and "nope: not found" in err


def test_missing_benchmark_folder(cli, case) -> None:
    case.predictions("AegisSafetyTest", [GOOD] * 3)
    code, _, err = cli("evaluate", case.preds, "--benchmark-dir", case.bench / "typo")
    assert code == 2 and "benchmark folder not found (from --benchmark-dir)" in err


def test_unknown_paper_row(cli, case) -> None:
    case.predictions("AegisSafetyTest", [GOOD] * 3)
    _fails(cli, case, "--paper", "GuardReasoner 2B", match="no paper row 'GuardReasoner 2B'")


def test_skip_bad_rows_counts_them(cli, case) -> None:
    """Line 2 is malformed and line 3 lacks `predict`: 1 row scored, 2 skipped and reported."""
    case.predictions(
        "AegisSafetyTest", f"{json.dumps(GOOD)}\n{{oops\n{json.dumps({'label': 'x'})}\n"
    )
    code, report, _ = cli(
        "evaluate", case.preds, "--benchmark-dir", case.bench, "--out", case.out, "--skip-bad-rows"
    )
    assert code == 0
    (row,) = json.loads((case.out / "metrics.json").read_text())["benchmarks"]
    assert (row["n"], row["skipped_rows"]) == (1, 2)
    assert len(row["bad_rows"]) == 2
    assert "AegisSafetyTest: skipped 2 bad rows" in report


def test_missing_benchmark_file_is_reported_not_fatal(cli, eval_case) -> None:
    eval_case.predictions("SimpleSafetyTests", [GOOD])
    code, report, _ = cli(
        "evaluate", eval_case.preds, "--benchmark-dir", eval_case.bench, "--out", eval_case.out
    )
    assert code == 0
    assert "0_0_SimpleSafetyTests.json not in" in report and "`label` field" in report


def test_real_console_entry_point(case) -> None:
    """The installed command, not just `main()`: exit status 2 and no traceback."""
    case.predictions("AegisSafetyTest", "{broken\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "reasonguard",
            "evaluate",
            str(case.preds),
            "--benchmark-dir",
            str(case.bench),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "generated_predictions.jsonl:1: malformed JSON" in out.stderr
    assert "Traceback" not in out.stderr
