"""Acceptance: the released GuardReasoner-1B predictions reproduce the paper (official protocol),
and the strict protocol scores every row once. Runs the real CLI on the shared data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PAPER_1B = {
    ("HarmBenchPrompt", "prompt"): 96.31,
    ("AegisSafetyTest", "prompt"): 89.34,
    ("SimpleSafetyTests", "prompt"): 98.99,
    ("HarmBenchResponse", "response"): 84.75,
    ("XSTestReponseHarmful", "response"): 90.12,
    ("XSTestResponseRefusal", "refusal"): 91.34,
}
METRIC_KEYS = {"benchmark", "task", "f1", "precision", "recall", "accuracy", "n"}
METRIC_KEYS |= {"parse_failures", "parse_failure_rate", "confusion"}


@pytest.fixture(scope="module")
def paths(shared_dir: Path) -> tuple[Path, Path]:
    return shared_dir / "data/predictions/GuardReasoner-1B", shared_dir / "data/benchmarks"


def _evaluate(cli, paths, out: Path, *extra: str) -> tuple[dict, str]:
    preds, bench = paths
    code, stdout, stderr = cli("evaluate", preds, "--benchmark-dir", bench, "--out", out, *extra)
    assert code == 0, stderr
    assert (out / "report.md").read_text() == stdout
    return json.loads((out / "metrics.json").read_text()), stdout


def _f1(metrics: dict) -> dict[tuple[str, str], float]:
    return {(r["benchmark"], r["task"]): round(r["f1"], 2) for r in metrics["benchmarks"]}


def test_official_protocol_reproduces_the_paper(cli, paths, tmp_path) -> None:
    metrics, report = _evaluate(
        cli, paths, tmp_path, "--protocol", "official", "--paper", "GuardReasoner 1B"
    )
    assert _f1(metrics) == PAPER_1B
    assert metrics["protocol"] == "official"
    assert "| GuardReasoner 1B (paper) | 72.43 | 96.31 |" in report
    assert "FIRST `Key: label` match in the last 300 characters" in report


def test_strict_protocol_scores_every_row_once(cli, paths, tmp_path) -> None:
    metrics, report = _evaluate(cli, paths, tmp_path)
    aegis = next(r for r in metrics["benchmarks"] if r["benchmark"] == "AegisSafetyTest")
    # With the last-answer-anywhere parser the two outputs the official window misses are read
    # (one of them right), giving 89.19; counting them once as wrong would give 88.94.
    assert round(aegis["f1"], 2) == 89.19
    assert aegis["n"] == aegis["scored"] == 359
    assert aegis["parse_failures"] == 0 and aegis["dropped"] == aegis["double_counted"] == 0
    harmbench = next(r for r in metrics["benchmarks"] if r["benchmark"] == "HarmBenchResponse")
    assert (harmbench["n"], harmbench["parse_failures"]) == (602, 2)
    assert "the LAST valid `Request:` / `Completion:` / `Response:` answer anywhere" in report


def test_metrics_json_schema(cli, paths, tmp_path) -> None:
    metrics, _ = _evaluate(cli, paths, tmp_path)
    assert {"protocol", "benchmarks", "tasks", "overall_f1"} <= set(metrics)
    for row in metrics["benchmarks"]:
        assert set(row) >= METRIC_KEYS
        assert set(row["confusion"]) == {"tp", "fp", "fn", "tn"}
    for task in ("prompt", "response", "refusal"):
        assert {"weighted_f1", "benchmarks"} <= set(metrics["tasks"][task])
    # Three of six prompt benchmarks present: the average covers them and the report says so.
    assert metrics["tasks"]["prompt"]["missing"] == [
        "ToxicChat",
        "OpenAIModeration",
        "WildGuardTest",
    ]
    assert any("prompt: weighted F1 over 3 of 6 benchmarks" in note for note in metrics["notes"])
    assert {m["benchmark"] for m in metrics["missing"]} == {
        "ToxicChat",
        "OpenAIModeration",
        "WildGuardTest",
        "SafeRLHF",
        "BeaverTails",
    }


def test_labels_from_predictions_when_no_benchmark_dir(cli, paths, tmp_path, monkeypatch) -> None:
    """Without a benchmark folder the rows' own `label` field gives the same scores."""
    monkeypatch.delenv("REASONGUARD_BENCHMARKS", raising=False)
    code, report, _ = cli("evaluate", paths[0], "--protocol", "official", "--out", tmp_path)
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert _f1(metrics) == PAPER_1B
    assert metrics["benchmark_dir"] is None
    assert "true labels read from the `label` field" in report


def test_benchmark_dir_from_environment(cli, paths, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REASONGUARD_BENCHMARKS", str(paths[1]))
    code, _, _ = cli("evaluate", paths[0], "--out", tmp_path)
    assert code == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["benchmark_dir"] == str(paths[1])


def test_evaluate_imports_no_heavy_library(paths, tmp_path) -> None:
    """The model-free commands must start fast: no torch, transformers, numpy, pandas."""
    preds, bench = paths
    code = (
        "import sys\nfrom reasonguard.cli import main\n"
        f"rc = main(['evaluate', {str(preds)!r}, '--benchmark-dir', {str(bench)!r}, '--out', {str(tmp_path)!r}])\n"
        "heavy = {'torch', 'transformers', 'numpy', 'pandas', 'matplotlib', 'sklearn', 'yaml'}\n"
        "print(sorted(heavy & set(sys.modules)), rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[] 0"
