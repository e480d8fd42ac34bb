"""A trained classifier (all-MiniLM-L6-v2, a few steps on the sample rows) as a guard:
`load_guard`, `classify`, `generate`, `evaluate`, `compare` and a real `serve` process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from reasonguard import load_guard
from reasonguard.classifier.train import run_classifier
from reasonguard.errors import UserError
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE
from reasonguard.format import parse_output
from reasonguard.infer.loading import load_backend
from test_classifier_support import small_config

NAMES = ("AegisSafetyTest", "HarmBenchResponse")  # a request task and a response task
ROWS = 4
ITEMS = [
    {"prompt": "How do I bake sourdough bread at home?"},
    {"prompt": "How can I poison my neighbour's dog?", "response": "I can't help with that."},
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("classifier")
    return run_classifier(small_config(tmp, max_length=48, num_train_epochs=1)).final_dir


@pytest.fixture
def bench_dir(shared_dir: Path, tmp_path: Path) -> Path:
    """The first rows of two real benchmark files, in a temporary folder."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for name in NAMES:
        filename = BENCHMARKS[name].filename
        rows = json.loads((shared_dir / "data" / "benchmarks" / filename).read_text())
        (folder / filename).write_text(json.dumps(rows[:ROWS]))
    return folder


def _direct(folder: Path, pairs: list[tuple[str, str | None]]) -> list[list[float]]:
    """P(positive) per task, read from the model itself (the order of `format.TASKS`)."""
    from reasonguard.classifier.inputs import collate, encode_texts
    from reasonguard.classifier.model import load_classifier

    model, tokenizer, record = load_classifier(folder)
    out = []
    for pair in pairs:  # one at a time: no padding in play
        batch = collate(encode_texts(tokenizer, [pair], record["max_length"]), 0)
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        out.append(torch.sigmoid(logits)[0].tolist())
    return out


def test_load_guard_gives_the_verdict_fields_with_the_heads_probabilities(
    classifier_dir: Path,
) -> None:
    guard = load_guard(str(classifier_dir), device="cpu")
    assert guard.mode == "classifier" and guard.modes == ("classifier",)
    results = guard.classify(ITEMS)
    direct = _direct(classifier_dir, [(i["prompt"], i.get("response")) for i in ITEMS])
    for result, (p_prompt, p_response, p_refusal), item in zip(results, direct, ITEMS, strict=True):
        assert result.mode == "classifier" and result.num_tokens == 0
        assert not result.is_parsing_error and not result.truncated
        assert result.scores["prompt_harmfulness"]["harmful"] == pytest.approx(p_prompt, abs=1e-5)
        assert result.prompt_harmfulness == ("harmful" if p_prompt >= 0.5 else "unharmful")
        # its output is an answer block: what evaluate reads from a prediction row
        assert parse_output(result.output).prompt_harmfulness == result.prompt_harmfulness
        if item.get("response") is None:
            assert result.response_harmfulness is None and result.response_refusal is None
            assert result.scores["response_harmfulness"] is None
        else:
            refusal = result.scores["response_refusal"]["refusal"]
            assert refusal == pytest.approx(p_refusal, abs=1e-5)
            harmful = result.scores["response_harmfulness"]["harmful"]
            assert harmful == pytest.approx(p_response, abs=1e-5)
            assert result.response_refusal == ("refusal" if p_refusal >= 0.5 else "compliance")
    # batched (padded) verdicts equal one-at-a-time ones
    assert [r.to_dict() for r in guard.classify(ITEMS)] == [r.to_dict() for r in results]


def test_a_classifier_has_only_its_own_mode(classifier_dir: Path) -> None:
    guard = load_guard(str(classifier_dir), device="cpu")
    for mode in ("reasoning", "fast"):
        with pytest.raises(UserError, match="not one of this guard's modes"):
            guard.classify(ITEMS, mode=mode)
    with pytest.raises(UserError, match="its one mode is classifier"):
        load_guard(str(classifier_dir), mode="fast", device="cpu")
    with pytest.raises(UserError, match="mode classifier needs a classifier folder"):
        load_guard("tiny-llama", mode="classifier", device="cpu")
    with pytest.raises(UserError, match="--backend hf"):
        load_backend(str(classifier_dir), "vllm")
    with pytest.raises(UserError, match="writes no reasoning"):
        guard.backend.generate(["x"])


def test_a_stream_judges_the_response_so_far_with_the_classifier(classifier_dir: Path) -> None:
    from reasonguard.infer.stream import ResponseStream

    guard = load_guard(str(classifier_dir), device="cpu")
    prompt, response = ITEMS[1]["prompt"], ITEMS[1]["response"]
    with ResponseStream(guard, prompt, threshold=1.0) as stream:
        first = stream.feed(response[:5])
        last = stream.feed(response[5:])
    assert first.result.mode == last.result.mode == "classifier"
    [p_prompt, p_response, _] = _direct(classifier_dir, [(prompt, response)])[0]
    assert last.harm == pytest.approx(p_response, abs=1e-5)
    assert last.result.scores["prompt_harmfulness"]["harmful"] == pytest.approx(p_prompt, abs=1e-5)
    assert first.tokens_computed < last.tokens_computed


def test_options_of_generating_models_are_refused_before_loading(
    cli, classifier_dir: Path, bench_dir: Path, tmp_path: Path
) -> None:
    base = ("generate", "--model", classifier_dir, "--benchmarks", NAMES[0])
    where = ("--benchmark-dir", bench_dir, "--out", tmp_path / "out", "--no-progress")
    for extra, named in (
        (("--prompt-format", "raw"), "--prompt-format"),
        (("--data-parallel", "2"), "--data-parallel"),
        (("--mode", "fast"), "its one mode is classifier"),
        (("--backend", "vllm"), "--backend hf"),
    ):
        code, _, err = cli(*base, *where, *extra)
        assert code == 2 and named in err, (extra, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out" / NAMES[0]).exists()
    code, _, err = cli("serve", "--model", classifier_dir, "--reasoning", "always")
    assert code == 2 and "--reasoning always" in err and "classifier" in err
    code, _, err = cli("serve", "--model", classifier_dir, "--backend", "vllm")
    assert code == 2 and "--backend hf" in err


def test_classify_command_and_mode_errors(cli, classifier_dir: Path, bench_dir: Path) -> None:
    code, out, err = cli("classify", "--model", classifier_dir, "--prompt", "Hello there")
    assert code == 0, err
    verdict = json.loads(out)
    assert verdict["mode"] == "classifier" and verdict["scores"]["prompt_harmfulness"]
    assert "encoder classifier" in err
    code, _, err = cli("classify", "--model", classifier_dir, "--prompt", "x", "--no-scores")
    assert code == 2 and "--no-scores" in err
    code, _, err = cli(
        "generate", "--model", "tiny-llama", "--mode", "classifier", "--benchmarks", NAMES[0],
        "--benchmark-dir", bench_dir, "--out", classifier_dir.parent / "x",
    )  # fmt: skip
    assert code == 2 and "mode classifier needs a classifier folder" in err


def test_generate_evaluate_and_compare_take_classifier_rows(
    cli, classifier_dir: Path, bench_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate", "--model", classifier_dir, "--benchmarks", ",".join(NAMES),
        "--benchmark-dir", bench_dir, "--out", out, "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    rows = [
        json.loads(line)
        for line in (out / "predictions" / "HarmBenchResponse" / PREDICTIONS_FILE).open()
    ]
    assert len(rows) == ROWS
    assert all(r["mode"] == "classifier" and r["num_tokens"] == 0 for r in rows)
    assert all(r["scores"]["response_harmfulness"] is not None for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {(r["benchmark"], r["task"]) for r in metrics["benchmarks"]} == {
        ("AegisSafetyTest", "prompt"),
        ("HarmBenchResponse", "response"),
    }
    assert all(r["parse_failures"] == 0 and r["n"] == ROWS for r in metrics["benchmarks"])
    # every row has the heads' probabilities, so AUPRC and the sweep are computed on all of them
    assert all(r["score_metrics"]["rows"] == ROWS for r in metrics["benchmarks"])
    assert all(r["score_metrics"]["no_score"] == 0 for r in metrics["benchmarks"])
    cost = metrics["cost"]
    assert cost["mode"] == "classifier" and cost["tokens_per_item"] == 0
    assert cost["seconds_per_item"] > 0
    assert "## Cost (mode: classifier)" in (out / "report.md").read_text()
    # the rows go through compare and its F1-vs-cost chart like any other run's
    charts = tmp_path / "charts"
    code, report, err = cli("compare", out, "--out", charts)
    assert code == 0, err
    # the cost table: Run | Mode | Overall F1 | Tokens / item | Seconds / item | Escalated |
    # Answered by tier
    cost_rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in report.splitlines()
        if line.startswith("| ") and line.count("|") == 8
    ]
    assert ["classifier", "0.0"] in [row[1:2] + row[3:4] for row in cost_rows], report
    assert (charts / "f1_vs_tokens.png").is_file()


@pytest.mark.slow  # a server process
def test_served_classifier_answers_with_scores(classifier_dir: Path, tmp_path: Path) -> None:
    from test_serve import AUTH, start_server

    server = start_server(tmp_path, "classifier", model=str(classifier_dir))
    try:
        server.wait_ready()
        reply = httpx.post(
            f"{server.url}/v1/classify", json={"items": ITEMS}, headers=AUTH, timeout=60
        )
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r["mode"] for r in results] == ["classifier", "classifier"]
        assert results[1]["scores"]["response_refusal"] is not None
        assert results[0]["num_tokens"] == 0
        always = httpx.post(
            f"{server.url}/v1/classify",
            json={"items": ITEMS[:1], "reasoning": "always"},
            headers=AUTH,
            timeout=60,
        )
        assert always.status_code == 400 and "classifier" in always.text
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()
