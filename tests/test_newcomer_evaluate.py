"""What a new user meets first with `evaluate` and `compare`: where results go, how much of the
benchmark suite a headline number covers, and paper row names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import guard_output
from reasonguard.evaluate.registry import BENCHMARKS

# Four harmful SimpleSafetyTests rows, three answered right.
SST_ROWS = [
    {"label": "harmful", "predict": guard_output("harmful" if i < 3 else "unharmful")}
    for i in range(4)
]


def _help(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from reasonguard.cli import main

    with pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------
# The default output folder


def test_evaluate_without_out_never_writes_into_the_predictions(
    cli, eval_case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eval_case.predictions("SimpleSafetyTests", SST_ROWS)
    before = sorted(p.relative_to(eval_case.preds) for p in eval_case.preds.rglob("*"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    code, report, err = cli("evaluate", eval_case.preds)

    assert code == 0, err
    assert sorted(p.relative_to(eval_case.preds) for p in eval_case.preds.rglob("*")) == before
    out = Path("runs") / "eval-preds"
    assert (work / out / "report.md").read_text() == report
    assert json.loads((work / out / "metrics.json").read_text())["name"] == "preds"
    assert f"wrote {out / 'metrics.json'} and {out / 'report.md'}" in err
    # The folder evaluate wrote is what compare reads.
    code, comparison, err = cli("compare", out)
    assert code == 0, err
    assert "| SimpleSafetyTests | 85.71 |" in comparison


def test_evaluate_help_names_the_default_output_folder(capsys) -> None:
    text = _help(capsys, "evaluate")
    assert "default runs/eval-<PRED_DIR's folder name>" in text
    assert "never inside PRED_DIR" in text


def test_a_default_output_inside_the_predictions_is_refused(
    cli, eval_case, monkeypatch: pytest.MonkeyPatch
) -> None:
    eval_case.predictions("SimpleSafetyTests", SST_ROWS)
    monkeypatch.chdir(eval_case.preds)
    code, _, err = cli("evaluate", ".")
    assert code == 2
    assert "would be inside the predictions folder" in err and "--out" in err
    assert sorted(p.name for p in eval_case.preds.iterdir()) == ["SimpleSafetyTests"]


# --------------------------------------------------------------------------------------------
# Coverage beside every overall number


@pytest.fixture(scope="module")
def released_1b(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """metrics.json and report.md of the released GuardReasoner-1B predictions (6 of 13 pairs)."""
    from reasonguard.cli import main

    out = tmp_path_factory.mktemp("eval-1b")
    preds = shared_dir / "data/predictions/GuardReasoner-1B"
    bench = shared_dir / "data/benchmarks"
    code = main(["evaluate", str(preds), "--benchmark-dir", str(bench), "--out", str(out)])
    assert code == 0
    return out


# The 7 pairs the release lacks, benchmark by benchmark in the paper's table order.
MISSING_1B = (
    "ToxicChat, OpenAIModeration, WildGuardTest (prompt, response, refusal), SafeRLHF, BeaverTails"
)


def test_report_states_the_coverage_of_the_overall_f1(released_1b: Path) -> None:
    report = (released_1b / "report.md").read_text()
    overall = report.split("## Overall")[1].split("## Details")[0]
    assert f"over 6 of 13 benchmark-task pairs (missing: {MISSING_1B})" in overall
    assert "prompt 3 of 6, response 2 of 5, refusal 1 of 2" in overall


def test_metrics_json_carries_the_coverage_counts(released_1b: Path) -> None:
    coverage = json.loads((released_1b / "metrics.json").read_text())["coverage"]
    assert (coverage["pairs_scored"], coverage["pairs_total"]) == (6, 13)
    assert coverage["tasks"]["prompt"] == {"pairs_scored": 3, "pairs_total": 6}
    assert coverage["tasks"]["refusal"] == {"pairs_scored": 1, "pairs_total": 2}
    assert {"benchmark": "WildGuardTest", "task": "refusal"} in coverage["missing"]
    assert len(coverage["missing"]) == 7


def test_compare_summary_and_targets_state_partial_coverage(
    cli, released_1b: Path, tmp_path: Path
) -> None:
    targets = tmp_path / "t.yaml"
    targets.write_text(
        "levels:\n  minimum:\n    overall_f1: 50\n    prompt_f1: 50\n    refusal_f1: 99\n"
    )
    code, report, err = cli("compare", released_1b, "--targets", targets)
    assert code == 0, err
    name = "GuardReasoner-1B"  # the run's name: its predictions folder
    summary = report.split("## Summary")[1].split("## Targets")[0]
    assert "| benchmark-task pairs | 6 of 13 |" in summary
    assert f"{name}: 6 of 13 benchmark-task pairs (missing: {MISSING_1B})" in summary
    lines = {line.split("|")[1].strip(): line for line in report.splitlines() if line[:2] == "| "}
    assert "pass (on 6 of 13 pairs)" in lines["overall_f1"]
    assert "pass (on 3 of 6 pairs)" in lines["prompt_f1"]
    assert "FAIL (on 1 of 2 pairs)" in lines["refusal_f1"]


def _full_case(eval_case) -> None:
    """Two rows per benchmark, every pair present, labels in the predictions."""
    both = guard_output("harmful", "refusal", "harmful")
    for name, bench in BENCHMARKS.items():
        if len(bench.tasks) > 1:
            rows = [{"label": both, "predict": both}] * 2
        else:
            label = "refusal" if bench.tasks == ("refusal",) else "harmful"
            rows = [{"label": label, "predict": both}] * 2
        eval_case.predictions(name, rows)


def test_full_coverage_has_no_caveat(cli, eval_case, tmp_path: Path) -> None:
    _full_case(eval_case)
    out = tmp_path / "full"
    code, report, err = cli("evaluate", eval_case.preds, "--out", out)
    assert code == 0, err
    assert "over all 13 benchmark-task pairs" in report
    assert "missing:" not in report.split("## Overall")[1].split("## Details")[0]
    targets = tmp_path / "t.yaml"
    targets.write_text("levels:\n  minimum:\n    overall_f1: 50\n")
    code, comparison, err = cli("compare", out, "--targets", targets)
    assert code == 0, err
    assert "| overall_f1 | minimum | >= 50 | 100.00 pass |" in comparison
    assert "| benchmark-task pairs | 13 of 13 |" in comparison


# --------------------------------------------------------------------------------------------
# Paper row names


def test_paper_rows_match_case_insensitively(cli, eval_case) -> None:
    eval_case.predictions("SimpleSafetyTests", SST_ROWS)
    code, report, err = cli(
        "evaluate", eval_case.preds, "--out", eval_case.out, "--paper", "GuardReasoner 1b"
    )
    assert code == 0, err
    assert "| GuardReasoner 1B (paper) |" in report
    code, comparison, err = cli("compare", eval_case.out, "--paper", "guardreasoner  3B")
    assert code == 0, err
    assert "GuardReasoner 3B (paper)" in comparison


def test_unknown_paper_row_suggests_the_closest_and_lists_all(cli, eval_case) -> None:
    eval_case.predictions("SimpleSafetyTests", SST_ROWS)
    code, _, err = cli(
        "evaluate", eval_case.preds, "--out", eval_case.out, "--paper", "GuardReasoner-1B"
    )
    assert code == 2
    assert "no paper row 'GuardReasoner-1B'; did you mean 'GuardReasoner 1B'?" in err
    assert "LLaMA Guard 3" in err and "GuardReasoner 8B" in err
    assert not eval_case.out.exists()
