"""`reasonguard compare`: deltas against the first run, paper rows, targets, charts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, guard_output
from reasonguard.evaluate.targets import load_targets


def _run(cli, eval_case, name: str, right: int) -> Path:
    """An evaluation of 4 harmful SimpleSafetyTests rows with `right` answered harmful.

    F1 = 2*right / (2*right + (4 - right)): right=2 -> 4/6 = 66.67, right=4 -> 100.
    """
    preds = eval_case.preds / name
    (preds / "SimpleSafetyTests").mkdir(parents=True)
    rows = [
        {"label": "harmful", "predict": guard_output("harmful" if i < right else "unharmful")}
        for i in range(4)
    ]
    (preds / "SimpleSafetyTests/generated_predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    out = eval_case.out / name
    code, _, err = cli("evaluate", preds, "--out", out)
    assert code == 0, err
    return out


@pytest.fixture
def two_runs(cli, eval_case) -> tuple[Path, Path]:
    return _run(cli, eval_case, "exp18", right=2), _run(cli, eval_case, "exp19", right=4)


def test_deltas_against_the_first_run(cli, two_runs) -> None:
    code, report, _ = cli("compare", *two_runs)
    assert code == 0
    assert "| SimpleSafetyTests | 66.67 | 100.00 (+33.33) |" in report
    assert "| prompt weighted F1 | 66.67 | 100.00 (+33.33) |" in report
    # Overall accuracy pools the rows: 2 of 4 right, then 4 of 4.
    assert "| overall accuracy | 50.00 | 100.00 (+50.00) |" in report


def test_paper_row_column(cli, two_runs) -> None:
    code, report, _ = cli("compare", two_runs[0], "--paper", "GuardReasoner 3B")
    assert code == 0
    # The paper's prompt average is recomputed over the benchmarks the run has (SST only).
    assert "| SimpleSafetyTests | 66.67 | 100.00 (+33.33) |" in report
    assert "| Weighted avg | 66.67 | 100.00 (+33.33) |" in report


def test_out_writes_markdown_and_one_png_per_task(cli, two_runs, tmp_path) -> None:
    code, report, _ = cli("compare", two_runs[0] / "metrics.json", two_runs[1], "--out", tmp_path)
    assert code == 0
    assert (tmp_path / "comparison.md").read_text() == report
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["f1_prompt.png"]
    assert (tmp_path / "f1_prompt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_pass_and_fail(cli, two_runs, tmp_path) -> None:
    targets = tmp_path / "t.yaml"
    targets.write_text("levels:\n  minimum:\n    prompt_f1: 75\n    refusal_f1: 70\n")
    code, report, _ = cli("compare", *two_runs, "--targets", targets)
    assert code == 0
    # Both runs scored 1 of the 6 prompt pairs: the cells say so beside pass / FAIL.
    assert (
        "| prompt_f1 | minimum | >= 75 | 66.67 FAIL (on 1 of 6 pairs) | "
        "100.00 pass (on 1 of 6 pairs) |"
    ) in report
    assert "| refusal_f1 | minimum | >= 70 | - FAIL | - FAIL |" in report  # not evaluated


def test_shipped_example_targets() -> None:
    """The seed's minimum and target levels, in percent."""
    levels = load_targets(REPO / "examples/targets-exp19.yaml")
    assert levels["minimum"] == {
        "overall_accuracy": 70,
        "prompt_f1": 75,
        "refusal_f1": 70,
        "response_f1": 70,
    }
    assert levels["target"] == {
        "overall_accuracy": 75,
        "prompt_f1": 80,
        "refusal_f1": 75,
        "response_f1": 75,
    }
    assert (REPO / "examples/targets-exp19.yaml").read_text().startswith("# reasonguard compare")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("levels:\n  minimum:\n    accuracy: 70\n", "metric 'accuracy': unknown metric"),
        ("levels:\n  minimum:\n    prompt_f1: 0.75\n", "write 75, not 0.75"),
        ("levels:\n  minimum:\n    prompt_f1: high\n", "expected a number, got 'high'"),
        ("levels: [1, 2]\n", "expected a mapping 'levels:"),
        ("levels:\n  minimum: {prompt_f1: 75\n", "t.yaml:3: malformed YAML"),
    ],
)
def test_bad_targets_file(cli, two_runs, tmp_path, text: str, message: str) -> None:
    targets = tmp_path / "t.yaml"
    targets.write_text(text)
    code, _, err = cli("compare", *two_runs, "--targets", targets)
    assert code == 2 and message in err, err


def test_run_without_metrics(cli, tmp_path) -> None:
    code, _, err = cli("compare", tmp_path)
    assert code == 2 and "metrics.json: not found" in err


def test_run_that_is_not_metrics(cli, tmp_path) -> None:
    (tmp_path / "metrics.json").write_text('{"loss": 1}')
    code, _, err = cli("compare", tmp_path)
    assert (
        code == 2 and "not a reasonguard metrics.json (missing protocol, benchmarks, tasks)" in err
    )


def test_run_with_malformed_entries(cli, tmp_path) -> None:
    (tmp_path / "metrics.json").write_text(
        '{"protocol": "strict", "tasks": {}, "benchmarks": [{"f1": 1}]}'
    )
    code, _, err = cli("compare", tmp_path)
    assert code == 2 and "bad entry: KeyError('benchmark')" in err
