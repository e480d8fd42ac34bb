"""Held-out calibration: the bands are chosen on one part of the dev set and reported on the
other (a seeded stratified split); the held-out part never influences the bands; cascade.json
lists both parts' item hashes and a cascade run warns when it scores calibrated-on items."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from reasonguard.cascade.bands import CASCADE_FILE, TaskEvidence, choose_band
from reasonguard.cascade.calibrate import DevItem, Measured, fit, split_dev
from reasonguard.cascade.holdout import calibrated_on, item_hash, stratified_split
from reasonguard.errors import UserError
from reasonguard.infer.guard import GuardResult


def test_split_is_stratified_seeded_and_independent_of_order() -> None:
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    keys = [f"k{i}" for i in range(100)]
    calibration, held = stratified_split(strata, 0.3, seed=0, keys=keys)
    assert sorted(calibration + held) == list(range(100)) and not set(calibration) & set(held)
    # Every stratum gives its share: 15 of 50, 9 of 30, 6 of 20.
    assert Counter(strata[k] for k in held) == {"a": 15, "b": 9, "c": 6}
    assert stratified_split(strata, 0.3, seed=0, keys=keys) == (calibration, held)
    other = stratified_split(strata, 0.3, seed=1, keys=keys)[1]
    assert other != held and len(other) == 30
    # The same items listed in another order: the same items held out.
    order = list(reversed(range(100)))
    _, held_reversed = stratified_split(
        [strata[k] for k in order], 0.3, 0, [keys[k] for k in order]
    )
    assert {keys[order[k]] for k in held_reversed} == {keys[k] for k in held}


def test_duplicates_stay_on_one_side_and_bad_shares_are_refused() -> None:
    keys = ["x", "y", "x", "z", "y", "w"]
    calibration, held = stratified_split(["s"] * 6, 0.5, seed=3, keys=keys)
    assert not {keys[k] for k in calibration} & {keys[k] for k in held}
    assert len({keys[k] for k in held}) == 2  # half of the 4 distinct items
    with pytest.raises(UserError, match="between 0 and 1"):
        stratified_split(["s"] * 6, 1.0, seed=0, keys=keys)
    with pytest.raises(UserError, match="1 distinct item"):
        stratified_split(["s"] * 3, 0.3, seed=0, keys=["x"] * 3)


def _result(label: str, p_harmful: float | None) -> GuardResult:
    scores = {"prompt_harmfulness": None, "response_refusal": None, "response_harmfulness": None}
    if p_harmful is not None:
        scores["prompt_harmfulness"] = {"harmful": p_harmful, "unharmful": 1 - p_harmful}
    return GuardResult(label, None, None, False, "", False, scores, num_tokens=10)


def _dev(n: int, truth: list[bool]) -> list[DevItem]:
    return [
        DevItem(
            f"prompt number {i}",
            None,
            {"prompt": "harmful" if t else "unharmful", "refusal": None, "response": None},
            f"row {i}",
        )
        for i, t in enumerate(truth)
    ]


def test_held_out_items_do_not_choose_the_bands() -> None:
    """Reasoning is always right; fast mode is wrong exactly near 0.5 on the calibration part.
    Changing every held-out item (its truth, its fast score, its reasoning verdict) leaves the
    bands and the calibration numbers as they were, and changes only the held-out report."""
    n = 40
    truth = [i % 2 == 1 for i in range(n)]
    items = _dev(n, truth)
    calibration, held = split_dev(items, 0.3, seed=0)
    assert len(held) == 12
    p = [0.9 if t else 0.1 for t in truth]
    for k in calibration[:6]:  # fast mode unsure and wrong on a few calibration items
        p[k] = 0.45 if truth[k] else 0.55
    reasoning = [_result("harmful" if t else "unharmful", None) for t in truth]
    fast = [_result("harmful" if x > 0.5 else "unharmful", x) for x in p]
    measured = Measured(reasoning, fast, 1.0, 0.1)
    record = fit(items, measured, (calibration, held), max_f1_drop=0.0)
    assert record["bands"]["prompt"] == [0.45, 0.55]
    # The band is the one chosen from the calibration items alone.
    alone = choose_band(
        TaskEvidence(
            [truth[k] for k in calibration],
            [truth[k] for k in calibration],
            [p[k] > 0.5 for k in calibration],
            [p[k] for k in calibration],
        ),
        0.0,
    )
    assert alone == record["calibration"]["tasks"]["prompt"]
    assert record["held_out"]["tasks"]["prompt"]["f1_drop"] == 0.0
    assert record["held_out"]["escalated"] == 0

    # Held-out items made adversarial: fast mode confidently wrong, truth flipped; a band
    # chosen with them would have to cover 0.1 .. 0.9.
    changed_items, changed_fast, changed_reasoning = list(items), list(fast), list(reasoning)
    for k in held:
        changed_items[k] = DevItem(
            items[k].prompt,
            None,
            {**items[k].truth, "prompt": "unharmful" if truth[k] else "harmful"},
            items[k].place,
        )
        changed_fast[k] = _result("harmful" if truth[k] else "unharmful", 0.9 if truth[k] else 0.1)
        changed_reasoning[k] = _result("unharmful" if truth[k] else "harmful", None)
    changed_measured = Measured(changed_reasoning, changed_fast, 1.0, 0.1)
    for budget in (0.0, 0.5):
        before = fit(items, measured, (calibration, held), budget)
        after = fit(changed_items, changed_measured, (calibration, held), budget)
        assert after["bands"] == before["bands"]
        assert after["calibration"] == before["calibration"]
        # ...while the report on the held-out part shows what the bands do there.
        assert after["held_out"]["tasks"]["prompt"]["f1_drop"] == 100.0
    hashes = record["item_hashes"]
    assert hashes["held_out"] == [item_hash(items[k].prompt, None) for k in held]
    assert len(hashes["calibration"]) == n - 12


def test_calibrate_reports_held_out_numbers_and_evaluate_warns_on_overlap(
    tmp_path, shared_dir, cli
) -> None:
    from reasonguard.models import resolve_model

    model = tmp_path / "model"
    shutil.copytree(resolve_model("tiny-llama"), model)
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    source = shared_dir / "data/benchmarks/0_1_AegisSafetyTest.json"
    rows = json.loads(source.read_text())[:12]
    (bench / source.name).write_text(json.dumps(rows))
    args = ["--model", model, "--max-new-tokens", 4, "--batch-size", 6]
    code, stdout, err = cli(
        "calibrate", *args, "--benchmarks", "AegisSafetyTest", "--benchmark-dir", bench
    )
    assert code == 0, err
    record = json.loads((model / CASCADE_FILE).read_text())
    assert record["split"]["method"] == "seeded stratified split"
    assert record["split"]["held_out_share"] == 0.3 and record["split"]["seed"] == 0
    assert record["calibration"]["items"] + record["held_out"]["items"] == record["items"] == 12
    held = record["held_out"]
    assert held["items"] == 4 and 0 <= held["escalated_share"] <= 1
    assert held["tasks"]["prompt"]["items"] == 4 and "f1_drop" in held["tasks"]["prompt"]
    hashes = record["item_hashes"]
    assert len(set(hashes["calibration"])) == 8 and len(set(hashes["held_out"])) == 4
    assert not set(hashes["calibration"]) & set(hashes["held_out"])
    assert "reported on 4 held out" in stdout and "held-out items escalated" in stdout

    # Scoring the benchmark it was calibrated on: warned, naming how many.
    code, _, err = cli(
        "evaluate", *args, "--benchmarks", "AegisSafetyTest", "--benchmark-dir", bench,
        "--mode", "cascade", "--no-progress", "--out", tmp_path / "eval",
    )  # fmt: skip
    assert code == 0, err
    assert "warning: 8 of the 12 items scored (AegisSafetyTest 8)" in err
    assert calibrated_on(record, [r["input"] for r in rows]) == 8
    assert calibrated_on({"bands": {}}, [r["input"] for r in rows]) is None

    code, _, err = cli("calibrate", *args, "--data", source, "--held-out-share", 0)
    assert code == 2 and "--held-out-share must be between 0 and 1" in err
