"""bench/classifier_transfer.py at its smallest size (`--quick`), run once for the module: every
row has its numbers, GuardReasoner-1B's are the evaluator's scores of the same files, and the
cascade is scored only on the half of each file its bands were not chosen on (no timing value
is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reasonguard.cascade.calibrate import items_from_benchmarks
from reasonguard.cascade.holdout import item_hash
from reasonguard.evaluate.evaluator import evaluate_predictions
from reasonguard.evaluate.registry import BENCHMARKS

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = (
    "SimpleSafetyTests",
    "AegisSafetyTest",
    "HarmBenchPrompt",
    "HarmBenchResponse",
    "XSTestReponseHarmful",
    "XSTestResponseRefusal",
)
ROWS = 30  # --quick scores the first 30 rows of each held-out file
PREDICTIONS = "generated_predictions.jsonl"


@pytest.fixture(scope="module")
def bench(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("transfer")
    command = [
        sys.executable, str(REPO / "bench/classifier_transfer.py"), "--quick",
        "--benchmark-dir", str(shared_dir / "data/benchmarks"),
        "--predictions", str(shared_dir / "data/predictions/GuardReasoner-1B"),
        "--work-dir", str(root / "work"), "--json", str(root / "result.json"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((root / "result.json").read_text())
    return {"result": result, "work": root / "work", "stdout": done.stdout, "shared": shared_dir}


def rows_of(path: Path) -> list[dict]:
    # "\n" only: str.splitlines also cuts at characters JSON strings may hold (U+2028).
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def test_training_ran_through_the_config_and_reports_its_time(bench: dict) -> None:
    t = bench["result"]["training"]
    assert t["seconds"] > 0 and t["steps"] >= 1 and t["train_items"] > 0
    assert Path(t["config"]).read_text().startswith("# reasonguard train classifier --config")
    assert set(t["sources"]) == {"ToxicChat", "OpenAIModeration", "BeaverTails", "SafeRLHF"}
    assert all(s["rows"] == 40 for s in t["sources"].values())
    assert t["labels"]["refusal"]["labelled"] == 0  # no source has a refusal label
    assert t["heads"]["refusal"].startswith("untrained")
    assert t["heads"]["prompt"].startswith("trained") and t["heads"]["response"].startswith(
        "trained"
    )


def test_transfer_rows_beside_the_evaluators_scores_of_the_released_predictions(
    bench: dict,
) -> None:
    shared, work = bench["shared"], bench["work"]
    rows = {r["benchmark"]: r for r in bench["result"]["transfer"]}
    assert list(rows) == list(HELD_OUT)
    released = evaluate_predictions(
        shared / "data/predictions/GuardReasoner-1B", shared / "data/benchmarks", limit=ROWS
    )
    ours = evaluate_predictions(
        work / "classifier-predictions", shared / "data/benchmarks", limit=ROWS
    )
    for metrics, key in ((released, "gr1b_f1"), (ours, "classifier_f1")):
        for scored in metrics["benchmarks"]:
            assert rows[scored["benchmark"]][key] == round(scored["f1"], 2), key
    for name, r in rows.items():
        assert r["rows"] == ROWS and r["task"] == BENCHMARKS[name].tasks[0]
        assert 0 <= r["classifier_f1"] <= 100 and 0 <= r["gr1b_f1"] <= 100
        assert r["head"] == ("untrained" if r["task"] == "refusal" else "trained")
    assert "(untrained head)" in bench["stdout"]


def test_latency_numbers_are_present(bench: dict) -> None:
    lat = bench["result"]["latency"]
    assert lat["items"] == 10
    assert 0 < lat["p50_ms"] <= lat["p95_ms"]
    assert lat["batched_items"] == ROWS * len(HELD_OUT) and lat["batched_items_per_s"] > 0


def test_cascade_is_scored_only_on_the_half_it_was_not_calibrated_on(bench: dict) -> None:
    c, work, shared = bench["result"]["cascade"], bench["work"], bench["shared"]
    halves = work / "scored-halves"
    released_dir = shared / "data/predictions/GuardReasoner-1B"
    assert [r["benchmark"] for r in c["benchmarks"]] == list(HELD_OUT)
    calibrated_items, scored_items = set(), set()
    for r in c["benchmarks"]:
        name, calibration, scored = r["benchmark"], r["calibration_rows"], r["scored_rows"]
        assert not set(calibration) & set(scored)
        assert sorted(calibration + scored) == list(range(ROWS))
        assert abs(len(scored) - ROWS / 2) <= 1
        items = items_from_benchmarks([name], shared / "data/benchmarks")[:ROWS]
        calibrated_items |= {item_hash(items[k].prompt, items[k].response) for k in calibration}
        scored_items |= {item_hash(items[k].prompt, items[k].response) for k in scored}
        if name != "XSTestResponseRefusal":  # its items are XSTestReponseHarmful's (same side)
            # Stratified: each half holds its share of the positives (within one row).
            task = r["task"]
            positive = [k for k in range(ROWS) if items[k].truth[task] in ("harmful", "refusal")]
            assert abs(len(set(positive) & set(scored)) - len(positive) / 2) <= 1
        # What was scored is the scored half: its benchmark rows and GuardReasoner-1B's rows.
        bench_rows = json.loads(
            (shared / "data/benchmarks" / BENCHMARKS[name].filename).read_text()
        )
        half = json.loads((halves / "benchmarks" / BENCHMARKS[name].filename).read_text())
        assert half == [bench_rows[k] for k in scored]
        released = rows_of(released_dir / name / PREDICTIONS)
        assert rows_of(halves / "gr1b" / name / PREDICTIONS) == [released[k] for k in scored]
        # Each cascade row is GuardReasoner-1B's where escalated, the classifier's elsewhere.
        ours = rows_of(work / "classifier-predictions" / name / PREDICTIONS)
        cascade = rows_of(halves / "cascade" / name / PREDICTIONS)
        taken = [row == released[k] for row, k in zip(cascade, scored, strict=True)]
        assert all(t or row == ours[k] for t, row, k in zip(taken, cascade, scored, strict=True))
        assert sum(taken) == r["escalated"] and 0 <= r["escalated_share"] <= 1
        assert r["escalated_share"] == round(r["escalated"] / len(scored), 4)
        for key in ("cascade_f1", "gr1b_f1", "classifier_f1"):
            assert 0 <= r[key] <= 100, (name, key)
    for tier in ("cascade", "gr1b", "classifier"):
        metrics = evaluate_predictions(halves / tier, halves / "benchmarks")
        for scored in metrics["benchmarks"]:
            row = next(r for r in c["benchmarks"] if r["benchmark"] == scored["benchmark"])
            assert row[f"{tier}_f1"] == round(scored["f1"], 2)
        assert c["overall_f1"][tier] == round(metrics["overall_f1"], 2)
    # No item (two files share some) is both calibrated on and scored.
    assert not calibrated_items & scored_items
    # The bands were chosen on the calibration halves only: as many items as those halves hold.
    for task in ("prompt", "response"):
        calibrated = sum(len(r["calibration_rows"]) for r in c["benchmarks"] if r["task"] == task)
        assert c["band_choice"][task]["items"] == calibrated
    assert c["bands"]["refusal"] == [0.0, 1.0]  # the untrained head decides nothing
    refusal = next(r for r in c["benchmarks"] if r["task"] == "refusal")
    assert refusal["escalated_share"] == 1.0 and refusal["cascade_f1"] == refusal["gr1b_f1"]
    assert 0 <= c["escalated_share"] <= 1
    assert c["escalated"] == sum(r["escalated"] for r in c["benchmarks"])
    assert c["f1_below_gr1b"] == round(c["overall_f1"]["gr1b"] - c["overall_f1"]["cascade"], 2)
