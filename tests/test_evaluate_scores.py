"""Scores in evaluation: average precision and the threshold sweep by hand, and the evaluator's
`score_metrics` and report section for predictions that carry scores (none when they do not)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import guard_output
from reasonguard.evaluate.evaluator import evaluate_predictions
from reasonguard.evaluate.metrics import average_precision, best_threshold, threshold_sweep
from reasonguard.evaluate.report import render_report


def test_average_precision_by_hand() -> None:
    """Scores 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-); 2 positives.

    t=0.9: TP 1, FP 0 -> P 1,   R 0.5 -> adds (0.5 - 0) * 1     = 0.5
    t=0.8: TP 1, FP 1 -> P 1/2, R 0.5 -> adds 0
    t=0.7: TP 2, FP 1 -> P 2/3, R 1   -> adds (1 - 0.5) * 2/3   = 1/3
    t=0.1: TP 2, FP 2 -> P 1/2, R 1   -> adds 0
    AP = 0.5 + 1/3 = 5/6 = 83.33%.
    """
    scored = [(0.9, True), (0.8, False), (0.7, True), (0.1, False)]
    assert average_precision(scored) == pytest.approx(500 / 6)
    assert average_precision(reversed(scored)) == pytest.approx(500 / 6)  # order-free


def test_average_precision_ties_enter_together() -> None:
    """Scores 0.5 (+), 0.5 (-), 0.2 (+): the tie is one threshold.

    t=0.5: TP 1, FP 1 -> P 1/2, R 1/2 -> adds 1/2 * 1/2 = 1/4
    t=0.2: TP 2, FP 1 -> P 2/3, R 1   -> adds 1/2 * 2/3 = 1/3
    AP = 1/4 + 1/3 = 7/12 = 58.33% (taking the tie's rows one by one would give 75% or 41.67%).
    """
    assert average_precision([(0.5, True), (0.5, False), (0.2, True)]) == pytest.approx(700 / 12)


def test_average_precision_edge_cases() -> None:
    """A perfect ranking scores 100 whatever the scores; no positives: undefined (None).

    All positives: every threshold has precision 1, so AP = 100.
    """
    assert average_precision([(0.3, True), (0.2, False), (0.1, False)]) == 100.0
    assert average_precision([(0.4, True), (0.9, True)]) == 100.0
    assert average_precision([(0.9, False), (0.1, False)]) is None
    assert average_precision([]) is None


def test_threshold_sweep_by_hand() -> None:
    """Scores 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-), positive iff score >= t.

    t=0.1: all positive   -> TP 2, FP 2, FN 0: P 50,  R 100, F1 = 4/6 = 66.67
    t=0.2..0.7            -> TP 2, FP 1, FN 0: P 66.67, R 100, F1 = 4/5 = 80
    t=0.8                 -> TP 1, FP 1, FN 1: P 50,  R 50,  F1 = 2/4 = 50
    t=0.9                 -> TP 1, FP 0, FN 1: P 100, R 50,  F1 = 2/3 = 66.67
    Best F1 80, first reached at t=0.2 (ties go to the lowest threshold).
    """
    sweep = threshold_sweep([(0.9, True), (0.8, False), (0.7, True), (0.1, False)])
    assert [e["threshold"] for e in sweep] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    f1 = [round(e["f1"], 2) for e in sweep]
    assert f1 == [66.67, 80.0, 80.0, 80.0, 80.0, 80.0, 80.0, 50.0, 66.67]
    assert (sweep[7]["precision"], sweep[7]["recall"]) == (50.0, 50.0)
    assert best_threshold(sweep)["threshold"] == 0.2
    assert best_threshold([]) is None


def _row(true: str, p: float | None) -> dict:
    scores = {"prompt_harmfulness": None if p is None else {"harmful": p, "unharmful": 1 - p}}
    return {"label": true, "predict": guard_output(true), "scores": scores}


def test_evaluator_adds_score_metrics_and_a_report_section(eval_case) -> None:
    """The four rows above, plus one row with no score (no answer line): left out and counted."""
    rows = [_row("harmful", 0.9), _row("unharmful", 0.8), _row("harmful", 0.7)]
    rows += [_row("unharmful", 0.1), _row("harmful", None)]
    eval_case.predictions("SimpleSafetyTests", rows)
    metrics = evaluate_predictions(eval_case.preds)
    (pair,) = metrics["benchmarks"]
    s = pair["score_metrics"]
    assert s["auprc"] == pytest.approx(500 / 6)
    assert (s["rows"], s["positives"], s["no_score"]) == (4, 2, 1)
    assert s["best"]["threshold"] == 0.2 and s["best"]["f1"] == pytest.approx(80.0)
    assert pair["n"] == 5  # the F1 side still scores every row
    report = render_report(metrics)
    assert "## Scores" in report and "### Threshold sweep (F1 %)" in report
    assert "| SimpleSafetyTests | prompt | 4 | 1 | 83.33 | 0.2 | 80.00 | 80.00 |" in report


def test_without_scores_nothing_changes(eval_case) -> None:
    eval_case.predictions("SimpleSafetyTests", [{"label": "harmful", "predict": "x"}])
    metrics = evaluate_predictions(eval_case.preds)
    assert "score_metrics" not in metrics["benchmarks"][0]
    assert "## Scores" not in render_report(metrics)


def test_scoring_imports_no_numeric_library(eval_case) -> None:
    """AUPRC is plain Python: scoring predictions with scores loads no numpy / sklearn / torch."""
    eval_case.predictions("SimpleSafetyTests", [_row("harmful", 0.9), _row("unharmful", 0.2)])
    code = (
        "import sys\nfrom reasonguard.cli import main\n"
        f"rc = main(['evaluate', {str(eval_case.preds)!r}, '--out', {str(eval_case.out)!r}])\n"
        "print(sorted({'torch', 'numpy', 'sklearn', 'transformers'} & set(sys.modules)), rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[] 0"
    assert "AUPRC" in (eval_case.out / "report.md").read_text()
