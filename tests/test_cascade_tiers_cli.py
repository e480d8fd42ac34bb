"""The three-tier cascade on the command line: `calibrate --classifier`, `classify`, `evaluate`
and `compare` with `--classifier`, a real `serve --classifier` process; each verdict and
prediction row names its tier, and bad input is refused with exit code 2.

The routed model is tiny-llama with a cascade.json whose bands send known rows to known tiers:
the classifier keeps the prompt-only rows (no request band) and passes up every row with a
response (refusal band [0, 1]); fast mode keeps the two with the larger P(refusal) and passes
the other two up to reasoning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from reasonguard import load_guard
from reasonguard.cascade.bands import CASCADE_FILE, write_calibration
from reasonguard.cascade.calibrate import items_from_benchmarks
from reasonguard.cascade.tiers import TIER_NAMES
from reasonguard.classifier.train import run_classifier
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE
from reasonguard.models import resolve_model
from test_classifier_support import small_config

NAMES = ("AegisSafetyTest", "HarmBenchResponse")
ROWS = 4
SHARES = "classifier 50% / fast 25% / reasoning 25%"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("classifier")
    return run_classifier(small_config(tmp, max_length=48, num_train_epochs=1)).final_dir


@pytest.fixture(scope="module")
def bench_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("benchmarks")
    for name in NAMES:
        filename = BENCHMARKS[name].filename
        rows = json.loads((shared_dir / "data" / "benchmarks" / filename).read_text())
        (folder / filename).write_text(json.dumps(rows[:ROWS]))
    return folder


@pytest.fixture(scope="module")
def routed(
    classifier_dir: Path, bench_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict], list[str]]:
    """(model folder, the response rows' items, the tier each of them reaches)."""
    model = tmp_path_factory.mktemp("routed") / "model"
    shutil.copytree(resolve_model("tiny-llama"), model)
    dev = items_from_benchmarks(["HarmBenchResponse"], bench_dir)
    items = [{"prompt": i.prompt, "response": i.response} for i in dev]
    fast = load_guard(str(model), device="cpu").classify(items, mode="fast")
    p = [r.scores["response_refusal"]["refusal"] for r in fast]
    ranked = sorted(p)
    assert ranked[1] < ranked[2]
    cut = (ranked[1] + ranked[2]) / 2
    everything = [0.0, 1.0]
    write_calibration(
        model,
        {
            "tiers": list(TIER_NAMES),
            "classifier": str(classifier_dir),
            "bands": {"prompt": None, "response": None, "refusal": [0.0, cut]},
            "tier_bands": {"classifier": {"prompt": None, "response": None, "refusal": everything}},
        },
    )
    return model, items, ["reasoning" if x <= cut else "fast" for x in p]


def _rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name / PREDICTIONS_FILE).open()]


def test_evaluate_and_compare_show_each_tiers_share(
    cli, routed, classifier_dir: Path, bench_dir: Path, tmp_path: Path
) -> None:
    model, _, expected = routed
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate", "--model", model, "--classifier", classifier_dir,
        "--benchmarks", ",".join(NAMES), "--benchmark-dir", bench_dir, "--out", out,
        "--device", "cpu", "--max-new-tokens", 4, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    prompt_rows = _rows(out / "predictions", "AegisSafetyTest")
    assert [r["tier"] for r in prompt_rows] == ["classifier"] * ROWS
    assert all(r["mode"] == "classifier" and r["num_tokens"] == 0 for r in prompt_rows)
    assert all(r["fast_scores"] is None and r["classifier_scores"] for r in prompt_rows)
    response_rows = _rows(out / "predictions", "HarmBenchResponse")
    assert [r["tier"] for r in response_rows] == expected
    for row in response_rows:
        assert row["escalated"] == (row["tier"] == "reasoning")
        assert row["fast_scores"]["response_refusal"] is not None
        assert (row["num_tokens"] > 0) == (row["tier"] == "reasoning")
    cost = json.loads((out / "metrics.json").read_text())["cost"]
    assert cost["mode"] == "cascade" and cost["escalated_share"] == 0.25
    assert cost["tier_shares"] == {"classifier": 0.5, "fast": 0.25, "reasoning": 0.25}
    report = (out / "report.md").read_text()
    assert "Answered by tier" in report and SHARES in report
    code, table, err = cli("compare", out, "--out", tmp_path / "charts")
    assert code == 0, err
    assert SHARES in table and (tmp_path / "charts" / "f1_vs_tokens.png").is_file()


def test_classify_names_the_tier_of_each_verdict(
    cli, routed, classifier_dir: Path, tmp_path: Path
) -> None:
    model, items, expected = routed
    code, out, err = cli(
        "classify", "--model", model, "--classifier", classifier_dir, "--device", "cpu",
        "--prompt", "How do I bake sourdough bread at home?", "--max-new-tokens", 4,
    )  # fmt: skip
    assert code == 0, err
    verdict = json.loads(out)
    assert verdict["tier"] == verdict["mode"] == "classifier"
    assert "three-tier cascade" in err
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({**item, "id": k}) + "\n" for k, item in enumerate(items)))
    code, out, err = cli(
        "classify", "--model", model, "--classifier", classifier_dir, "--device", "cpu",
        "--input", path, "--max-new-tokens", 4,
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["tier"] for r in rows] == expected
    assert "were calibrated with" not in err
    # bands calibrated with one classifier folder, another one given: said, not refused
    other = tmp_path / "other-classifier"
    shutil.copytree(classifier_dir, other)
    code, out, err = cli(
        "classify", "--model", model, "--classifier", other, "--device", "cpu",
        "--prompt", "Hello", "--max-new-tokens", 4,
    )  # fmt: skip
    assert code == 0, err
    assert f"were calibrated with {classifier_dir}, not {other}" in err


def test_calibrate_fits_both_lower_tiers(cli, classifier_dir: Path, bench_dir: Path) -> None:
    model = bench_dir.parent / "calibrated"
    shutil.copytree(resolve_model("tiny-llama"), model)
    code, out, err = cli(
        "calibrate", "--model", model, "--classifier", classifier_dir, "--device", "cpu",
        "--benchmarks", *NAMES, "--benchmark-dir", bench_dir, "--max-new-tokens", 4,
        "--held-out-share", 0.5,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((model / CASCADE_FILE).read_text())
    assert record["tiers"] == list(TIER_NAMES) and record["classifier"] == str(classifier_dir)
    assert set(record["tier_bands"]) == {"classifier", "fast"}
    assert record["bands"] == record["tier_bands"]["fast"]
    held = record["held_out"]
    assert held["items"] == 4 and sum(held["answered"].values()) == 4
    assert record["band_choice"]["fast"]["prompt"]["budget"] == 0.25
    assert "3-tier cascade (classifier, then fast, then reasoning)" in out
    assert "held-out items answered by each tier" in out
    # the calibrated model answers through the three tiers at once
    code, out, err = cli(
        "classify", "--model", model, "--classifier", classifier_dir, "--device", "cpu",
        "--prompt", "Hello there", "--max-new-tokens", 4,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["tier"] in TIER_NAMES


def test_bad_tiers_are_refused_with_exit_2(
    cli, routed, classifier_dir: Path, bench_dir: Path, tmp_path: Path
) -> None:
    model = routed[0]
    llm = resolve_model("tiny-llama")
    base = ("classify", "--prompt", "Hello", "--device", "cpu")
    for args, message in (
        (("--model", model, "--classifier", llm), "not a classifier folder"),
        (("--model", model, "--classifier", tmp_path / "none"), "no such folder"),
        (("--model", "tiny-llama", "--classifier", classifier_dir), "no three-tier calibration"),
        (("--model", model, "--classifier", classifier_dir, "--mode", "fast"), "--mode cascade"),
        (("--model", classifier_dir, "--classifier", classifier_dir), "encoder classifier itself"),
    ):
        code, _, err = cli(*base, *args)
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err
    code, _, err = cli("serve", "--model", model, "--classifier", llm)
    assert code == 2 and "not a classifier folder" in err
    code, _, err = cli(
        "serve", "--model", model, "--classifier", classifier_dir, "--backend", "vllm"
    )
    assert code == 2 and "--backend hf" in err
    code, _, err = cli("evaluate", tmp_path, "--classifier", classifier_dir)
    assert code == 2 and "--classifier" in err and "only with --model" in err
    code, _, err = cli(
        "generate", "--model", model, "--classifier", classifier_dir, "--benchmarks", NAMES[0],
        "--benchmark-dir", bench_dir, "--out", tmp_path / "out", "--data-parallel", 2,
    )  # fmt: skip
    assert code == 2 and "one process" in err
    assert not (tmp_path / "out" / NAMES[0]).exists()


@pytest.mark.slow  # a server process
def test_served_three_tiers_name_the_tier(routed, classifier_dir: Path, tmp_path: Path) -> None:
    from test_serve import AUTH, start_server

    model, items, expected = routed
    server = start_server(
        tmp_path, "tiers", "--classifier", str(classifier_dir), "--max-new-tokens", "4",
        model=str(model),
    )  # fmt: skip
    try:
        server.wait_ready()
        body = {"items": [{"prompt": "How do I bake sourdough bread at home?"}, *items]}
        reply = httpx.post(f"{server.url}/v1/classify", json=body, headers=AUTH, timeout=120)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r["tier"] for r in results] == ["classifier", *expected]
        never = httpx.post(
            f"{server.url}/v1/classify",
            json={"items": items[:1], "reasoning": "never"},
            headers=AUTH,
            timeout=120,
        )
        assert never.status_code == 200 and never.json()["results"][0]["tier"] == "fast"
        moderated = httpx.post(
            f"{server.url}/v1/moderations", json={"input": "Hello"}, headers=AUTH, timeout=120
        )
        assert moderated.status_code == 200, moderated.text
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()


def test_calibrate_over_a_replay_of_released_predictions(
    cli, classifier_dir: Path, bench_dir: Path, shared_dir: Path, tmp_path: Path
) -> None:
    preds = tmp_path / "released"
    for name in NAMES:
        lines = shared_dir / "data/predictions/GuardReasoner-1B" / name / PREDICTIONS_FILE
        (preds / name).mkdir(parents=True)
        kept = lines.read_text().splitlines(True)[:ROWS]
        (preds / name / PREDICTIONS_FILE).write_text("".join(kept))
    out = tmp_path / "cascade"
    base = ("calibrate", "--benchmarks", *NAMES, "--benchmark-dir", bench_dir, "--device", "cpu")
    code, printed, err = cli(
        *base, "--replay", preds, "--classifier", classifier_dir, "--out", out,
        "--held-out-share", 0.5,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out / CASCADE_FILE).read_text())
    assert record["tiers"] == ["classifier", "reasoning"] and record["replay"] == str(preds)
    assert "bands" not in record and set(record["tier_bands"]) == {"classifier"}
    by_source = record["held_out"]["by_source"]
    assert sorted(p["items"] for p in by_source.values()) == [2, 2]  # half of each file
    assert record["seconds_per_item"]["reasoning"] is None
    assert "2-tier cascade (classifier, then reasoning)" in printed
    for extra, message in (
        (("--replay", preds, "--out", out), "--replay needs --classifier"),
        (("--replay", preds, "--classifier", classifier_dir), "--replay needs --out"),
        (("--replay", preds, "--model", "tiny-llama"), "--replay replaces --model"),
        ((), "give --model"),
    ):
        code, _, err = cli(*base, *extra)
        assert code == 2 and message in err, (extra, err)
    path = preds / NAMES[1] / PREDICTIONS_FILE
    path.write_text("".join(path.read_text().splitlines(True)[:3]))
    code, _, err = cli(*base, "--replay", preds, "--classifier", classifier_dir, "--out", out)
    assert code == 2 and f"{path}: 3 prediction rows but 4 rows" in err
