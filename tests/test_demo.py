"""The offline demo: its held-out split, and the whole flow end to end on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reasonguard.data.sources import load_source
from reasonguard.demo import run_demo, split_samples
from reasonguard.format import parse_labels

REPO = Path(__file__).resolve().parents[1]


def _samples() -> list[dict]:
    return [r for rows in load_source("samples").values() for r in rows]


def test_split_is_stratified_disjoint_and_deterministic():
    records = _samples()
    train, test = split_samples(records)
    assert len(train) + len(test) == len(records)
    assert {r["input"] for r in train}.isdisjoint({r["input"] for r in test})
    labels = [parse_labels(r["output"])["prompt"] for r in test]
    assert labels.count("harmful") >= 3 and labels.count("unharmful") >= 3
    assert split_samples(records) == (train, test)
    assert _samples() == records  # the caller's records are untouched


def test_demo_end_to_end_on_tiny_model(tmp_path, capsys):
    """The demo's four steps with the tiny random model (SmolLM2 is what `make demo` uses)."""
    out = tmp_path / "demo"
    metrics = run_demo(
        out=out,
        config=REPO / "configs" / "demo-cpu.yaml",
        overrides=["model_name_or_path=tiny-llama", "max_steps=2", "eval_strategy=no"],
        max_new_tokens=8,
    )
    assert metrics["n"] == len(split_samples(_samples())[1])
    assert set(metrics["tasks"]) == {"prompt", "response", "refusal"}
    # A random model writes no answers: every row is a parse failure, counted as wrong.
    assert metrics["tasks"]["prompt"]["parse_failures"] == metrics["n"]
    assert json.loads((out / "metrics.json").read_text())["n"] == metrics["n"]
    report = (out / "report.md").read_text()
    assert report.startswith("# reasonguard evaluation")
    # The report says what a newcomer is looking at and what produces a real guard.
    assert "not" in report.split("What you are looking at:")[1].split("\n\n")[0]
    assert "configs/exp19-qlora-3b-instruct.yaml" in report
    printed = capsys.readouterr().out
    # Stage times as it goes, and a readable total (not a raw dict).
    assert printed.count("      done in ") == 4
    assert re.search(r"Demo finished in \d+ s \(model \d+ s, training \d+ s, generation", printed)
    assert "{" not in printed.split("Demo finished in", 1)[1].splitlines()[0]
    assert (out / "model" / "final" / "reasonguard.json").is_file()
    assert (out / "model" / "training_info.json").is_file()
    generated = sorted((out / "generations").glob("*.jsonl"))  # one file per source split
    assert sum(len(p.read_text().splitlines()) for p in generated) == metrics["n"]
