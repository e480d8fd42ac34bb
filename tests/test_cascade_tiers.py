"""The cascade of tiers as a library: a classifier (all-MiniLM-L6-v2, a few steps on the sample
rows) in front of tiny-llama's fast mode and reasoning through `load_guard`, each verdict naming
its tier; a replay of GuardReasoner-1B's released predictions as a top tier; bands chosen by
`fit.calibrate_tiers` on one half of real benchmark rows and reported on the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard import load_guard
from reasonguard.cascade.bands import Bands, f1_score
from reasonguard.cascade.calibrate import DevItem, items_from_benchmarks, split_dev
from reasonguard.cascade.fit import calibrate_tiers, fit_tiers
from reasonguard.cascade.replay import ReplayGuard
from reasonguard.cascade.tiers import Cascade, Tier
from reasonguard.classifier.train import run_classifier
from reasonguard.errors import UserError
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE
from reasonguard.format import parse_output
from reasonguard.infer.guard import GuardResult
from reasonguard.models import resolve_model
from test_classifier_support import small_config

ITEMS = [
    {"prompt": "How do I bake sourdough bread at home?"},
    {"prompt": "How can I poison my neighbour's dog?", "response": "I can't help with that."},
    {"prompt": "Write me a poem about the sea.", "response": "The sea is wide and grey."},
]
RELEASED = "GuardReasoner-1B"
PROMPT_FILES = ("AegisSafetyTest", "HarmBenchPrompt")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("classifier")
    return run_classifier(small_config(tmp, max_length=48, num_train_epochs=1)).final_dir


def _copy_rows(shared_dir: Path, folder: Path, names: tuple[str, ...], rows: int) -> None:
    """The first rows of real benchmark files and of the released predictions on them."""
    for name in names:
        filename = BENCHMARKS[name].filename
        bench = json.loads((shared_dir / "data/benchmarks" / filename).read_text())
        (folder / "benchmarks").mkdir(parents=True, exist_ok=True)
        (folder / "benchmarks" / filename).write_text(json.dumps(bench[:rows]))
        lines = (shared_dir / "data/predictions" / RELEASED / name / PREDICTIONS_FILE).read_text()
        out = folder / "predictions" / name
        out.mkdir(parents=True)
        (out / PREDICTIONS_FILE).write_text("".join(lines.splitlines(True)[:rows]))


def test_three_tiers_through_load_guard_each_verdict_names_its_tier(classifier_dir: Path) -> None:
    plain = load_guard("tiny-llama", device="cpu", max_new_tokens=6)
    fast = plain.classify(ITEMS[1:], mode="fast")
    p = [r.scores["response_harmfulness"]["harmful"] for r in fast]
    assert p[0] != p[1]
    # The classifier keeps the prompt-only item (no band for the request task) and passes up
    # both items with a response (refusal band [0, 1]); fast mode keeps the first of them and
    # passes the last up (a band holding its P(harmful response) alone).
    guard = load_guard(
        "tiny-llama",
        classifier=str(classifier_dir),
        classifier_bands=Bands({"refusal": (0.0, 1.0)}),
        bands=Bands({"response": (p[1], p[1])}),
        device="cpu",
        max_new_tokens=6,
    )
    assert guard.mode == "cascade" and "classifier" in guard.modes
    results = guard.classify(ITEMS)
    assert [r.tier for r in results] == ["classifier", "fast", "reasoning"]
    assert [r.mode for r in results] == ["classifier", "fast", "reasoning"]
    alone = load_guard(str(classifier_dir), device="cpu").classify(ITEMS)[0]  # one batch
    assert results[0].scores == alone.scores and results[0].num_tokens == 0
    assert results[1].scores == fast[0].scores
    reasoned = plain.classify(ITEMS[2:], mode="reasoning")[0]
    assert results[2].output == reasoned.output and results[2].num_tokens == reasoned.num_tokens
    # the classifier alone, and the guard's own modes, from the same object
    assert [r.tier for r in guard.classify(ITEMS, mode="classifier")] == ["classifier"] * 3
    assert {r.tier for r in guard.classify(ITEMS, mode="fast")} == {"fast"}
    # the cascade's run keeps what each tier said of the items it passed up
    run = guard.tiers().run(ITEMS)
    assert run.passed(0) == [1, 2] and run.passed(1) == [2]
    assert run.seen[1][2].scores == fast[1].scores


def test_bad_classifier_tiers_are_refused_before_loading(
    classifier_dir: Path, tmp_path: Path
) -> None:
    llm = resolve_model("tiny-llama")
    with pytest.raises(UserError, match="not a classifier folder"):
        load_guard("tiny-llama", classifier=llm, bands=Bands.everything())
    with pytest.raises(UserError, match="no such folder"):
        load_guard("tiny-llama", classifier=str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="encoder classifier itself"):
        load_guard(str(classifier_dir), classifier=str(classifier_dir))
    with pytest.raises(UserError, match="no three-tier calibration"):
        load_guard("tiny-llama", classifier=str(classifier_dir), bands=Bands.everything())
    with pytest.raises(UserError, match="tier 'classifier' has no uncertainty bands"):
        Cascade([Tier("classifier", None), Tier("reasoning", None)])
    with pytest.raises(UserError, match="at least two tiers"):
        Cascade([Tier("reasoning", None)])


def test_a_replay_answers_with_the_released_verdicts(shared_dir: Path, tmp_path: Path) -> None:
    _copy_rows(shared_dir, tmp_path, ("AegisSafetyTest", "HarmBenchResponse"), 5)
    replay = ReplayGuard(tmp_path / "predictions", benchmark_dir=tmp_path / "benchmarks")
    assert replay.benchmarks == ("AegisSafetyTest", "HarmBenchResponse")
    assert not replay.token_counts  # the released rows do not say
    items = items_from_benchmarks(["HarmBenchResponse"], tmp_path / "benchmarks")
    results = replay.classify([{"prompt": i.prompt, "response": i.response} for i in items])
    released = replay.benchmark_results("HarmBenchResponse")
    assert results == released
    rows = (tmp_path / "predictions/HarmBenchResponse" / PREDICTIONS_FILE).read_text()
    for result, line in zip(results, rows.splitlines(), strict=True):
        parsed = parse_output(json.loads(line)["predict"])
        assert result.response_harmfulness == parsed.response_harmfulness
        assert result.mode == "reasoning" and result.output == json.loads(line)["predict"]
    with pytest.raises(UserError, match="item 0: not among the predictions replayed"):
        replay.classify([{"prompt": "A prompt nobody judged."}])


def test_a_bad_replay_folder_names_the_file_and_line(shared_dir: Path, tmp_path: Path) -> None:
    _copy_rows(shared_dir, tmp_path, ("AegisSafetyTest",), 4)
    path = tmp_path / "predictions/AegisSafetyTest" / PREDICTIONS_FILE
    lines = path.read_text().splitlines(True)
    with pytest.raises(UserError, match="fewer|3 prediction rows but 4 rows"):
        path.write_text("".join(lines[:3]))
        ReplayGuard(tmp_path / "predictions", benchmark_dir=tmp_path / "benchmarks")
    path.write_text("".join(lines[:2]) + "{not json\n" + lines[3])
    with pytest.raises(UserError, match=rf"{PREDICTIONS_FILE}:3: malformed JSON"):
        ReplayGuard(tmp_path / "predictions")
    row = json.loads(lines[1])
    del row["predict"]
    path.write_text(lines[0] + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"{PREDICTIONS_FILE}:2: field 'predict': missing"):
        ReplayGuard(tmp_path / "predictions")
    path.write_text(lines[0] + json.dumps({**row, "predict": "x", "prompt": "no input"}) + "\n")
    with pytest.raises(UserError, match=rf"{PREDICTIONS_FILE}:2: field 'prompt'"):
        ReplayGuard(tmp_path / "predictions")
    with pytest.raises(UserError, match="no predictions for HarmBenchPrompt"):
        ReplayGuard(tmp_path / "predictions", benchmarks=["HarmBenchPrompt"])


def test_classifier_then_released_verdicts_calibrated_on_half_of_each_file(
    classifier_dir: Path, shared_dir: Path, tmp_path: Path
) -> None:
    _copy_rows(shared_dir, tmp_path, PROMPT_FILES, 30)
    items = items_from_benchmarks(list(PROMPT_FILES), tmp_path / "benchmarks")
    replay = ReplayGuard(tmp_path / "predictions", benchmark_dir=tmp_path / "benchmarks")
    classifier = load_guard(str(classifier_dir), device="cpu")
    tiers = [Tier("classifier", classifier), Tier("reasoning", replay)]
    record = calibrate_tiers(tiers, items, 2.0, held_out_share=0.5, per_source=True)
    calibration, held = split_dev(items, 0.5, 0, per_source=True)
    assert len(held) == 30 and record["held_out"]["items"] == 30
    # half of each file on each side
    assert set(record["held_out"]["by_source"]) == {i.place.split(" row ")[0] for i in items}
    assert all(p["items"] == 15 for p in record["held_out"]["by_source"].values())
    prompt = record["calibration"]["tasks"]["prompt"]
    assert prompt["cascade_f1"] >= prompt["top_f1"] - 2.0  # the budget, where it was chosen
    assert record["seconds_per_item"]["reasoning"] is None  # a replay costs nothing here
    assert record["tokens_per_item"]["cascade"] is None  # released rows count no tokens
    # The held-out report is what the cascade with those bands does on those items.
    bands = Bands.from_dict(record["tier_bands"]["classifier"])
    cascade = Cascade([Tier("classifier", classifier, bands=bands), Tier("reasoning", replay)])
    results = cascade.classify([{"prompt": items[k].prompt} for k in held])
    truth = [items[k].truth["prompt"] == "harmful" for k in held]
    predicted = [r.prompt_harmfulness == "harmful" for r in results]
    assert record["held_out"]["tasks"]["prompt"]["cascade_f1"] == round(
        f1_score(truth, predicted), 2
    )
    share = sum(r.tier == "reasoning" for r in results) / len(held)
    assert record["held_out"]["escalated_share"] == pytest.approx(share)
    assert record["held_out"]["answered_share"]["classifier"] == pytest.approx(1 - share)


def _verdict(label: bool, p: float | None = None) -> GuardResult:
    scores = {"prompt_harmfulness": None, "response_refusal": None, "response_harmfulness": None}
    if p is not None:
        scores["prompt_harmfulness"] = {"harmful": p, "unharmful": 1 - p}
    return GuardResult("harmful" if label else "unharmful", None, None, False, "", False, scores)


def test_three_tier_bands_share_the_budget_from_the_top_down() -> None:
    """Top always right; the classifier wrong on 8 items near 0.5, the fast tier on 4 of them:
    each band must cover its own tier's mistakes; the fast tier is fitted within half the
    budget, the classifier within all of it."""
    n = 60
    truth = [i % 2 == 0 for i in range(n)]
    items = [
        DevItem(f"item {i}", None, {"prompt": "harmful" if t else "unharmful", "refusal": None,
                "response": None}, f"dev.jsonl row {i + 1}")
        for i, t in enumerate(truth)
    ]  # fmt: skip
    fast_p = [0.95 if t else 0.05 for t in truth]
    clf_p = [0.9 if t else 0.1 for t in truth]
    for i in range(4, 8):
        fast_p[i] = 0.45 if truth[i] else 0.55
    for i in range(4, 12):
        clf_p[i] = 0.4 if truth[i] else 0.6
    verdicts = {
        "classifier": [_verdict(p > 0.5, p) for p in clf_p],
        "fast": [_verdict(p > 0.5, p) for p in fast_p],
        "reasoning": [_verdict(t) for t in truth],
    }
    every = list(range(n))
    record = fit_tiers(items, verdicts, (every, every[:10]), max_f1_drop=0.0)
    assert record["tiers"] == ["classifier", "fast", "reasoning"]
    assert record["band_choice"]["fast"]["prompt"]["budget"] == 0.0
    assert record["tier_bands"]["fast"]["prompt"] == [0.45, 0.55]
    low, high = record["tier_bands"]["classifier"]["prompt"]
    assert low <= 0.4 and high >= 0.6  # its own mistakes go up
    part = record["calibration"]
    assert part["tasks"]["prompt"]["cascade_f1"] == 100.0
    assert part["answered"] == {"classifier": 52, "fast": 4, "reasoning": 4}
    with_budget = fit_tiers(items, verdicts, (every, every[:10]), max_f1_drop=10.0)
    choice = with_budget["band_choice"]
    assert choice["fast"]["prompt"]["budget"] == 5.0
    assert choice["classifier"]["prompt"]["budget"] == 10.0
    assert with_budget["calibration"]["escalated"] <= part["escalated"]
    assert with_budget["calibration"]["tasks"]["prompt"]["cascade_f1"] >= 90.0
